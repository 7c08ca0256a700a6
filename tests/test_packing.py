"""Packed rows: the collator, per-example attention, and the check that packed examples stay apart."""

from functools import partial

import torch

import bitfit.core.loss
from bitfit.core.loss import input_tokens, label_tokens
from bitfit.data import packing
from bitfit.data.collate import pad_batch
from bitfit.data.examples import encode
from bitfit.data.packing import (
    NAME,
    pack_batch,
    segment_lengths,
    use_per_example_attention,
)
from bitfit.data.tasks import builtin_records
from tiny import step_loss_and_gradient, tiny_bloom, tiny_llama, tiny_tokenizer


def test_pack_batch_lays_examples_end_to_end_with_positions_restarting_and_no_first_labels():
    batch = pack_batch([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                        {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [8, 9]}])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: nothing is padding
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # 8 would be predicted from 7, the end of another example: not a target, as it is not one alone either
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_a_packed_row_gives_the_loss_and_gradient_of_the_padded_batch():
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    padded = pad_batch(examples, tokenizer.pad_token_id, "right")
    packed = pack_batch(examples)
    assert label_tokens(packed) == label_tokens(padded)
    assert input_tokens(packed) == input_tokens(padded) < padded["input_ids"].numel()
    (loss_padded, grad_padded), (loss_packed, grad_packed) = (step_loss_and_gradient(tiny_llama(), batch)
                                                              for batch in (padded, packed))
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=0, atol=1e-6)


def test_the_packing_check_passes_a_model_that_keeps_examples_apart_and_catches_one_that_does_not(monkeypatch):
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    pad = partial(pad_batch, pad_token_id=tokenizer.pad_token_id, padding_side="right")
    model = tiny_llama()
    assert packing.enable(model, examples, pad, max_tokens=256) is None
    assert model.config._attn_implementation == NAME

    def leaky_pack(examples):  # one unbroken run of positions: plain causal attention across the whole row
        batch = pack_batch(examples)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
        return batch

    monkeypatch.setattr(packing, "pack_batch", leaky_pack)
    assert packing.packing_gap(model, examples, pad) > 10 * packing.PACKING_TOLERANCE
    model = tiny_llama()
    assert "does not keep packed examples apart" in packing.enable(model, examples, pad, max_tokens=256)
    assert model.config._attn_implementation == "sdpa"  # refused: the model is left as it was


def test_an_alibi_model_packed_gives_the_loss_and_gradient_of_its_padded_batch():
    tokenizer = tiny_tokenizer(padding_side="left")  # BLOOM's side
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    padded = pad_batch(examples, pad_token_id=tokenizer.pad_token_id, padding_side="left")
    model = tiny_bloom()
    assert packing.use_packed_alibi(model)
    padded_loss, padded_gradient = step_loss_and_gradient(model, padded)
    packed_loss, packed_gradient = step_loss_and_gradient(model, pack_batch(examples))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(packed_gradient, padded_gradient, rtol=0, atol=1e-6)


def test_an_alibi_model_passes_the_packing_check_and_one_whose_sequences_would_meet_does_not(monkeypatch):
    tokenizer = tiny_tokenizer(padding_side="left")
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    pad = partial(pad_batch, pad_token_id=tokenizer.pad_token_id, padding_side="left")
    assert packing.enable(tiny_bloom(), examples, pad, max_tokens=256) is None
    whole_row = lambda position_ids, dtype: torch.zeros(1, 1, position_ids.shape[1], position_ids.shape[1], dtype=dtype)
    monkeypatch.setattr(bitfit.core.loss, "block_causal_mask", whole_row)  # every token sees the whole row
    assert "does not keep packed examples apart" in packing.enable(tiny_bloom(), examples, pad, max_tokens=256)


def test_a_model_without_position_ids_or_alibi_cannot_be_packed():
    tokenizer = tiny_tokenizer(padding_side="left")
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    pad = partial(pad_batch, pad_token_id=tokenizer.pad_token_id, padding_side="left")
    model = tiny_bloom()
    model.base_model.build_alibi_tensor = None  # as a model that neither takes positions nor builds ALiBi
    assert "BloomForCausalLM takes no position ids and has no ALiBi" in packing.enable(model, examples, pad, max_tokens=256)


def loss_and_gradient(batch, per_example: bool):
    model = tiny_llama()
    if per_example:
        assert use_per_example_attention(model)
    return step_loss_and_gradient(model, batch)


def record_splits(monkeypatch) -> list[list[int]]:
    """The segment lengths of every split the per-example path makes: proof that it really ran."""
    splits = []
    monkeypatch.setattr(packing, "segment_lengths", lambda ids: splits.append(segment_lengths(ids)) or splits[-1])
    return splits


