"""Many fine-tunes, one base, one batch: each row of a batch adds its own delta.

A BitFit delta is a vector per biased layer, added to that layer's output. So rows that ask for
different fine-tunes can share ONE forward pass of the base: per biased layer, a table of shape
[1 + number of deltas, width] (row 0 all zeros: the base), and each row of the batch adds the table
row its request names, a gather. The weights are shared; the deltas cost kilobytes each.

    requests = [(prompt_ids, None), (prompt_ids, "runs/a/delta.safetensors"), (prompt_ids, "runs/b/...")]
    texts = generate_many(model, tokenizer, requests, max_new_tokens=32)

Every delta is checked against the base (fingerprint, shapes) before any row uses it, as apply_delta
does; the base model itself is never changed.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .delta import check_delta
from .errors import BitfitError
from .evaluate import answers

# Layers whose bias is added to their output, so a delta of it can be added there, per row. (Conv1D: GPT-2's linear.)
ADDED_TO_OUTPUT = (nn.Linear, nn.LayerNorm, Conv1D)


class DeltaTable:
    """The deltas of several fine-tunes as per-layer tables, added by forward hooks to the outputs of
    their layers, row by row as `use(rows)` says."""

    def __init__(self, model: nn.Module, paths: list[str]):
        checked = [check_delta(model, path)[0] for path in paths]  # every check first; nothing changes before
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
            # [batch, width] -> [batch, 1, width]: the same vector at every position of a row
            return output + table[self.rows].to(output.dtype).unsqueeze(1)

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
