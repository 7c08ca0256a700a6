"""See what BitFit changed: how far each bias type moved in each layer (the BitFit paper's Figure 1).

    python -m bitfit.export.inspection runs/<run>                 # table by layer and bias type, top 10, heatmap PNG
    python -m bitfit.export.inspection runs/<a> runs/<b>          # two runs of one base: per bias type, how they differ

The measure is the paper's: the mean absolute change per entry, |tuned - base| summed over a bias and
divided by its size, so biases of different widths compare. Beside it, the L2 norm of the change
relative to the base bias's norm, where the base has a bias (not where bitfit added a zero one).

A fused q/k/v bias (BLOOM, GPT-NeoX, GPT-2) is split into its q, k and v parts. Parts whose exact
gradient is zero are marked: under ALiBi (BLOOM) the softmax ignores a shift shared by all keys, so the
key biases get rounding noise as a gradient, which AdamW scales up to lr-sized steps. Their "change" is
noise, not learning. They are found by measuring, not by name: each part's gradient on one batch,
against the median part's.
"""

import argparse
import io
import json
import math
import re
import sys
from pathlib import Path

import torch
from torch import nn

from bitfit.cli import ArgumentParser, add_trust_flags, entry_point
from bitfit.core.biases import FUSED_QKV_MODULES, fused_qkv_parts, is_bias
from bitfit.core.errors import BitfitError
from bitfit.files import write_atomically
from bitfit.model import pretrained
from bitfit.model.delta import apply_delta, check_delta, head_of, read_delta, task_of
from bitfit.run.run_folder import delta_of, is_run_folder

HEATMAP = "bias_change.png"  # written into a run folder given to inspect (a run file: --overwrite deletes it)
ZERO_GRADIENT = 1e-5  # a part's RMS gradient below this share of the median part's counts as exactly zero

# The bias types of BERT-family encoders (BERT, RoBERTa, ELECTRA), by their path inside a layer, named as
# the BitFit paper names them.
BERT_TYPES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
              "attention.output.dense": "attention output", "attention.output.LayerNorm": "attention LayerNorm",
              "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "output LayerNorm"}

# One part of a bias: (layer or None outside the blocks, bias type, parameter name, mask of its entries or None)
Part = tuple[int | None, str, str, torch.Tensor | None]



def parts_of(model: nn.Module, names: list[str]) -> list[Part]:
    """Each bias as one part, or as its q, k and v parts where it is a fused projection of a known layout."""
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    placed = {name: _layer_and_path(name) for name in names}
    # A bias type is its module's own name (q_proj, input_layernorm), or its last two names where one
    # name is used twice in a layer (GPT-2's attn.c_proj and mlp.c_proj).
    short = [(layer, path.rsplit(".", 1)[-1]) for layer, path in placed.values()]
    parts = []
    for name in sorted(names, key=order.__getitem__):  # the model's order: q, k, v, o, gate, up, down per block
        layer, path = placed[name]
        kind = path.rsplit(".", 1)[-1]
        if layer is not None and path in BERT_TYPES:
            kind = BERT_TYPES[path]
        elif short.count((layer, kind)) > 1:
            kind = ".".join(path.rsplit(".", 2)[-2:])
        if kind in FUSED_QKV_MODULES:
            try:
                split = fused_qkv_parts(model, name, model.get_parameter(name).numel())
                parts += [(layer, letter, name, mask) for letter, mask in split.items()]
                continue
            except BitfitError:  # an unknown fused layout: the bias stays whole
                pass
        parts.append((layer, kind, name, None))
    return parts


def _layer_and_path(name: str) -> tuple[int | None, str]:
    """('model.layers.3.self_attn.q_proj.bias') -> (3, 'self_attn.q_proj'); (None, the module path) outside the blocks."""
    module = name.removesuffix(".bias")
    found = re.search(r"\.(\d+)\.(.+)$", module)
    return (int(found[1]), found[2]) if found else (None, module)


