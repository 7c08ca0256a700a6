"""The loss: the sum of next-token cross-entropies over the label tokens, and how many there are.
For classification and regression (one label per row), the sum of the rows' losses and the rows.

Training divides a step's summed loss by the step's label tokens (all its passes, all processes), so
each label token weighs the same whatever batch it came in. Averaging each micro-batch's mean instead
(what the HF Trainer did until late 2024) over-weights the tokens of short examples; with this
normalization, 8 micro-batches of 1 give the same gradient as one batch of the same 8 examples.
Evaluation uses the same two functions, so a held-out loss is comparable with a training loss.
"""

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label cross-entropy skips: prompt positions and padding
Batch = dict[str, torch.Tensor]  # input_ids, labels, and attention_mask (padded) or position_ids (packed)
# What `counted` adds for the host: a step leaves these where they are (on the CPU) and moves the rest.
HOST_KEYS = frozenset({"n_label_tokens", "n_tokens", "segment_lengths"})


def label_tokens(batch: Batch) -> int:
    """What the loss counts: labels other than -100, after the one-position shift; the rows of a batch
    with one label per row (classification, regression), so a step's loss is the mean over its examples."""
    if "n_label_tokens" in batch:
        return int(batch["n_label_tokens"])
    if batch["labels"].dim() == 1:
        return batch["labels"].numel()
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: Batch) -> int:
    """Real (not padding) tokens of a padded or packed batch."""
    if "n_tokens" in batch:
        return int(batch["n_tokens"])
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits the loss needs: those followed by a label in some row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which sequence each token of one row of position ids is in: a new one starts wherever a position
    does not continue the previous one by +1 (the rule transformers' mask builder uses for packed rows).
    [0, 1, 2, 0, 1, 0] -> [0, 0, 0, 1, 1, 2]. On the device, no wait."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[1:] = position_ids[1:] - position_ids[:-1] != 1
    return starts.cumsum(-1) - 1


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences in one row of position ids (sequence_ids' rule): [0, 1, 2, 0, 1, 0] -> [3, 2, 1]."""
    return torch.bincount(sequence_ids(position_ids)).tolist()


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (1, 1, T, T) attention mask of a packed row: each token sees the tokens of its own
    sequence up to itself (0), nothing else (the dtype's minimum). A sequence starts where the positions
    restart (sequence_ids). For a model that takes no position ids: ALiBi's biases depend only on how far apart
    two tokens are, so this mask alone makes a packed row compute what each sequence alone computes
    (once bitfit.data.packing.use_packed_alibi builds those biases from it)."""
    sequence = sequence_ids(position_ids[0])
    allowed = (sequence[:, None] == sequence[None, :]).tril()
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def counted(batch: Batch) -> Batch:
    """The batch, as a collator made it on the CPU, with what a step needs to know about it counted here,
    on the host: its label tokens and tokens, a packed row's sequence lengths (HOST_KEYS, which stay on
    the host), and the positions whose logits the loss needs (which go to the device with the batch).
    Found on the device, each would make the host wait for the GPU, once a pass or once a layer."""
    facts = {"n_label_tokens": torch.tensor(label_tokens(batch)), "n_tokens": torch.tensor(input_tokens(batch))}
    if batch["labels"].dim() == 2:
        facts["label_positions"] = label_positions(batch["labels"])
    if "position_ids" in batch:
        facts["segment_lengths"] = torch.tensor(segment_lengths(batch["position_ids"][0]))
    return {**batch, **facts}


@functools.cache
def forward_accepts(model_class: type) -> frozenset[str]:
    """The keyword arguments a model class's forward takes (looked up once per class, not per pass)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of the next-token cross-entropies (fp32) at the labelled positions of a padded batch or packed row.

    Logits are computed only at positions followed by a label: the LM head's matmul and the
    (tokens x vocab) logits tensor, often the largest activation, shrink to the response tokens.
    Positions count from each sequence's first real token, so a left-padded sequence sees the same
    positions as an unpadded one (BLOOM's ALiBi does this by itself and takes no position_ids). A
    packed row brings its own position ids, which also keep its sequences apart.

    A batch with one label per row goes to row_loss_sum.
    """
    if batch["labels"].dim() == 1:
        return row_loss_sum(model, batch)
    targets = batch["labels"][:, 1:]
    keep = batch["label_positions"] if "label_positions" in batch else label_positions(batch["labels"])
    accepts = forward_accepts(type(model))
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch and "position_ids" in accepts:  # a packed row (packing.pack_batch): no padding
        inputs["position_ids"] = batch["position_ids"]
        if "segment_lengths" in batch and "kwargs" in accepts:  # on to the attention (packing.per_example_attention)
            inputs["segment_lengths"] = batch["segment_lengths"].tolist()
    elif "position_ids" in batch:  # a packed row for ALiBi (BLOOM): its sequences kept apart by the mask alone
        inputs["attention_mask"] = block_causal_mask(batch["position_ids"], model.dtype)
    else:
        inputs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in accepts:
            inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepts:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def row_loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum over the rows of a classification (cross-entropy, long labels) or regression (squared error,
    float labels) batch, in fp32: the model's head gives one logit vector per row."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
    return rows_loss(model(**inputs).logits, batch["labels"])


def rows_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed loss of rows with one label each, in fp32: squared error where the labels are numbers
    (regress), cross-entropy where they are class ids (classify). The one place that tells the two apart."""
    if labels.is_floating_point():
        return F.mse_loss(logits.float().squeeze(-1), labels, reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")
