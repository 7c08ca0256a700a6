import errno
import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BloomConfig, BloomForCausalLM

from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.model.delta import (
    METADATA,
    SAMPLES_1,
    apply_delta,
    content_digest,
    fingerprint,
    read_delta,
    save_delta,
)
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


def rewritten(path, tmp_path, tensors: dict | None = None, **metadata) -> str:
    """A copy of the delta at `path` with some tensors and metadata replaced (a None value drops the key), its
    digest made anew, as by someone who knows how: the delta's other checks must catch what is wrong."""
    with safe_open(str(path), framework="pt") as file:
        old_tensors, old_metadata = {name: file.get_tensor(name) for name in file.keys()}, file.metadata()
    out = tmp_path / "edited.safetensors"
    tensors = {**old_tensors, **(tensors or {})}
    metadata = {key: value for key, value in {**old_metadata, **metadata}.items() if value is not None}
    if "digest" in metadata:
        metadata["digest"] = content_digest(tensors, metadata)
    save_file(tensors, str(out), metadata=metadata)
    return str(out)


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


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
    assert metadata["format"] == "bitfit-delta/2"
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


def test_the_version_1_fingerprint_samples_tensors_of_more_than_2_to_the_24_values():
    big = torch.zeros(2**24 + 3)  # an embedding table's size: float sample positions would overrun it
    before = fingerprint([("embed.weight", big)], samples=SAMPLES_1)
    big[-1] = 1.0  # the last value is sampled
    assert fingerprint([("embed.weight", big)], samples=SAMPLES_1) != before


def test_a_file_that_is_no_bitfit_delta_is_refused(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(BitfitError, match="is not a bitfit delta"):
        apply_delta(tiny_bloom(), path)


NAN, INF = torch.zeros(32), torch.zeros(32)
NAN[3], INF[5] = float("nan"), float("-inf")
DOWN = "model.layers.0.mlp.down_proj.bias"  # an added bias of tiny_llama, 32 values


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({DOWN: NAN}, f"{DOWN} holds NaN or inf values"),
        ({DOWN: INF}, f"{DOWN} holds NaN or inf values"),
        ({"model.embed_tokens.weight": torch.zeros(400, 32)}, "model.embed_tokens.weight is not a bias"),
        ({DOWN: torch.zeros(32, 1)}, rf"{DOWN} has shape \(32, 1\), but a bias is 1-D"),
        ({DOWN: torch.zeros(32, dtype=torch.float16)}, f"{DOWN} is torch.float16, but the delta's dtype is float32"),
    ],
)
def test_a_delta_holds_finite_1_d_fp32_biases_only(tensors, message, tmp_path):
    tuned(tiny_llama, tmp_path / "delta.safetensors")
    bad = rewritten(tmp_path / "delta.safetensors", tmp_path, tensors)
    with pytest.raises(BitfitError, match=f"{re.escape(bad)} is not a valid bitfit delta: {message}"):
        read_delta(bad)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        *(({key: None}, f"its metadata lacks {key}") for key in METADATA if key != "format"),
        ({"added_biases": "model.layers.0.mlp.down_proj.bias"}, "added_biases must be a JSON list of bias names"),
        ({"added_biases": '{"model.layers.0.mlp.down_proj.bias": 1}'}, "added_biases must be a JSON list of bias names"),
        ({"added_biases": "[1, 2]"}, "added_biases must be a JSON list of bias names"),
        ({"added_biases": '["model.embed_tokens.weight"]'}, "added_biases must be a JSON list of bias names"),
        ({"base_fingerprint": "1234"}, "base_fingerprint must be 16 hex digits"),
        ({"dtype": "float16"}, "dtype must be 'float32'"),
        ({"base_model": ""}, "base_model is empty"),
    ],
)
def test_a_delta_with_missing_or_malformed_metadata_is_refused_naming_the_file(metadata, message, tmp_path):
    tuned(tiny_llama, tmp_path / "delta.safetensors")
    bad = rewritten(tmp_path / "delta.safetensors", tmp_path, **metadata)
    with pytest.raises(BitfitError, match=f"{re.escape(bad)} is not a valid bitfit delta: {message}"):
        apply_delta(tiny_llama(), bad)


def test_a_delta_with_a_nan_or_inf_is_never_saved(tmp_path):
    model = tiny_llama()
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model))
    with torch.no_grad():
        flat.values.add_(0.1)
        flat.values[7] = float("inf")
    with pytest.raises(BitfitError, match="refusing to save a delta with NaN or inf values"):
        save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model="tiny_llama", added=added)
    assert list(tmp_path.iterdir()) == []


