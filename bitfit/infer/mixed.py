"""Many fine-tunes, one base, one batch: each row of a batch adds its own delta.

A BitFit delta is a vector per biased layer, added to that layer's output. So rows that ask for
different fine-tunes can share ONE forward pass of the base: per biased layer, a table of shape
[1 + number of deltas, width] (row 0 all zeros: the base), and each row of the batch adds the table
row its request names, a gather. The weights are shared; the deltas cost kilobytes each.

    requests = [(prompt_ids, None), (prompt_ids, "runs/a/delta.safetensors"), (prompt_ids, "runs/b/...")]
    texts = generate_many(model, tokenizer, requests, max_new_tokens=32)

Every delta is checked against the base (fingerprint, shapes) before any row uses it, as apply_delta
does; the base model itself is never changed.

Classifiers of one encoder (`classify_many`) share it the same way: each row adds its delta's biases, and
its delta's head (and any module the head holds whole: a new pooler) runs on that row alone (RowHeads),
whatever its number of classes.
"""

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bitfit.core.errors import BitfitError
from bitfit.data.collate import pad_id, pad_labelled
from bitfit.data.labelled import tokenize
from bitfit.model.delta import check_delta, head_modules, head_of, read_delta, task_of
from bitfit.model.pretrained import positions
from bitfit.run.evaluate import answers
from bitfit.run.finite import refuse_broken, text_probe

# Layers whose bias is added to their output, so a delta of it can be added there, per row. (Conv1D: GPT-2's linear.)
ADDED_TO_OUTPUT = (nn.Linear, nn.LayerNorm, Conv1D)


