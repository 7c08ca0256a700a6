"""The padding collator: a list of examples of different lengths -> one batch of rows of one length.

One row per example, the short ones filled up: the HF Trainer recipe's DataCollatorForSeq2Seq layout, for training
(the padded and trainer layouts), evaluation and generation. The packed layout's collator, which fills
nothing, is in packing.py.
"""

from functools import partial

import torch

from bitfit.core.loss import IGNORE_INDEX
from bitfit.data.examples import Example


def pad_id(tokenizer) -> int:
    """The id to pad input_ids with: the tokenizer's pad token, else eos (Llama-style tokenizers have none).

    Padded positions are masked out of attention and labelled -100, so the id itself is never learned.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(
    examples: list[Example],
    pad_token_id: int,
    padding_side: str = "right",
    multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad every example to the longest in the batch (rounded up to `multiple_of`), on `padding_side`.

    input_ids are padded with `pad_token_id`, attention_mask with 0 and labels with -100, so padding
    neither attends nor counts in the loss. BLOOM tokenizers pad on the left, most others on the right.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    length = max(len(example["input_ids"]) for example in examples)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of  # round up

    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, value in fill.items():
        if key not in examples[0]:  # prompts for generation have no labels
            continue
        rows = []
        for example in examples:
            padding = [value] * (length - len(example[key]))
            rows.append(example[key] + padding if padding_side == "right" else padding + example[key])
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def pad_labelled(examples: list[Example], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Labelled examples (bitfit.data.labelled) as one batch: input_ids, attention_mask (and token_type_ids)
    padded to the longest row, and `labels`, one per row: class ids (long) or numbers (float32)."""
    batch = pad_batch([{key: e[key] for key in ("input_ids", "attention_mask")} for e in examples], pad_token_id,
                      padding_side)
    if "token_type_ids" in examples[0]:
        length = batch["input_ids"].shape[1]
        rows = [([0] * (length - len(e["token_type_ids"])) if padding_side == "left" else []) + e["token_type_ids"]
                + ([0] * (length - len(e["token_type_ids"])) if padding_side == "right" else []) for e in examples]
        batch["token_type_ids"] = torch.tensor(rows, dtype=torch.long)
    labels = [e["label"] for e in examples]
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return batch


def idle_pass() -> dict[str, torch.Tensor]:
    """A pass of one token and no label: under sharded weights (bitfit.parallel.sharding) every forward is a
    collective, so a process whose share of a step is done runs this while another still has a pass.
    It adds nothing to the loss, the label tokens or the gradient; its one token (id 0, in every
    vocabulary) counts as computed."""
    return {"input_ids": torch.tensor([[0]]), "attention_mask": torch.tensor([[1]]),
            "labels": torch.tensor([[IGNORE_INDEX]])}


def padder(tokenizer):
    """The padded collator of this tokenizer: its pad id, on its padding side."""
    return partial(pad_batch, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)


def collator(task: str, tokenizer):
    """The padded collator of a task: next-token rows ('lm': padder), or labelled rows, one label each."""
    if task == "lm":
        return padder(tokenizer)
    return partial(pad_labelled, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)
