import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from bitfit.biases import add_missing_biases, select_biases
from bitfit.delta import apply_delta, save_delta
from bitfit.errors import BitfitError
from bitfit.flat import FlatBiases
from bitfit.merge import main, merge
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer

INPUT_IDS = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))


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
