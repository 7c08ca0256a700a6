"""What trains: the biases, and the parameters the checkpoint does not hold; nothing else.

A classifier's head is new: the checkpoint of an encoder or a causal LM has none, and a random head that
stayed frozen would be a random projection no bias could fix (so the BitFit paper trains it, as does
every sequence classification setup). The same holds for a pooler a sentence-embedding checkpoint lacks.
These `new` parameters train whole; everything else the checkpoint holds trains only if it is a bias.

`trains(name, which, new)` is the one predicate. `select_biases` applies it to freeze the model, the flat
buffer (flat.py) holds exactly what it selected, the optimizer steps exactly that buffer, and the delta
export writes exactly that buffer. Nothing else decides.
"""

import re

import torch
from torch import nn

from bitfit.core.errors import BitfitError

# name of a trainable parameter -> bool mask over its entries (True = this entry trains). The mask is
# all-True except for fused q/k/v biases under the reduced selection, where only the query part trains.
Selection = dict[str, torch.Tensor]

# The BitFit paper's names for a block's biases, and the modules that hold them in each model family
# (BERT-style encoders, DistilBERT, DeBERTa-v2; Llama-style decoders; BLOOM, GPT-2, GPT-NeoX; OPT, Phi).
# A bias is in the first group whose module names end its module's name: attention output before output.
GROUPS = {
    "query": ("query", "query_proj", "q_proj", "q_lin"),
    "key": ("key", "key_proj", "k_proj", "k_lin"),
    "value": ("value", "value_proj", "v_proj", "v_lin"),
    "attention-output": ("attention.output.dense", "o_proj", "out_lin", "self_attention.dense", "attention.dense",
                         "attn.c_proj", "self_attn.out_proj", "self_attn.dense"),  # the paper's m1
    "intermediate": ("intermediate.dense", "gate_proj", "up_proj", "lin1", "dense_h_to_4h", "c_fc", "fc1"),  # m2
    "output": ("output.dense", "down_proj", "lin2", "dense_4h_to_h", "mlp.c_proj", "fc2"),  # m3
    "layernorm": (),  # every LayerNorm's bias (is_layernorm)
}
REDUCED = ("query", "intermediate")  # the paper's reduced variant: b_q and b_m2, the wide MLP bias
# Fused q/k/v projections (BLOOM, GPT-NeoX, GPT-2) hold the query, key and value in parts of their output.
FUSED_QKV_MODULES = ("query_key_value", "c_attn")
QKV = ("query", "key", "value")
LAYERNORM = re.compile(r"(layer_?norm|^ln_\w*)$")


def is_bias(name: str) -> bool:
    """A native bias is a parameter *named* `bias`.

    The HF Trainer recipe's rule `"bias" in name` would also train T5's `relative_attention_bias.weight`, which is an
    embedding table (buckets x heads), not a bias.
    """
    return name.rsplit(".", 1)[-1] == "bias"


def _module_is(name: str, modules: tuple[str, ...]) -> bool:
    module = name.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in modules)


def group_of(name: str) -> str | None:
    """The paper's group of bias `name` (GROUPS), "qkv" for a fused q/k/v bias (query, key and value in
    parts of it), None for a bias in none of them (a pooler's, say)."""
    if LAYERNORM.search(name.rsplit(".", 1)[0].rsplit(".", 1)[-1].lower()):  # the module's own name
        return "layernorm"
    if _module_is(name, FUSED_QKV_MODULES):
        return "qkv"
    return next((group for group, modules in GROUPS.items() if _module_is(name, modules)), None)


def groups_in(which: str) -> tuple[str, ...] | None:
    """The groups a selection names ("reduced", or a comma list of GROUPS' names), or None: "all", or a
    regular expression."""
    if which == "reduced":
        return REDUCED
    names = tuple(part.strip() for part in which.split(","))
    return names if all(name in GROUPS for name in names) else None


def trains(name: str, which: str = "all", new: frozenset[str] = frozenset()) -> bool:
    """Does parameter `name` train under the selection `which`?

    which: "all" (every bias: BitFit), "reduced" (query + intermediate, the paper's reduced variant), a
    comma list of the paper's bias groups ("query,intermediate", "output": GROUPS), or else a regular
    expression searched in the names of the biases ("attention", "h\\.(0|1)\\."). A fused q/k/v bias
    trains if its query, key or value does (select_biases masks the parts that do not).
    `new`: the parameters the checkpoint does not hold (a classifier's head), which always train.
    """
    if name in new:
        return True
    if not is_bias(name):
        return False
    if which == "all":
        return True
    if (groups := groups_in(which)) is not None:
        group = group_of(name)
        return group in groups or (group == "qkv" and any(part in groups for part in QKV))
    return re.search(which, name) is not None


