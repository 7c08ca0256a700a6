"""Attention for packed rows: each example's attention computed on its own, not as a masked square.

A packed row (collate.pack_batch) holds several examples end to end. transformers' SDPA path keeps
them apart with a block-diagonal mask over the whole row, so it computes row_length^2 scores and
throws away all but the blocks on the diagonal: for 8 examples of ~27 tokens, 7/8 of the work. Here
the row is split where the positions restart and each example runs causal SDPA on its own: the same
numbers (up to float rounding) in about half the attention time on a CPU; the row's mask is still
built, once per forward pass, but never read.

Everything else (a padded batch, generation with a KV cache, a sliding window) goes to transformers'
own SDPA function unchanged, so a model switched to this attention computes what it computed before.
"""

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "bitfit_per_example"  # the attention implementation's name in transformers' interface


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences in one row of position ids: a new one starts wherever a position does
    not continue the previous one by +1 (the rule transformers' mask builder uses for packed rows).
    [0, 1, 2, 0, 1, 0] -> [3, 2, 1]. Reading the lengths is a host sync, once per layer.
    """
    breaks = (position_ids[1:] - position_ids[:-1] != 1).nonzero().squeeze(1) + 1
    bounds = [0, *breaks.tolist(), position_ids.numel()]
    return [end - start for start, end in zip(bounds, bounds[1:])]


def per_example_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query/key/value (batch, heads, tokens, head_dim) in,
    (batch, tokens, heads, head_dim) out. A single row without a KV cache in a causal layer with no
    sliding window is split into its sequences; anything else is plain SDPA with the given mask."""
    one_row_no_cache = query.shape[0] == 1 and key.shape[2] == query.shape[2]
    plain_causal = getattr(module, "is_causal", True) and getattr(module, "sliding_window", None) is None
    if position_ids is None or not (one_row_no_cache and plain_causal):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    lengths = segment_lengths(position_ids[0])
    outputs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
               for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outputs, dim=1), None


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
