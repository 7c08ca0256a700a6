"""python -m bitfit.export.inspection: where in the network the biases moved, and how two runs differ."""

import struct
from pathlib import Path

import pytest
import torch
from test_train import saved

import train
from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.flat import FlatBiases
from bitfit.export import inspection
from bitfit.model.delta import save_delta
from tiny import tiny_bloom, tiny_llama

QUICK = ["--split", "train[:16]", "--eval-data", "none", "--lr", "1e-2"]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def bloom_with_biases(seed: int = 0) -> torch.nn.Module:
    """A tiny BLOOM whose biases are not zero, so each has a norm to be relative to."""
    model = tiny_bloom()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def run_with_known_delta(tmp_path):
    """A base folder, and a run folder whose delta is a known random change of every bias."""
    base_dir = tmp_path / "base"
    saved(bloom_with_biases, base_dir, "left")
    model = bloom_with_biases()
    flat = FlatBiases(model, select_biases(model))
    flat.values.add_(0.01 * torch.randn(flat.values.shape, generator=torch.Generator().manual_seed(1)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".bitfit-run").write_text("")
    save_delta(str(run_dir / "delta.safetensors"), model, flat, base_model=str(base_dir), added=[])
    base = bloom_with_biases()
    return base, model, run_dir


def test_the_per_type_table_equals_a_hand_computation_on_a_tiny_bloom(run_with_known_delta):
    base, tuned, run_dir = run_with_known_delta
    tensors = {name: (param - dict(base.named_parameters())[name]).detach().reshape(-1)
               for name, param in tuned.named_parameters() if name.endswith(".bias")}
    rows = inspection.changes(inspection.parts_of(tuned, list(tensors)), dict(tuned.named_parameters()), tensors, set())
    row = next(r for r in rows if r["layer"] == 1 and r["type"] == "k")
    # By hand: BLOOM's fused bias is laid out (heads, 3, head_dim); the key is the middle of each head's three.
    name = "transformer.h.1.self_attention.query_key_value.bias"
    heads = tuned.config.n_head
    key_change = tensors[name].view(heads, 3, -1)[:, 1].reshape(-1)
    key_base = dict(base.named_parameters())[name].detach().view(heads, 3, -1)[:, 1].reshape(-1)
    assert row["size"] == key_change.numel() == tuned.config.hidden_size
    assert row["mean_abs_change"] == pytest.approx(key_change.abs().mean().item(), rel=1e-6)
    assert row["relative_change"] == pytest.approx((key_change.norm() / key_base.norm()).item(), rel=1e-6)
    ln = next(r for r in rows if r["name"] == "transformer.ln_f.bias")
    assert ln["layer"] is None and ln["mean_abs_change"] == pytest.approx(tensors["transformer.ln_f.bias"].abs().mean().item(), rel=1e-6)
    # Every bias is covered once: the q, k, v parts of a fused bias add up to it.
    assert sum(r["size"] for r in rows) == sum(t.numel() for t in tensors.values())


def test_the_key_biases_of_bloom_are_found_to_have_an_exactly_zero_gradient_and_nothing_else():
    bloom = tiny_bloom()
    names = [name for name, _ in bloom.named_parameters() if name.endswith(".bias")]
    assert inspection.zero_gradient_parts(bloom, inspection.parts_of(bloom, names)) == {(0, "k"), (1, "k")}


def test_no_bias_of_a_rope_model_is_marked_as_zero_gradient():
    # Under rotary positions a key bias is rotated by each key's position: softmax no longer ignores it.
    llama = tiny_llama()
    names = add_missing_biases(llama)
    assert inspection.zero_gradient_parts(llama, inspection.parts_of(llama, names)) == set()


def test_inspect_prints_the_table_and_writes_a_heatmap_of_one_row_per_layer_and_one_column_per_type(run_with_known_delta, capsys):
    _, _, run_dir = run_with_known_delta
    assert inspection.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "x = exact gradient zero" in out and "top 10 biases by mean |change| per entry:" in out
    top = out.split("top 10 biases by mean |change| per entry:\n")[1].split("\n\n")[0].splitlines()
    assert len(top) == 10 and all(line.strip().startswith("transformer.") for line in top)
    kinds = ["input_layernorm", "q", "k", "v", "dense", "post_attention_layernorm", "dense_h_to_4h", "dense_4h_to_h"]
    assert "heatmap (2 layers x 8 bias types)" in out
    width, height = inspection.figure_inches(2, len(kinds))
    assert png_size(run_dir / inspection.HEATMAP) == (round(width * 100), round(height * 100))


def test_comparing_two_deltas_gives_their_difference_and_cosine_per_bias_type(run_with_known_delta):
    _, tuned, _ = run_with_known_delta
    names = [name for name, _ in tuned.named_parameters() if name.endswith(".bias")]
    first = {name: torch.randn(tuned.get_parameter(name).numel(), generator=torch.Generator().manual_seed(i))
             for i, name in enumerate(names)}
    parts = inspection.parts_of(tuned, names)
    same = inspection.compare(parts, first, first)
    opposite = inspection.compare(parts, first, {name: -tensor for name, tensor in first.items()})
    assert all(row["cosine"] == pytest.approx(1) and row["difference_norm"] == 0 for row in same)
    assert all(row["cosine"] == pytest.approx(-1) for row in opposite)
    q = next(row for row in opposite if row["type"] == "q")
    assert q["difference_norm"] == pytest.approx(2 * q["norm_first"])


@pytest.mark.slow
def test_two_runs_of_one_base_compare_and_runs_of_two_bases_are_refused(tmp_path, capsys):
    for name, make in (("bloom", tiny_bloom), ("llama", tiny_llama)):
        saved(make, tmp_path / name)
    for run, model, seed in (("a", "bloom", "0"), ("b", "bloom", "1"), ("c", "llama", "0")):
        assert train.main(["--model", str(tmp_path / model), *QUICK, "--seed", seed, "--out-dir", str(tmp_path / run)]) == 0
    capsys.readouterr()
    assert inspection.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "k " in out and "(exact gradient zero: noise)" in out
    assert inspection.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "were trained on different bases or bias selections" in capsys.readouterr().err


def test_inspect_never_overwrites_a_file_it_did_not_write(run_with_known_delta, tmp_path, capsys):
    _, _, run_dir = run_with_known_delta
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    assert inspection.main([str(run_dir), "--png", str(mine)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --png {mine} already exists")
    assert mine.read_bytes() == b"a user's picture"


def test_two_modules_of_one_name_in_a_layer_get_two_bias_types():
    # GPT-2 has attn.c_proj and mlp.c_proj: named by their last two names, never merged into one type.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    names = [name for name, _ in gpt2.named_parameters() if name.endswith(".bias")]
    kinds = {kind for layer, kind, _, _ in inspection.parts_of(gpt2, names) if layer == 0}
    assert {"attn.c_proj", "mlp.c_proj", "q", "k", "v", "c_fc", "ln_1", "ln_2"} <= kinds
    assert "c_proj" not in kinds


def test_inspect_takes_a_peft_adapter_folder_like_a_delta(tmp_path, capsys):
    from test_adapter import base_and_delta

    from bitfit.export import adapter

    _, delta = base_and_delta(tiny_llama, tmp_path, "all")
    assert adapter.main(["--delta", str(delta), "--out", str(tmp_path / "adapter")]) == 0
    capsys.readouterr()
    assert inspection.main([str(tmp_path / "adapter")]) == 0
    assert "relative: none, bitfit added these biases" in capsys.readouterr().out
