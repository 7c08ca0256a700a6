import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BloomConfig, BloomForCausalLM

from bitfit.biases import add_missing_biases, select_biases
from bitfit.delta import apply_delta, fingerprint, save_delta
from bitfit.errors import BitfitError
from bitfit.flat import FlatBiases
from tiny import tiny_bloom, tiny_llama

INPUT_IDS = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))


def tuned(make_model, path):
    """A model whose biases moved (as training moves them), and its delta saved at `path`."""
    model = make_model()
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model))
    with torch.no_grad():
        flat.values.add_(0.1 * torch.randn(flat.values.shape, generator=torch.Generator().manual_seed(1)))
    save_delta(str(path), model, flat, base_model=make_model.__name__, added=added)
    return model, flat, added


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


@pytest.mark.parametrize("make_model", [tiny_bloom, tiny_llama])
def test_a_fresh_base_plus_the_delta_gives_the_tuned_logits(make_model, tmp_path):
    model, _, _ = tuned(make_model, tmp_path / "delta.safetensors")
    base = make_model()
    assert not torch.allclose(logits(base), logits(model))
    apply_delta(base, str(tmp_path / "delta.safetensors"))
    torch.testing.assert_close(logits(base), logits(model), rtol=0, atol=1e-6)


def test_the_delta_holds_only_the_trained_biases_and_its_metadata(tmp_path):
    path = tmp_path / "delta.safetensors"
    model, flat, added = tuned(tiny_llama, path)
    with safe_open(str(path), framework="pt") as file:
        names, metadata = set(file.keys()), file.metadata()
        for name in names:
            start = flat.offsets[flat.names.index(name)]
            expected = (flat.values - flat.base)[start : start + file.get_tensor(name).numel()]
            assert torch.equal(file.get_tensor(name).reshape(-1), expected)
    assert names == set(flat.names) == set(added)  # a bias-free Llama: every trained bias was added
    assert metadata["format"] == "bitfit-delta/1"
    assert metadata["base_model"] == "tiny_llama"
    assert json.loads(metadata["added_biases"]) == added
    assert metadata["dtype"] == "float32" and metadata["selection"] == "all"
    assert metadata["base_fingerprint"] == fingerprint(tiny_llama().named_parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < 0.1 * model_bytes


def test_a_delta_is_refused_by_a_model_of_another_shape(tmp_path):
    tuned(tiny_bloom, tmp_path / "delta.safetensors")
    wider = BloomForCausalLM(BloomConfig(vocab_size=400, hidden_size=48, n_layer=2, n_head=4))
    with pytest.raises(BitfitError, match=r"shape \(48,\) in this model .* trained on 'tiny_bloom'"):
        apply_delta(wider, str(tmp_path / "delta.safetensors"))


@pytest.mark.parametrize(
    ("make_tuned", "make_target", "message"),
    [
        (tiny_llama, tiny_bloom, "no linear layer to hold model.layers.0.mlp.down_proj.bias .*trained on 'tiny_llama'"),
        (tiny_bloom, tiny_llama, "no parameter transformer.h.0.input_layernorm.bias: this delta was trained on 'tiny_bloom'"),
    ],
)
def test_a_delta_is_refused_by_a_model_without_its_tensors(make_tuned, make_target, message, tmp_path):
    tuned(make_tuned, tmp_path / "delta.safetensors")
    with pytest.raises(BitfitError, match=message):
        apply_delta(make_target(), str(tmp_path / "delta.safetensors"))


@pytest.mark.parametrize("other", ["another checkpoint", "the tuned model itself"])
def test_a_delta_is_refused_by_a_base_with_another_fingerprint_and_nothing_changes(other, tmp_path):
    path = str(tmp_path / "delta.safetensors")
    model, _, _ = tuned(tiny_bloom, path)
    target = tiny_bloom(seed=1) if other == "another checkpoint" else model
    before = {name: p.clone() for name, p in target.named_parameters()}
    with pytest.raises(BitfitError, match="fingerprint is .* but this delta was trained on 'tiny_bloom'"):
        apply_delta(target, path)
    assert all(torch.equal(p, before[name]) for name, p in target.named_parameters())


def test_the_fingerprint_is_the_same_whether_the_base_is_stored_in_fp32_or_bf16():
    model = tiny_bloom()
    assert fingerprint(model.named_parameters()) == fingerprint(model.to(torch.bfloat16).named_parameters())


def test_the_fingerprint_samples_tensors_of_more_than_2_to_the_24_values():
    big = torch.zeros(2**24 + 3)  # an embedding table's size: float sample positions would overrun it
    before = fingerprint([("embed.weight", big)])
    big[-1] = 1.0  # the last value is sampled
    assert fingerprint([("embed.weight", big)]) != before


def test_a_file_that_is_no_bitfit_delta_is_refused(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(BitfitError, match="is not a bitfit delta"):
        apply_delta(tiny_bloom(), path)
