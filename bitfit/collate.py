"""The collators: a list of examples of different lengths -> one batch, padded or packed.

Padded: one row per example, the short ones filled up (the seeds' DataCollatorForSeq2Seq layout).
Packed: all examples end to end in ONE row, no filling at all; position ids that restart at 0 for each
example tell the model where one sequence ends and the next begins.
"""

import torch

from .data import IGNORE_INDEX, Example


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


def pack_batch(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Lay the examples end to end in one row, with position ids restarting at 0 for each example.

    Given position ids and no attention mask, transformers' mask builder reads each restart as a new
    sequence and masks attention block-diagonally (causal within each example, nothing across), so an
    example sees exactly what it sees alone, and no compute goes to padding. Each example's first label
    becomes -100: alone, its first token is never a target (nothing precedes it); packed, it would be
    predicted from the previous example's last token. `loop.packing_gap` checks a model keeps them apart.
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        row["position_ids"] += range(len(example["input_ids"]))
    return {key: torch.tensor([values], dtype=torch.long) for key, values in row.items()}