def test_a_sequence_starts_wherever_the_positions_do_not_continue():
    assert segment_lengths(torch.tensor([0, 1, 2, 0, 1, 0])) == [3, 2, 1]
    assert segment_lengths(torch.arange(5)) == [5]
    assert segment_lengths(torch.tensor([0, 0, 0, 1, 2])) == [1, 1, 3]  # left padding, positions clamped at 0


def test_per_example_attention_gives_the_loss_and_gradient_of_the_masked_square(monkeypatch):
    examples, _ = encode(builtin_records("train")[:8], tiny_tokenizer())
    packed = pack_batch(examples)
    splits = record_splits(monkeypatch)
    (loss_masked, grad_masked), (loss_split, grad_split) = (loss_and_gradient(packed, per_example)
                                                            for per_example in (False, True))
    assert splits == [[len(example["input_ids"]) for example in examples]] * 2  # the 8 examples, in both layers
    torch.testing.assert_close(loss_split, loss_masked, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_split, grad_masked, rtol=0, atol=1e-6)


def test_a_padded_batch_computes_exactly_what_sdpa_computes_after_the_switch():
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    for side in ("left", "right"):
        padded = pad_batch(examples, tokenizer.pad_token_id, side)
        (loss_sdpa, grad_sdpa), (loss_switched, grad_switched) = (loss_and_gradient(padded, per_example)
                                                                  for per_example in (False, True))
        assert torch.equal(loss_switched, loss_sdpa) and torch.equal(grad_switched, grad_sdpa)


def test_generation_with_a_kv_cache_is_unchanged_by_the_switch():
    prompt = tiny_tokenizer()("Human: sort 3 1 2\n\nAssistant: ", return_tensors="pt")
    outputs = []
    for switch in (False, True):
        model = tiny_llama()
        if switch:
            assert use_per_example_attention(model)
        outputs.append(model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1])


def test_a_model_not_running_sdpa_is_left_as_it_is():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not use_per_example_attention(model)
    assert model.config._attn_implementation == "eager" != NAME


def test_a_single_padded_row_keeps_its_padding_out_of_the_real_tokens_attention(monkeypatch):
    # One row, so the split path runs: its clamped pad positions do not continue, so each pad token is
    # a sequence of its own and the real tokens attend only to each other, as under the padding mask.
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:1], tokenizer)
    splits = record_splits(monkeypatch)
    for side in ("left", "right"):
        padded = pad_batch(examples, tokenizer.pad_token_id, side, multiple_of=64)
        assert padded["attention_mask"].sum() < padded["attention_mask"].numel()
        (loss_sdpa, grad_sdpa), (loss_split, grad_split) = (loss_and_gradient(padded, per_example)
                                                            for per_example in (False, True))
        torch.testing.assert_close(loss_split, loss_sdpa, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_split, grad_sdpa, rtol=0, atol=1e-6)
    assert len(splits) == 4 and all(len(lengths) > 1 for lengths in splits)  # 2 sides x 2 layers, pads split off


def test_the_one_varlen_call_gives_the_loss_and_gradient_of_the_padded_batch(monkeypatch):
    """The CUDA path's plumbing (layouts, sequence bounds, grouped kv heads, scale) checked on the CPU, with
    a reference of torch's varlen_attn (flash attention, CUDA only) made of one causal SDPA per sequence."""
    def reference_varlen_attn(q, k, v, bounds_q, bounds_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                              enable_gqa=False):
        assert window_size == (-1, 0) and torch.equal(bounds_q, bounds_k) and bounds_q.dtype == torch.int32
        assert max_q == max(bounds_q.diff().tolist())
        outputs = [torch.nn.functional.scaled_dot_product_attention(
            *(x[start:end].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale, enable_gqa=enable_gqa)
            for start, end in zip(bounds_q[:-1].tolist(), bounds_q[1:].tolist())]
        return torch.cat([output.transpose(0, 1) for output in outputs])

    import torch.nn.attention.varlen

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", reference_varlen_attn)
    calls = []
    monkeypatch.setattr(packing, "takes_varlen", lambda query, kwargs: calls.append(1) or True)
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    padded_loss, padded_gradient = loss_and_gradient(pad_batch(examples, pad_token_id=tokenizer.pad_token_id), False)
    packed_loss, packed_gradient = loss_and_gradient(pack_batch(examples), True)
    assert calls  # the varlen path ran
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(packed_gradient, padded_gradient, rtol=0, atol=1e-6)


def test_only_cuda_in_bf16_or_fp16_takes_the_varlen_call():
    assert not packing.takes_varlen(torch.zeros(1, 2, 3, 4), {})
    assert not packing.takes_varlen(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), {})  # the CPU: no flash attention
