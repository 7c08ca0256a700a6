import torch

from bitfit import attention
from bitfit.attention import NAME, segment_lengths, use_per_example_attention
from bitfit.collate import pack_batch, pad_batch
from bitfit.data import encode
from bitfit.tasks import builtin_records
from tiny import tiny_llama, tiny_tokenizer, window_loss_and_gradient


def loss_and_gradient(batch, per_example: bool):
    model = tiny_llama()
    if per_example:
        assert use_per_example_attention(model)
    return window_loss_and_gradient(model, batch)


def record_splits(monkeypatch) -> list[list[int]]:
    """The segment lengths of every split the per-example path makes: proof that it really ran."""
    splits = []
    monkeypatch.setattr(attention, "segment_lengths", lambda ids: splits.append(segment_lengths(ids)) or splits[-1])
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
