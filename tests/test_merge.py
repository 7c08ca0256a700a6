import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.export.merge import main, merge
from bitfit.model.delta import apply_delta, save_delta
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer

INPUT_IDS = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))


def files(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`: to check that nothing there changed."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def delta_of(make_model, path, which: str = "all") -> torch.Tensor:
    """Move the selected biases as training would, save the delta; return the tuned model's logits."""
    model = make_model()
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model, which))
    with torch.no_grad():
        noise = 0.1 * torch.randn(flat.values.shape, generator=torch.Generator().manual_seed(1))
        flat.values.add_(noise if flat.mask is None else noise * flat.mask)
        save_delta(str(path), model, flat, base_model=make_model.__name__, added=added, selection=which)
        return model(INPUT_IDS).logits


@pytest.mark.parametrize(("make_model", "which"), [(tiny_bloom, "all"), (tiny_llama, "all"), (tiny_llama, "reduced")])
def test_a_merged_folder_loads_with_plain_transformers_to_the_tuned_logits(make_model, which, tmp_path):
    tuned_logits = delta_of(make_model, tmp_path / "delta.safetensors", which)
    merge(make_model(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no bitfit code involved
    with torch.no_grad():
        torch.testing.assert_close(plain(INPUT_IDS).logits, tuned_logits, rtol=0, atol=1e-6)


def test_a_llama_with_added_biases_merges_into_a_standard_llama_config(tmp_path):
    delta_of(tiny_llama, tmp_path / "delta.safetensors")
    merge(tiny_llama(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["attention_bias"] is True and config["mlp_bias"] is True


def test_an_architecture_that_cannot_hold_the_added_biases_is_refused(tmp_path):
    def tiny_mistral():
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2))

    delta_of(tiny_mistral, tmp_path / "delta.safetensors")
    with pytest.raises(BitfitError, match="'mistral' model has no place for the biases bitfit added"):
        merge(tiny_mistral(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_the_merge_command_writes_model_and_tokenizer(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_bloom().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = tiny_bloom()
    flat = FlatBiases(model, select_biases(model))
    flat.values.data.add_(0.05)
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=str(base), added=[])

    assert main(["--delta", str(tmp_path / "delta.safetensors"), "--out", str(tmp_path / "merged")]) == 0
    assert "from_pretrained(" in capsys.readouterr().out
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    fresh = tiny_bloom()
    apply_delta(fresh, str(tmp_path / "delta.safetensors"))
    torch.testing.assert_close(reloaded.transformer.h[0].mlp.dense_h_to_4h.bias, fresh.transformer.h[0].mlp.dense_h_to_4h.bias)


def test_a_merge_into_an_empty_folder_is_allowed(tmp_path):
    delta_of(tiny_bloom, tmp_path / "delta.safetensors")
    (tmp_path / "merged").mkdir()
    merge(tiny_bloom(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("victim", ["the base model's folder", "a run folder", "a file"])
def test_a_merge_never_writes_over_anything_already_there(victim, tmp_path):
    (tmp_path / "run").mkdir()
    delta_of(tiny_bloom, tmp_path / "run" / "delta.safetensors")
    tiny_bloom().save_pretrained(tmp_path / "base")
    (tmp_path / "notes.txt").write_text("my notes")
    out = {"the base model's folder": "base", "a run folder": "run", "a file": "notes.txt"}[victim]
    before = files(tmp_path)
    with pytest.raises(BitfitError, match="is a file|is a folder that is not empty"):
        merge(tiny_bloom(), str(tmp_path / "run" / "delta.safetensors"), str(tmp_path / out))
    assert files(tmp_path) == before


def test_the_merged_folder_and_its_files_get_the_permissions_of_any_new_ones_of_the_user(tmp_path):
    delta_of(tiny_llama, tmp_path / "delta.safetensors")
    umask = os.umask(0o027)
    try:
        merge(tiny_llama(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"), tiny_tokenizer())
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()} == {0o640}  # not safetensors' 0600


def test_a_tuned_model_with_nan_logits_is_refused_and_nothing_is_written(tmp_path):
    def nan_llama():
        model = tiny_llama()
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")  # every logit becomes NaN; the biases stay finite
        return model

    delta_of(nan_llama, tmp_path / "delta.safetensors")
    with pytest.raises(BitfitError, match="the model tuned by .*delta.safetensors is broken: its logits hold NaN or inf"):
        merge(nan_llama(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


def test_a_written_folder_that_does_not_reload_to_the_tuned_logits_is_removed(tmp_path, monkeypatch):
    delta_of(tiny_llama, tmp_path / "delta.safetensors")
    real = AutoModelForCausalLM.from_pretrained

    def reload_with_a_nan(*args, **kwargs):  # as if a weight came back from the disk as NaN
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", reload_with_a_nan)
    with pytest.raises(BitfitError, match=r"does not reproduce the tuned logits \(max difference nan\)"):
        merge(tiny_llama(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


def test_a_full_disk_while_writing_the_merged_folder_leaves_nothing_behind(tmp_path, monkeypatch):
    delta_of(tiny_llama, tmp_path / "delta.safetensors")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(BitfitError, match="cannot write .*merged: the disk is full"):
        merge(tiny_llama(), str(tmp_path / "delta.safetensors"), str(tmp_path / "merged"))
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]