def fused_qkv_parts(model: nn.Module, name: str, size: int) -> dict[str, torch.Tensor]:
    """Masks of the query, key and value entries of a fused q/k/v bias ("q", "k", "v"), for the model
    families whose layout we know; a BitfitError for the others."""
    model_type = model.config.model_type
    index = torch.arange(size)
    if model_type in ("bloom", "gpt_neox"):
        # Output viewed as (heads, 3, head_dim): each head's q, k, v side by side. Masks, not slices.
        head_dim = size // (3 * model.config.num_attention_heads)
        part = index % (3 * head_dim) // head_dim
    elif model_type == "gpt2":
        part = index // (size // 3)  # output split as [q | k | v]
    else:
        raise BitfitError(f"{name}: don't know where the query, key and value lie in a fused q/k/v bias of a "
                          f"{model_type!r} model")
    return {"q": part == 0, "k": part == 1, "v": part == 2}


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's outermost ModuleLists: its stacks of transformer blocks (two in an encoder-decoder)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():  # parents come before their children
        if isinstance(module, nn.ModuleList) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return found


def add_zero_bias(linear: nn.Linear) -> None:
    """Give a bias-free linear layer a bias of zeros: y = xW^T + 0 leaves its output unchanged."""
    weight = linear.weight
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))


def add_missing_biases(model: nn.Module) -> list[str]:
    """Add a zero bias to every nn.Linear inside the transformer blocks that has none; return their names.

    Llama, Mistral and SmolLM2 have no biases at all, so BitFit needs some to train. Zeros keep the
    model's outputs exactly as they were until the first optimizer step. The LM head and embeddings
    lie outside the blocks and stay as they are.
    """
    added = []
    for list_name, blocks in block_lists(model):
        for name, module in blocks.named_modules(prefix=list_name):
            if isinstance(module, nn.Linear) and module.bias is None:
                add_zero_bias(module)
                added.append(f"{name}.bias")
    return added


def select_biases(model: nn.Module, which: str = "all", new: list[str] = ()) -> Selection:
    """Freeze every parameter, then unfreeze those `trains` picks; return them with their masks (a fused
    q/k/v bias under bias groups: the entries of the groups picked).

    Fails loudly when no bias would train: a run that updates no bias is not BitFit.
    """
    groups = groups_in(which)
    if which != "all" and groups is None:
        try:
            re.compile(which)
        except re.error as error:
            raise BitfitError(f"bias selection {which!r} is neither 'all', 'reduced', a comma list of the bias groups "
                              f"{', '.join(GROUPS)} nor a valid regular expression ({error})") from None
    selection: Selection = {}
    new = frozenset(new)
    for name, param in model.named_parameters():
        picked = trains(name, which, new)
        param.requires_grad_(picked)
        if picked:
            mask = torch.ones(param.numel(), dtype=torch.bool)
            if groups is not None and name not in new and group_of(name) == "qkv":
                try:
                    parts = fused_qkv_parts(model, name, param.numel())
                except BitfitError as error:
                    raise BitfitError(f"{error}; select biases with a name pattern instead of bias groups") from None
                mask = torch.stack([parts[part[0]] for part in QKV if part in groups]).any(0)
            selection[name] = mask
    if not set(selection) - new:
        n_biases = sum(is_bias(name) for name, _ in model.named_parameters())
        raise BitfitError(f"nothing would train: the model has {n_biases} bias tensors and selection {which!r} picks none of them"
                          + ("; add zero biases first (add_missing_biases)" if n_biases == 0 else ""))
    return selection


def group_counts(model: nn.Module, selection: Selection, new: list[str] = ()) -> dict[str, int]:
    """Bias entries that train per bias group of the paper (a fused q/k/v bias counted in its parts; "other"
    for biases in no group; the `new` parameters left out), in GROUPS' order: what the log prints."""
    counts = dict.fromkeys(GROUPS, 0) | {"other": 0}
    for name, mask in selection.items():
        if not is_bias(name) or name in new:
            continue
        group = group_of(name)
        if group == "qkv":
            try:
                parts = fused_qkv_parts(model, name, mask.numel())
            except BitfitError:
                counts["other"] += int(mask.sum())
                continue
            for part in QKV:
                counts[part] += int((mask & parts[part[0]]).sum())
        else:
            counts[group or "other"] += int(mask.sum())
    return {group: n for group, n in counts.items() if n}


def count_trainable(model: nn.Module, selection: Selection) -> tuple[int, int]:
    """(entries that train, all parameters of the model)."""
    trainable = sum(int(mask.sum()) for mask in selection.values())
    return trainable, sum(param.numel() for param in model.parameters())


def describe(trainable: int, total: int, new: dict[str, int] | None = None) -> str:
    """'trainable: 408,576 / 1,065,314,304 parameters (0.0384%)'; with `new` parameters ({name: entries}),
    counted apart: 'trainable: 102,912 biases + 1,538 new (classifier.weight, classifier.bias) = 104,450 / ...'."""
    head = sum((new or {}).values())
    parts = f"{trainable - head:,} biases + {head:,} new ({', '.join(new)}) = " if new else ""
    return f"trainable: {parts}{trainable:,} / {total:,} parameters ({100 * trainable / total:.4f}%)"