def _entries(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    flat = tensor.detach().reshape(-1).double()
    return flat if mask is None else flat[mask]


def zero_gradient_parts(model: nn.Module, parts: list[Part], seed: int = 0) -> set[tuple[int | None, str]]:
    """The (layer, type) parts whose gradient is zero up to rounding, on one batch of random tokens.

    A structural zero (the key bias under ALiBi) holds for every input, so random tokens find it; a bias
    that learns has a gradient within a few orders of magnitude of the others on any batch."""
    names = {name for _, _, name, _ in parts}
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        param.grad = None
    was_training = model.training
    model.eval()  # no dropout: the gradient of the function itself
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    labels = ids  # a causal LM's next tokens; a classifier's or regressor's one label per row:
    if pretrained.auto_class(model) is not pretrained.AutoModelForCausalLM:
        labels = torch.zeros(2) if model.config.problem_type == "regression" else torch.zeros(2, dtype=torch.long)
    model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss.backward()
    rms = {(layer, kind): _entries(model.get_parameter(name).grad, mask).pow(2).mean().sqrt().item()
           for layer, kind, name, mask in parts}
    for name, param in model.named_parameters():
        param.grad = None
        param.requires_grad_(trainable[name])
    model.train(was_training)
    median = sorted(rms.values())[len(rms) // 2]
    return {key for key, value in rms.items() if value <= ZERO_GRADIENT * median}


def changes(parts: list[Part], tuned: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
            added: set[str]) -> list[dict]:
    """Per part: its layer, type, size, mean |change| per entry, the change's L2 norm, and that norm
    relative to the base bias's (None where bitfit added the bias: its base is zero)."""
    rows = []
    for layer, kind, name, mask in parts:
        change = _entries(delta[name], mask)
        base = _entries(tuned[name], mask) - change
        base_norm = base.norm().item()
        rows.append({"layer": layer, "type": kind, "name": name, "size": change.numel(), "added": name in added,
                     "mean_abs_change": change.abs().mean().item(), "change_norm": change.norm().item(),
                     "relative_change": None if name in added or base_norm == 0 else change.norm().item() / base_norm})
    return rows


def heatmap_matrix(rows: list[dict]) -> tuple[list[int], list[str], torch.Tensor]:
    """(layers, bias types in model order, [layer x type] mean |change| per entry; NaN where a layer lacks it)."""
    in_blocks = [row for row in rows if row["layer"] is not None]
    layers = sorted({row["layer"] for row in in_blocks})
    kinds = list(dict.fromkeys(row["type"] for row in in_blocks))
    matrix = torch.full((len(layers), len(kinds)), math.nan)
    for row in in_blocks:
        matrix[layers.index(row["layer"]), kinds.index(row["type"])] = row["mean_abs_change"]
    return layers, kinds, matrix


def figure_inches(n_layers: int, n_kinds: int) -> tuple[float, float]:
    """The heatmap's size: a column per bias type, a row per layer, room for labels and the colour bar."""
    return 2.5 + 0.75 * n_kinds, max(3.0, 1.4 + 0.22 * n_layers)


def save_heatmap(rows: list[dict], zero: set, path: Path, title: str, dpi: int = 100) -> tuple[int, int]:
    """Write the layer x bias type heatmap of mean |change| per entry; return the matrix's shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, matrix = heatmap_matrix(rows)
    figure, axes = plt.subplots(figsize=figure_inches(len(layers), len(kinds)))
    image = axes.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set(xlabel="bias type", ylabel="layer", title=title)
    for layer, kind in zero:
        if layer is not None:  # rounding noise, not learning
            axes.text(kinds.index(kind), layers.index(layer), "x", ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axes, label="mean |tuned - base| per entry")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi)
    plt.close(figure)
    write_atomically(path, png.getvalue())
    return tuple(matrix.shape)


def print_table(rows: list[dict], zero: set) -> None:
    layers, kinds, matrix = heatmap_matrix(rows)
    scale = 10 ** math.floor(math.log10(max(float(matrix.nan_to_num(0).max()), 1e-30)))
    print(f"mean |change| per entry, in units of {scale:.0e}, by layer and bias type"
          + ("; x = exact gradient zero (rounding noise, not learning)" if zero else ""))
    widths = [max(10, len(kind) + 2) for kind in kinds]  # a column as wide as its bias type's name
    print("layer " + "".join(f"{kind:>{width}}" for kind, width in zip(kinds, widths)))
    for i, layer in enumerate(layers):
        cells = [("" if math.isnan(v) else f"{v / scale:.2f}") + ("x" if (layer, kind) in zero else " ")
                 for kind, v in zip(kinds, matrix[i].tolist())]
        print(f"{layer:>5} " + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))
    for row in rows:
        if row["layer"] is None:
            print(f"outside the blocks: {row['name']}: {row['mean_abs_change'] / scale:.2f}")
    print("\nby bias type: mean |change| per entry, and the L2 norm of the change relative to the base bias's")
    for kind in kinds:
        of_kind = [row for row in rows if row["type"] == kind]
        mean = sum(row["mean_abs_change"] * row["size"] for row in of_kind) / sum(row["size"] for row in of_kind)
        relative = [row["relative_change"] for row in of_kind if row["relative_change"] is not None]
        why = "bitfit added these biases (zero in the base)" if all(row["added"] for row in of_kind) else \
            "the base's biases are zero"
        print(f"  {kind:<26} {mean:.3e}   " + (f"relative {sum(relative) / len(relative):.3f} (mean over layers)"
                                                if relative else f"relative: none, {why}")
              + ("   [exact gradient zero: noise]" if any((row["layer"], kind) in zero for row in of_kind) else ""))
    print("\ntop 10 biases by mean |change| per entry:")
    for row in sorted(rows, key=lambda row: -row["mean_abs_change"])[:10]:
        part = "" if row["type"] in row["name"] else f" ({row['type']} part)"
        relative = "" if row["relative_change"] is None else f", relative {row['relative_change']:.3f}"
        print(f"  {row['name']}{part}: {row['mean_abs_change']:.3e}{relative}")


def compare(parts: list[Part], first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[dict]:
    """Per bias type (all its layers together): the L2 norm of each delta, of their difference, and their
    cosine similarity (1: the same direction; 0: unrelated; NaN where a delta is zero)."""
    kinds = list(dict.fromkeys(kind for _, kind, _, _ in parts))
    rows = []
    for kind in kinds:
        a, b = (torch.cat([_entries(d[name], mask) for _, k, name, mask in parts if k == kind]) for d in (first, second))
        denominator = (a.norm() * b.norm()).item()
        rows.append({"type": kind, "norm_first": a.norm().item(), "norm_second": b.norm().item(),
                     "difference_norm": (a - b).norm().item(),
                     "cosine": (a @ b).item() / denominator if denominator else math.nan})
    return rows


@entry_point
def main(argv: list[str] | None = None) -> int:
    cli = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("runs", nargs="+", metavar="RUN_OR_DELTA", help="a run folder or a delta file; two to compare them")
    cli.add_argument("--model", default="", help="the base model; '' means the one the delta names")
    cli.add_argument("--png", default="", help=f"where to write the heatmap; '' means {HEATMAP} in the run folder "
                                               "(a delta outside a run folder gets none unless given)")
    add_trust_flags(cli)
    args = cli.parse_args(argv)
    if len(args.runs) > 2:
        raise BitfitError(f"give one run to inspect or two to compare, not {len(args.runs)}")
    paths = [delta_of(run) for run in args.runs]
    png = Path(args.png) if args.png else (paths[0].parent / HEATMAP if is_run_folder(paths[0].parent) else None)
    if args.png and png.exists():
        raise BitfitError(f"--png {png} already exists; bitfit does not overwrite a file it did not write")
    deltas = [read_delta(str(path)) for path in paths]  # each checked whole before the model loads
    model, _ = pretrained.load_for(args.model or deltas[0][1]["base_model"], *task_of(deltas[0][1]), torch.device("cpu"),
                               torch.float32, args.trust_remote_code, args.trust_pickle_weights)
    # Biases only: a classifier's head is new, not a change, and two classifiers of one encoder (other
    # classes, or a regressor) have heads of their own while their biases compare.
    biases = [{name for name in tensors if is_bias(name) and name not in set(head_of(meta))} for tensors, meta in deltas]
    if len(deltas) == 2 and (deltas[0][1]["base_fingerprint"] != deltas[1][1]["base_fingerprint"] or biases[0] != biases[1]):
        raise BitfitError(f"{paths[0]} and {paths[1]} were trained on different bases or bias selections; "
                          "only deltas of one base and one selection compare")
    # Each delta's changes against this base (checked; an adapter's whole values made changes), before
    # the first is applied: the tuned biases are base + change.
    tensors, *others = [check_delta(model, str(path), with_head=False)[0] for path in paths]
    metadata = apply_delta(model, str(paths[0]))
    parts = parts_of(model, list(tensors))
    zero = zero_gradient_parts(model, parts)
    if len(deltas) == 2:
        print_comparison(paths, compare(parts, tensors, others[0]), zero)
        return 0
    rows = changes(parts, dict(model.named_parameters()), tensors, set(json.loads(metadata["added_biases"])))
    print(f"{paths[0]}: {len(tensors)} biases, {sum(t.numel() for t in tensors.values()):,} values, "
          f"base {metadata['base_model']}\n")
    print_table(rows, zero)
    if png:
        shape = save_heatmap(rows, zero, png, title=f"BitFit: change per bias ({metadata['base_model']})")
        print(f"\nheatmap ({shape[0]} layers x {shape[1]} bias types): {png}")
    return 0


def print_comparison(paths: list[Path], rows: list[dict], zero: set) -> None:
    noise = {kind for _, kind in zero}
    print(f"A = {paths[0]}\nB = {paths[1]}\n")
    print(f"{'bias type':<26} {'|A|':>10} {'|B|':>10} {'|A - B|':>10} {'cosine':>8}")
    for row in rows:
        print(f"{row['type']:<26} {row['norm_first']:>10.4f} {row['norm_second']:>10.4f} {row['difference_norm']:>10.4f} "
              f"{row['cosine']:>8.3f}" + ("   (exact gradient zero: noise)" if row["type"] in noise else ""))


if __name__ == "__main__":
    sys.exit(main())
