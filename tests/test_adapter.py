"""A delta as a PEFT BEFT adapter (python -m bitfit.export.adapter), and such an adapter read back as a delta.
peft is a test dependency only: the export never imports it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import BeftConfig, PeftModel, get_peft_model
from test_merge import files
from test_train import saved
from transformers import AutoModelForCausalLM

import generate
from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.export import adapter, merge
from bitfit.model.delta import apply_delta, read_delta, save_delta
from tiny import tiny_bloom, tiny_llama

REPO = Path(__file__).resolve().parent.parent
IDS = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
LINEAR_ONLY = {tiny_llama: "all", tiny_bloom: "query_key_value|dense"}  # BLOOM's LayerNorm biases left out


def base_and_delta(make_model, folder: Path, which: str, seed: int = 1) -> tuple[str, Path]:
    """A saved tiny base (saved once per folder), and a delta on it that moves the selected biases by
    random amounts (one per seed)."""
    base_dir = str(folder / "base") if (folder / "base").is_dir() else saved(make_model, folder / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model, which))
    flat.values.add_(0.1 * torch.randn(flat.values.shape, generator=torch.Generator().manual_seed(seed)))
    path = folder / f"delta-{seed}.safetensors"
    save_delta(str(path), model, flat, base_model=base_dir, added=added, selection=which)
    return base_dir, path


def tuned_logits(base_dir: str, delta: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_delta(model, delta)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_bloom])
def test_an_exported_adapter_loads_in_peft_to_the_logits_of_base_plus_delta(make_model, tmp_path):
    base_dir, delta = base_and_delta(make_model, tmp_path, LINEAR_ONLY[make_model])
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BEFT" and config["base_model_name_or_path"] == base_dir
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        found = peft_model(IDS).logits
    torch.testing.assert_close(found, tuned_logits(base_dir, str(delta)), rtol=0, atol=1e-5)


def test_layernorm_biases_go_into_modules_peft_saves_whole_and_load_to_the_tuned_logits(tmp_path):
    base_dir, delta = base_and_delta(tiny_bloom, tmp_path, "all")  # BLOOM trains its LayerNorm biases too
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "transformer.h.0.input_layernorm" in config["modules_to_save"] and "transformer.ln_f" in config["modules_to_save"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, tuned_logits(base_dir, str(delta)), rtol=0, atol=1e-5)
    # Read back as a delta, the whole values are changes again: the same model as the delta gives.
    torch.testing.assert_close(tuned_logits(base_dir, str(tmp_path / "adapter")), tuned_logits(base_dir, str(delta)),
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_export_neither_imports_peft_nor_writes_into_a_folder_that_holds_anything(tmp_path):
    _, delta = base_and_delta(tiny_llama, tmp_path, "all")
    code = ("import sys; from bitfit.export import adapter; "
            f"code = adapter.main(['--delta', {str(delta)!r}, '--out', {str(tmp_path / 'adapter')!r}]); "
            "assert 'peft' not in sys.modules, 'peft was imported'; sys.exit(code)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True).returncode == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    before = files(tmp_path / "mine")
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "mine")]) == 2
    assert files(tmp_path / "mine") == before


def test_an_exported_adapter_reads_back_as_the_same_delta_and_base(tmp_path):
    base_dir, delta = base_and_delta(tiny_llama, tmp_path, "all")
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter")]) == 0
    (tensors, metadata), (back, back_metadata) = read_delta(str(delta)), read_delta(str(tmp_path / "adapter"))
    # The fingerprint rides along (the base is still checked); the digest is each file's own, checked on reading it.
    assert back_metadata == {key: value for key, value in metadata.items() if key != "digest"}
    assert back.keys() == tensors.keys() and all(torch.equal(back[name], tensors[name]) for name in tensors)


def test_an_exported_adapter_changed_after_it_was_written_is_refused_by_its_digest(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, delta = base_and_delta(tiny_llama, tmp_path, "all")
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter")]) == 0
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as file:
        tensors, metadata = {name: file.get_tensor(name) for name in file.keys()}, file.metadata()
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first] + 1}, str(weights), metadata=metadata)
    with pytest.raises(BitfitError, match="its contents do not match its digest"):
        read_delta(str(tmp_path / "adapter"))


def test_generate_and_merge_take_an_adapter_folder_as_the_delta(tmp_path, capsys):
    base_dir, delta = base_and_delta(tiny_llama, tmp_path, "all")
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter")]) == 0
    assert generate.main(["--delta", str(tmp_path / "adapter"), "-n", "2", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("TUNED:") == 2
    assert merge.main(["--delta", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(IDS).logits
    torch.testing.assert_close(merged, tuned_logits(base_dir, str(delta)), rtol=0, atol=1e-5)


def test_an_adapter_trained_by_peft_applies_as_a_delta_without_a_fingerprint(tmp_path):
    base_dir = saved(tiny_llama, tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                BeftConfig(target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "beft_bias" in name:
                param.copy_(torch.randn(param.shape))
        expected = peft_model.eval()(IDS).logits
    peft_model.save_pretrained(tmp_path / "theirs")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    metadata = apply_delta(model, str(tmp_path / "theirs"))
    assert metadata["base_fingerprint"] == "" and len(json.loads(metadata["added_biases"])) == 4  # 2 layers x 2
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)


def test_an_export_against_a_base_that_cannot_be_read_is_a_one_line_error(tmp_path, capsys):
    _, delta = base_and_delta(tiny_llama, tmp_path, "all")
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter"), "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"error: no such model folder: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "adapter").exists()