class DeltaTable:
    """The deltas of several fine-tunes as per-layer tables, added by forward hooks to the outputs of
    their layers, row by row as `use(rows)` says."""

    def __init__(self, model: nn.Module, paths: list[str], with_head: bool = True):
        # Every check first; nothing changes before. with_head=False: classifiers' heads are RowHeads'.
        checked = [check_delta(model, path, with_head)[0] for path in paths]
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        self.rows: torch.Tensor | None = None
        self.tables: dict[str, torch.Tensor] = {}
        for name in sorted({name for tensors in checked for name in tensors}):
            module = modules[name.removesuffix(".bias")]
            if not isinstance(module, ADDED_TO_OUTPUT):
                raise BitfitError(f"{name}: a bias of a {type(module).__name__} cannot be mixed per row")
            width = next(tensors[name] for tensors in checked if name in tensors).numel()
            table = torch.zeros(1 + len(paths), width)
            for i, tensors in enumerate(checked, start=1):
                if name in tensors:
                    table[i] = tensors[name]
            self.tables[name] = table.to(device)
        self._hooks = [modules[name.removesuffix(".bias")].register_forward_hook(self._adder(name)) for name in self.tables]

    def _adder(self, name: str):
        table = self.tables[name]

        def add(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            if self.rows is None:
                raise RuntimeError("DeltaTable: call the model inside `with table.use(rows):`")
            # [batch, width] -> [batch, 1, width]: the same vector at every position of a row (a pooler's
            # output has no positions: [batch, width] as it is)
            vectors = table[self.rows].to(output.dtype)
            return output + vectors.view(len(vectors), *[1] * (output.dim() - 2), -1)

        return add

    @contextlib.contextmanager
    def use(self, rows: list[int]) -> Iterator[None]:
        """Forward passes in this block add to batch row i the delta number rows[i] (0: none, the base;
        k: the k-th path given)."""
        self.rows = torch.tensor(rows, device=next(iter(self.tables.values())).device)
        try:
            yield
        finally:
            self.rows = None

    def remove(self) -> None:
        """Take the hooks off: the model is the plain base again."""
        for hook in self._hooks:
            hook.remove()


def generate_many(model: nn.Module, tokenizer, requests: list[tuple[list[int], str | None]], max_new_tokens: int = 64,
                  batch_size: int = 32, generation: dict | None = None) -> list[str]:
    """The answer to each (prompt token ids, delta path or None for the base), in order: the requests of
    all deltas generated together, in left-padded batches of `batch_size` rows. Greedy unless
    `generation` says otherwise (do_sample, temperature, top_p...: each row draws its own numbers)."""
    paths = sorted({path for _, path in requests if path is not None})
    number = {path: i for i, path in enumerate(paths, start=1)}
    table = DeltaTable(model, paths) if paths else None
    texts: list[str] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            prompts = [ids for ids, _ in chunk]
            with table.use([number.get(path, 0) for _, path in chunk]) if table else contextlib.nullcontext():
                texts += answers(model, tokenizer, prompts, device, False, max_new_tokens, batch_size=len(chunk),
                                 generation=generation)
    finally:
        if table:
            table.remove()
    return texts


class RowHeads:
    """Each classifier's head on its own rows: the modules holding the heads (delta.head_modules) are
    swapped for one that runs, for each delta, a copy of the module holding that delta's head on that
    delta's rows. Outputs of different widths (numbers of classes) are padded with zeros to the widest."""

    def __init__(self, model: nn.Module, heads: list[dict[str, torch.Tensor]]):
        self.model, self.rows = model, None
        self.names = head_modules(model, sorted({name for head in heads for name in head}))
        self.originals = {name: model.get_submodule(name) for name in self.names}
        for name in self.names:
            copies = nn.ModuleList([self._copy(self.originals[name], name, head) for head in heads])
            self._swap(name, _Dispatch(copies, self))

    @staticmethod
    def _copy(module: nn.Module, prefix: str, head: dict[str, torch.Tensor]) -> nn.Module:
        module = copy.deepcopy(module)
        for name, tensor in head.items():
            if name.startswith(prefix + "."):
                owner, attribute = (prefix + "." + name[len(prefix) + 1 :]).rsplit(".", 1)
                target = module.get_submodule(owner[len(prefix) + 1 :]) if owner != prefix else module
                setattr(target, attribute, nn.Parameter(tensor.to(module_device(module)), requires_grad=False))
        return module

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    @contextlib.contextmanager
    def use(self, rows: list[int]) -> Iterator[None]:
        """Forward passes in this block run head number rows[i] - 1 on batch row i (1: the first path)."""
        self.rows = rows
        try:
            yield
        finally:
            self.rows = None

    def remove(self) -> None:
        for name, module in self.originals.items():
            self._swap(name, module)


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Dispatch(nn.Module):
    def __init__(self, copies: nn.ModuleList, heads: RowHeads):
        super().__init__()
        self.copies, self._heads = copies, [heads]  # a list: the RowHeads is no submodule of the model

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = torch.tensor(self._heads[0].rows, device=hidden.device)
        outputs = {k: self.copies[k - 1](hidden[rows == k], *args, **kwargs) for k in sorted(set(rows.tolist()))}
        width = max(out.shape[-1] for out in outputs.values())
        first = next(iter(outputs.values()))
        result = first.new_zeros((len(rows), *first.shape[1:-1], width))
        for k, out in outputs.items():
            result[rows == k, ..., : out.shape[-1]] = out
        return result


@torch.no_grad()
def classify_many(model: nn.Module, tokenizer, requests: list[tuple[tuple[str, ...], str]], max_len: int = 512,
                  batch_size: int = 32) -> list[dict]:
    """For each (a text or a pair of texts, a classifier's or regressor's delta path): {"label", "probability",
    "scores"} (a class: its name, its softmax probability, every class's), or {"value"} (a regressor),
    for all requests in shared batches: each row with its own delta's biases and head. `model`: the base
    with a classification head of any size (bitfit.model.pretrained.load_classifier); it is not changed."""
    paths = sorted({path for _, path in requests})
    number = {path: i for i, path in enumerate(paths, start=1)}
    deltas = [_head_of(path) for path in paths]
    modules = dict(model.named_modules())
    for path, (head, _) in zip(paths, deltas):
        if missing := [name for name in head if name.rsplit(".", 1)[0] not in modules]:
            raise BitfitError(f"{path}: this base has no place for the head's {missing[0]}: is it the base the delta "
                              "was trained on?")
    device, pad = module_device(model), pad_id(tokenizer)
    was_training, results = model.training, []
    table = heads = None
    model.eval()
    try:
        table = DeltaTable(model, paths, with_head=False)  # checks each delta against the base
        heads = RowHeads(model, [head for head, _ in deltas])
        probe = {key: tensor.to(device) for key, tensor in text_probe(tokenizer).items()}
        for k, path in enumerate(paths, start=1):  # each delta on its own first: does its head fit, is it finite?
            with table.use([k] * len(probe["input_ids"])), heads.use([k] * len(probe["input_ids"])):
                try:
                    width = model(**probe).logits.shape[-1]
                except RuntimeError as error:  # a head of another width than this base's hidden size
                    raise BitfitError(f"{path}: its head does not fit this base ({str(error).splitlines()[0][:120]})") from None
                refuse_broken(model, probe, path)  # the one check (bitfit.run.finite)
            classes = deltas[k - 1][1][1]
            if width != (len(classes) if classes else 1):
                raise BitfitError(f"{path}: its head gives {width} outputs, and it names "
                                  + (f"{len(classes)} classes" if classes else "one number (regress)"))
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            most = min(max_len, positions(model) or max_len)  # an encoder takes no longer row
            # As training encodes them: cut to `most` tokens, a long text's tail never tokenized
            examples = [{**fields, "label": 0} for fields in tokenize(tokenizer, [texts for texts, _ in chunk], most)]
            batch = {k: v.to(device) for k, v in pad_labelled(examples, pad, tokenizer.padding_side).items() if k != "labels"}
            rows = [number[path] for _, path in chunk]
            with table.use(rows), heads.use(rows):
                logits = model(**batch).logits.float()
            for row, k in zip(logits, rows):
                task, classes = deltas[k - 1][1]
                if task == "regress":
                    results.append({"value": row[0].item()})
                    continue
                probabilities = row[: len(classes)].softmax(-1)
                best = int(probabilities.argmax())
                results.append({"label": classes[best], "probability": probabilities[best].item(),
                                "scores": dict(zip(classes, probabilities.tolist()))})
    finally:  # the caller's model as it was, whatever failed
        if heads:
            heads.remove()
        if table:
            table.remove()
        model.train(was_training)
    return results


def _head_of(path: str) -> tuple[dict[str, torch.Tensor], tuple[str, list[str] | None]]:
    """(a classifier delta's head tensors, (its task, its classes)); a BitfitError for a delta of another task."""
    tensors, metadata = read_delta(path)
    task, classes = task_of(metadata)
    if task == "lm":
        raise BitfitError(f"{path} is a causal LM's delta (--task lm): generate.py uses it; classify takes a "
                          "classifier's or regressor's")
    return {name: tensors[name] for name in head_of(metadata)}, (task, classes)
