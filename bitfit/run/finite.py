"""The one check that a model still works: its outputs on a few examples are finite.

Finite biases do not make a finite model. A run whose last step pushed biases to huge (finite) values
gives NaN logits everywhere, and a delta file cannot show it. So every place that hands a tuned model
on runs this check first: train.py after the last step, before anything is written; generate.py and
`python -m bitfit.infer.classify` before they answer; `python -m bitfit.export.merge` before it writes a
model; `python -m bitfit.export.adapter` before it writes an adapter. Each refuses, with one line, a model this check finds broken. And when a training
step itself goes non-finite, `failed_step` says which examples it held.
"""

from pathlib import Path

import torch
from torch import nn

from bitfit.core.errors import BitfitError, NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import forward_accepts
from bitfit.data.collate import pad_batch, pad_id
from bitfit.data.examples import Example
from bitfit.data.layout import Passes
from bitfit.run import ranks
from bitfit.run.checkpoint import latest_checkpoint

# What the tools that have no examples of their own run the model on: short, everyday text.
PROBE_TEXTS = ("Add these two numbers.\n12 30", "The capital of France is", "Write a short poem about the sea.")


def text_probe(tokenizer) -> dict[str, torch.Tensor]:
    """PROBE_TEXTS as one padded batch of this tokenizer's ids."""
    rows = [tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
    return pad_batch([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows], pad_id(tokenizer))


def nonfinite_outputs(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False) -> str | None:
    """None if every logit of `model` on `batch` (input_ids and attention_mask, and token_type_ids where
    given; a few rows) is finite at the real (not padding) positions, or in every row of a classifier;
    else what is not, in words. Under sharded weights every process must call it (the forward is a
    collective). The model's train/eval mode is kept."""
    device = next(model.parameters()).device
    inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            cache = {"use_cache": False} if "use_cache" in forward_accepts(type(model)) else {}  # a causal LM's
            logits = model(**inputs, **cache).logits
    finally:
        model.train(was_training)
    broken = (~torch.isfinite(logits.float())).any(dim=-1)  # [rows, positions], or [rows] for a classifier
    if broken.dim() == 2:
        broken &= inputs["attention_mask"].bool()
    if not bool(broken.any()):
        return None
    rows = int(broken.reshape(len(broken), -1).any(dim=1).sum())
    return f"its logits hold NaN or inf on {rows} of {len(broken)} probe inputs" + (
        f" ({int(broken.sum())} positions)" if broken.dim() == 2 else "")


def refuse_broken(model: nn.Module, batch: dict[str, torch.Tensor], delta: str) -> None:
    """A BitfitError naming `delta` when the model it tuned gives non-finite outputs on `batch`: what a tool
    (generate, merge, the adapter export, classify) says before it hands such a model on."""
    if problem := nonfinite_outputs(model, batch):
        raise BitfitError(f"the model tuned by {delta} is broken: {problem}; the run that wrote the delta diverged "
                          "(train again with a lower --lr)")


def failed_step(error: NonFiniteError, step: int, plan: list[Passes], examples: list[Example], flat: FlatBiases,
                run_dir: Path) -> NonFiniteError:
    """The error that ends a run whose step `step` went non-finite. It names the training examples of the
    culprit step (this process's share, under torchrun): this step's, or, when the biases themselves are
    not finite, those of the step before, whose update made them so. Nothing of the step was saved, and it
    names the last good checkpoint."""
    culprit = step if bool(torch.isfinite(flat.values).all()) else step - 1  # a read, on the failure path only
    held = sorted((examples[i]["row"], examples[i]["place"]) for p in plan[culprit - 1] for i in p) if culprit else []
    whose = "this process's share of" if ranks.active() else ""
    said = f"{whose} step {culprit} held the training examples of {', '.join(place for _, place in held)}".strip()
    return NonFiniteError(f"step {step}: {error}; {said}; nothing of this step was saved and no delta was written; "
                          f"last good checkpoint: {latest_checkpoint(run_dir) or 'none (see --save-every)'}")
