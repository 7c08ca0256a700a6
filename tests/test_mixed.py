"""Many deltas, one batch (bitfit.infer.mixed): each row of one forward pass adds its own delta."""

import pytest
import torch
from test_adapter import base_and_delta
from test_train import saved
from transformers import AutoModelForCausalLM

import generate
from bitfit.core.errors import BitfitError
from bitfit.data.collate import pad_batch
from bitfit.infer.mixed import DeltaTable, generate_many
from bitfit.model.delta import apply_delta
from bitfit.run.evaluate import answers
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20, 21, 22]]


def left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompts]
    return pad_batch(rows, pad_token_id=0, padding_side="left")


@pytest.fixture(params=[tiny_llama, tiny_bloom], ids=["llama, added biases", "bloom, its own biases"])
def base_with_two_deltas(request, tmp_path):
    base_dir, first = base_and_delta(request.param, tmp_path, "all", seed=1)
    _, second = base_and_delta(request.param, tmp_path, "all", seed=2)
    return base_dir, [str(first), str(second)]


def alone(base_dir: str, delta: str | None) -> torch.nn.Module:
    """The base with one delta applied the ordinary way (or none)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if delta:
        apply_delta(model, delta)
    return model


def test_a_mixed_batch_gives_each_row_the_logits_of_its_delta_applied_alone(base_with_two_deltas):
    base_dir, deltas = base_with_two_deltas
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    table = DeltaTable(model, deltas)
    rows = [0, 1, 2, 1]  # the base, the first delta, the second, the first again
    batch = left_padded(PROMPTS)
    with torch.no_grad(), table.use(rows):
        mixed = model(**batch).logits
    for i, row in enumerate(rows):
        with torch.no_grad():
            expected = alone(base_dir, [None, *deltas][row])(**{k: v[i : i + 1] for k, v in batch.items()}).logits
        keep = batch["attention_mask"][i].bool()  # padding positions are nobody's answer
        torch.testing.assert_close(mixed[i, keep], expected[0, keep], rtol=0, atol=1e-5)
    table.remove()
    with torch.no_grad():  # without the hooks, the model is the base again, unchanged
        torch.testing.assert_close(model(**batch).logits, alone(base_dir, None)(**batch).logits, rtol=0, atol=0)


def test_greedy_answers_of_a_mixed_batch_equal_each_delta_generating_alone(base_with_two_deltas):
    base_dir, deltas = base_with_two_deltas
    tokenizer = tiny_tokenizer(padding_side="left")
    requests = [(ids, delta) for ids in PROMPTS for delta in (None, *deltas)]
    mixed = generate_many(alone(base_dir, None), tokenizer, requests, max_new_tokens=6)
    for (ids, delta), text in zip(requests, mixed):
        assert text == answers(alone(base_dir, delta), tokenizer, [ids], torch.device("cpu"), False, 6)[0]


def test_a_delta_of_another_base_is_refused_before_any_row_runs(tmp_path):
    base_dir, delta = base_and_delta(tiny_llama, tmp_path, "all")
    other = AutoModelForCausalLM.from_pretrained(saved(tiny_bloom, tmp_path / "other"))
    with pytest.raises(BitfitError, match="this delta was trained on"):
        DeltaTable(other, [str(delta)])
    assert not other._forward_hooks and all(not m._forward_hooks for m in other.modules())


def test_generate_py_compares_the_base_and_several_runs_in_one_batch(tmp_path, capsys):
    base_dir, first = base_and_delta(tiny_llama, tmp_path, "all", seed=1)
    _, second = base_and_delta(tiny_llama, tmp_path, "all", seed=2)
    assert generate.main(["--delta", str(first), "--delta", str(second), "-n", "3", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert f"A = {first}" in out and f"B = {second}" in out
    assert out.count("BASE:") == out.count("A:") == out.count("B:") == 3
    assert "correct: base " in out and ", A " in out and ", B " in out


def test_a_gpt2_delta_on_conv1d_layers_mixes_per_row_too(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bitfit.core.biases import select_biases
    from bitfit.core.flat import FlatBiases
    from bitfit.model.delta import save_delta

    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    flat = FlatBiases(model, select_biases(model))
    flat.values.add_(0.1 * torch.randn(flat.values.shape, generator=torch.Generator().manual_seed(0)))
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=str(tmp_path / "gpt2"), added=[])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    table = DeltaTable(base, [str(tmp_path / "delta.safetensors")])
    ids = torch.tensor([PROMPTS[0], PROMPTS[0]])
    with torch.no_grad(), table.use([0, 1]):
        mixed = base(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(mixed[1], alone(str(tmp_path / "gpt2"), str(tmp_path / "delta.safetensors"))(ids[:1]).logits[0],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[0], alone(str(tmp_path / "gpt2"), None)(ids[:1]).logits[0], rtol=0, atol=1e-5)
