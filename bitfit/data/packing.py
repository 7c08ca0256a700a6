"""Packing: a pass's examples end to end in ONE row, and everything that keeps them apart.

A packed row has no padding, so no compute goes to it. Three things make it exact:
    pack_batch            position ids restart at 0 for each example; each example's first label -100
    per_example_attention the row is split where the positions restart, and each example runs causal
                          SDPA on its own: the same numbers as transformers' block-diagonal mask, without
                          scoring the row's whole square and throwing 7/8 of it away
    use_packed_alibi      a model that takes no position ids but uses ALiBi (BLOOM): a per-sequence
                          causal mask (core.loss.block_causal_mask), and ALiBi biases built from each
                          token's position within its own sequence
    enable                before training, the loss of a pass's worth of examples packed and padded must agree to
                          PACKING_TOLERANCE: a model that let packed examples see each other would
                          otherwise train on a different problem, silently
Anything the split does not cover (a padded batch, generation with a KV cache, a sliding window) goes
to transformers' own SDPA unchanged, so a switched model computes what it computed before.
"""

import itertools
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bitfit.core.loss import IGNORE_INDEX, Batch, forward_accepts, loss_sum, segment_lengths
from bitfit.data.examples import Example

NAME = "bitfit_per_example"  # the attention implementation's name in transformers' interface

# Packed and padded losses differ by float rounding: 1e-7 (fp32, SmolLM2 and a tiny Llama), 2e-5 (a tiny
# Llama in bf16). Examples that see each other differ by far more: 0.3 on SmolLM2 with one unbroken position run.
PACKING_TOLERANCE = 1e-3


def pack_batch(examples: list[Example]) -> Batch:
    """Lay the examples end to end in one row, with position ids restarting at 0 for each example.

    Given position ids and no attention mask, transformers reads each restart as a new sequence, so an
    example sees exactly what it sees alone. Each example's first label becomes -100: alone, its first
    token is never a target (nothing precedes it); packed, it would be predicted from the previous
    example's last token.
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        row["position_ids"] += range(len(example["input_ids"]))
    return {key: torch.tensor([values], dtype=torch.long) for key, values in row.items()}


def per_example_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query/key/value (batch, heads, tokens, head_dim) in,
    (batch, tokens, heads, head_dim) out. A single row without a KV cache in a causal layer with no
    sliding window is split into its sequences; anything else is plain SDPA with the given mask."""
    lengths = kwargs.pop("segment_lengths", None)  # counted on the host (core.loss.counted): no wait for the device
    one_row_no_cache = query.shape[0] == 1 and key.shape[2] == query.shape[2]
    plain_causal = getattr(module, "is_causal", True) and getattr(module, "sliding_window", None) is None
    if position_ids is None or not (one_row_no_cache and plain_causal):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    lengths = lengths or segment_lengths(position_ids[0])  # read from the device: a wait, once a layer
    if takes_varlen(query, kwargs):
        return one_varlen_call(module, query, key, value, lengths, kwargs.get("scaling")), None
    outputs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
               for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outputs, dim=1), None