def test_a_loop_that_clears_gradients_with_optimizer_zero_grad_trains_nothing_and_its_delta_is_refused(tmp_path):
    model = tiny_bloom()
    flat = FlatBiases(model, select_biases(model))
    optimizer = torch.optim.AdamW([flat.param], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()  # the library habit: sets the flat gradient to None, so step() skips it
        model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
        optimizer.step()
    with pytest.raises(BitfitError, match=r"the delta is all zeros: no bias moved.*FlatBiases\.zero_grad\(\)"):
        save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model="tiny_bloom", added=[])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "crash"])
def test_a_full_disk_or_a_crash_while_saving_leaves_the_earlier_delta_as_it_was_and_no_temporary_file(
    failure, tmp_path, monkeypatch
):
    path = tmp_path / "delta.safetensors"
    model, flat, added = tuned(tiny_llama, path)
    earlier = path.read_bytes()
    with torch.no_grad():
        flat.values.add_(0.1)  # trained on; this delta differs from the one on the disk

    def fail(fd):
        raise failure

    monkeypatch.setattr(os, "fsync", fail)  # the write went into the page cache; the disk refuses it
    with pytest.raises(BitfitError if isinstance(failure, OSError) else KeyboardInterrupt) as raised:
        save_delta(str(path), model, flat, base_model="tiny_llama", added=added)
    monkeypatch.undo()
    if isinstance(failure, OSError):
        assert re.fullmatch(rf"cannot write {re.escape(str(path))}: the disk is full \(.+ free there\)", str(raised.value))
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]
    assert path.read_bytes() == earlier


def test_a_saved_delta_gets_the_permissions_of_any_new_file_of_the_user(tmp_path):
    umask = os.umask(0o027)
    try:
        tuned(tiny_llama, tmp_path / "delta.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "delta.safetensors").stat().st_mode) == 0o640  # not safetensors' 0600


@pytest.mark.parametrize("shape", [(64, 1), (65,)])
def test_an_added_bias_of_another_shape_is_refused_before_anything_changes(shape, tmp_path):
    tuned(tiny_llama, tmp_path / "delta.safetensors")
    name = "model.layers.0.mlp.gate_proj.bias"  # gate_proj has 64 outputs: (64, 1) has the right number of values
    bad = rewritten(tmp_path / "delta.safetensors", tmp_path, {name: torch.ones(shape)})
    model = tiny_llama()
    before = state(model)
    with pytest.raises(BitfitError, match=re.escape(name)):
        apply_delta(model, bad)
    assert unchanged(model, before)


def test_a_bias_free_model_that_already_holds_the_delta_is_refused(tmp_path):
    path = str(tmp_path / "delta.safetensors")
    tuned(tiny_llama, path)
    model = tiny_llama()
    apply_delta(model, path)
    before = state(model)
    with pytest.raises(BitfitError, match="a bias bitfit added, is not zero in this model: does it already hold a delta"):
        apply_delta(model, path)
    assert unchanged(model, before)


def test_a_base_changed_in_one_value_outside_the_old_samples_is_refused(tmp_path):
    path = str(tmp_path / "delta.safetensors")
    tuned(tiny_llama, path)
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.embed_tokens.weight.view(-1)[5] += 1.0  # 12,800 values, sampled at 0, 12, 25, ...
    sampled = [fingerprint(m.named_parameters(), samples=SAMPLES_1) for m in (changed, tiny_llama())]
    assert sampled[0] == sampled[1]  # the bitfit-delta/1 fingerprint cannot see the change
    before = state(changed)
    with pytest.raises(BitfitError, match="fingerprint is .* but this delta was trained on 'tiny_llama'"):
        apply_delta(changed, path)
    assert unchanged(changed, before)


def test_a_version_1_delta_still_applies_to_its_base(tmp_path):
    model, _, _ = tuned(tiny_llama, tmp_path / "delta.safetensors")
    v1 = rewritten(tmp_path / "delta.safetensors", tmp_path, format="bitfit-delta/1",
                   base_fingerprint=fingerprint(tiny_llama().named_parameters(), samples=SAMPLES_1))
    base = tiny_llama()
    apply_delta(base, v1)
    torch.testing.assert_close(logits(base), logits(model), rtol=0, atol=1e-6)


def test_the_version_1_fingerprint_is_the_one_bitfit_delta_1_files_hold():
    params = [("b.weight", torch.linspace(-3, 3, 5000).reshape(50, 100)), ("a.bias", torch.arange(7.0))]
    assert fingerprint(params, samples=SAMPLES_1) == "8b9cbbff4654c10e"  # what the bitfit-delta/1 code computed