def takes_varlen(query: torch.Tensor, kwargs: dict) -> bool:
    """Whether the row's sequences go through ONE variable-length flash-attention call: on CUDA, in bf16 or
    fp16 (flash attention's dtypes), on a GPU flash attention runs on (Ampere or newer, head dim <= 256),
    without attention dropout or an extra bias. Elsewhere (the CPU, fp32), one SDPA call per sequence."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not kwargs.get("dropout")
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(query.device) >= (8, 0) and query.shape[-1] <= 256)


def one_varlen_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    lengths: list[int], scaling: float | None) -> torch.Tensor:
    """Causal attention of every sequence of one packed row in one kernel (torch's varlen_attn): query,
    key, value (1, heads, tokens, head_dim) in, (1, tokens, heads, head_dim) out. The sequence bounds come
    from the host's lengths (a copy to the device, never a wait)."""
    from torch.nn.attention.varlen import varlen_attn  # CUDA only: imported where it runs

    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(query.device, non_blocking=True)
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (tokens, heads, head_dim)
    out = varlen_attn(q, k, v, bounds, bounds, max(lengths), max(lengths), scale=scaling, window_size=(-1, 0),
                      enable_gqa=k.shape[1] != q.shape[1])
    return out[None]


def use_per_example_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to `per_example_attention`; True if it did.

    Models on another implementation (eager for softcapping, flash-attention, a model that does not
    route attention through transformers' interface) are left as they are: still correct, as the
    block-diagonal mask keeps packed examples apart, only slower.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, per_example_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the fallback path gets the mask SDPA would get
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def use_packed_alibi(model: nn.Module) -> bool:
    """Let an ALiBi model (BLOOM) take a packed row: True if it is one. Its attention is then masked
    per sequence (core.loss.block_causal_mask), and its ALiBi biases are built from each token's position
    within its own sequence, read from that mask: what transformers builds from a padded batch's 2-D mask,
    where a sequence's positions also start at 0. A 2-D mask (padding, generation) is built as before."""
    base = model.base_model
    build = getattr(base, "build_alibi_tensor", None)
    if build is None:
        return False
    build = getattr(build, "padded", build)  # switched once already: keep the original

    def alibi(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        one_packed_row = attention_mask.dim() == 4 and attention_mask.shape[0] == 1 and attention_mask.is_floating_point()
        if not (one_packed_row and attention_mask.shape[-1] == attention_mask.shape[-2]):
            return build(attention_mask, num_heads, dtype)
        slopes = build(attention_mask.new_ones(1, 2), num_heads, torch.float32)[:, 0, 1]  # each head's slope x 1
        positions = (attention_mask[0, 0] == 0).sum(-1) - 1  # a token sees its sequence up to itself
        return (slopes[:, None, None] * positions[None, None, :]).to(dtype)

    alibi.padded = build
    base.build_alibi_tensor = alibi
    return True


@torch.no_grad()
def packing_gap(model: nn.Module, examples: list[Example], pad: Callable[[list[Example]], Batch], bf16: bool = False) -> float:
    """Relative difference between the loss of `examples` packed in one row and padded in rows (in the
    training's precision): float rounding when the model keeps packed sequences apart, far more when
    one example sees another."""
    was_training = model.training
    model.eval()  # no dropout: both layouts must see the same function
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        padded, packed = (loss_sum(model, {key: tensor.to(device) for key, tensor in collate(examples).items()})
                          for collate in (pad, pack_batch))
    model.train(was_training)
    return float((packed - padded).abs() / padded.abs().clamp(min=1e-12))


def enable(model: nn.Module, examples: list[Example], pad: Callable[[list[Example]], Batch], max_tokens: int,
           bf16: bool = False) -> str | None:
    """Make `model` ready for packed rows and check it on the first examples that fit in one pass of
    `max_tokens` (at least two: packing is about keeping examples apart), so the check costs no more
    memory than training; None if packing is exact for this model, else why not (and the model is
    left as it was)."""
    if "position_ids" not in forward_accepts(type(model)) and not use_packed_alibi(model):
        return f"{type(model).__name__} takes no position ids and has no ALiBi, so packed examples cannot be kept apart"
    attention = model.config._attn_implementation
    switched = "position_ids" in forward_accepts(type(model)) and use_per_example_attention(model)
    n = 2
    while n < len(examples) and sum(len(e["input_ids"]) for e in examples[: n + 1]) <= max_tokens:
        n += 1
    gap = packing_gap(model, examples[:n], pad, bf16)
    if gap > PACKING_TOLERANCE:
        if switched:
            model.set_attn_implementation(attention)
        return (f"this model's attention does not keep packed examples apart (their loss differs from the "
                f"padded one by {gap:.1e}, relative)")
    return None
