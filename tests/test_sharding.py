"""--shard-weights: the frozen weights split between torchrun's processes with FSDP2, the biases whole.
Real torchrun, two gloo processes on this CPU, against one process holding the whole model."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import losses, torchrun
from test_train import saved
from transformers import BloomConfig, BloomForCausalLM

import train
from bitfit.core.biases import fused_qkv_parts
from bitfit.model.delta import read_delta
from tiny import tiny_bloom, tiny_llama

ARGS = ["--split", "train[:44]", "--eval-split", "heldout[:2]", "--max-new-tokens", "2", "--lr", "1e-2"]


def one_process(*args: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker runs: matmuls round alike whatever the thread count
    try:
        return train.main(list(args))
    finally:
        torch.set_num_threads(threads)


def learned(delta: dict[str, torch.Tensor], model) -> torch.Tensor:
    """The delta as one vector, without BLOOM's attention KEY entries: their exact gradient is zero (softmax
    ignores a shift shared by all keys), so what they hold is rounding noise that AdamW scales up."""
    parts = []
    for name in sorted(delta):
        values = delta[name].reshape(-1)
        if name.endswith("query_key_value.bias"):
            values = values[~fused_qkv_parts(model, name, values.numel())["k"]]
        parts.append(values)
    return torch.cat(parts)


@pytest.mark.slow
@pytest.mark.parametrize(("make_model", "padding_side"), [(tiny_llama, "right"), (tiny_bloom, "left")])
def test_two_processes_with_sharded_weights_give_the_delta_and_loss_log_of_one_whole_model(make_model, padding_side, tmp_path):
    model_dir = saved(make_model, tmp_path / "model", padding_side)
    args = [*ARGS, "--max-pass-tokens", "50"]  # 1-3 passes per process: now and then one waits in an idle pass
    assert one_process("--model", model_dir, *args, "--out-dir", str(tmp_path / "one")) == 0
    launched = torchrun("--model", model_dir, *args, "--shard-weights", "--out-dir", str(tmp_path / "two"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "weights: sharded over 2 processes (FSDP2)" in launched.stdout
    assert re.search(r"in lockstep: [1-9]\d* idle one-token pass", launched.stdout), launched.stdout
    assert launched.stdout.count("saved the bias delta") == 1  # rank 0 alone speaks and writes

    (one, meta_one), (two, meta_two) = (read_delta(str(tmp_path / run / "delta.safetensors")) for run in ("one", "two"))
    assert meta_one["base_fingerprint"] == meta_two["base_fingerprint"]  # the gathered weights are the base's, every value
    model = make_model()
    flat_one, flat_two = learned(one, model), learned(two, model)
    assert torch.linalg.vector_norm(flat_one - flat_two) / torch.linalg.vector_norm(flat_one) < 1e-5
    log_one, log_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(log_one) == len(log_two) == 6
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(log_one, log_two)), (log_one, log_two)
    # Evaluation and generation ran on the sharded model (every process in each forward) and agree too.
    after_one, after_two = (json.loads((tmp_path / run / "results.json").read_text())["after"] for run in ("one", "two"))
    assert abs(after_one["loss"] - after_two["loss"]) <= 1e-5 * after_one["loss"]
    assert [s["generated"] for s in after_one["samples"]] == [s["generated"] for s in after_two["samples"]]


def odd_bloom() -> BloomForCausalLM:
    """tiny_bloom with 401 token embeddings: its largest weight's rows split 201 + 200."""
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=401, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2)).eval()


@pytest.mark.slow
def test_each_process_holds_half_the_frozen_weight_bytes_and_the_whole_bias_buffer(tmp_path):
    model_dir = saved(odd_bloom, tmp_path / "model", "left")
    args = ["--model", model_dir, *ARGS, "--max-steps", "1", "--eval-data", "none"]
    launched = torchrun(*args, "--shard-weights", "--out-dir", str(tmp_path / "run"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert one_process(*args, "--out-dir", str(tmp_path / "one")) == 0
    fingerprints = (read_delta(str(tmp_path / run / "delta.safetensors"))[1]["base_fingerprint"] for run in ("run", "one"))
    assert len(set(fingerprints)) == 1  # the uneven shards hold every row of the base, once
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    model = odd_bloom()
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    frozen = sum(p.nbytes for name, p in model.named_parameters() if not name.endswith(".bias"))
    # Measured from each process's local shards: half of every weight's rows (one more row at most when a
    # weight's row count is odd), so half the bytes give or take a row per weight.
    widest_rows = sum(p[0].nbytes for name, p in model.named_parameters() if not name.endswith(".bias"))
    assert len(results["weight_bytes_per_process"]) == 2
    for held in results["weight_bytes_per_process"]:
        assert abs(held - frozen / 2) <= widest_rows, (held, frozen)
    assert sum(results["weight_bytes_per_process"]) == frozen  # no weight held twice
    assert results["bias_buffer_bytes_per_process"] == [4 * sum(p.numel() for p in biases)] * 2


@pytest.mark.slow
def test_resuming_a_sharded_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:44]", "--eval-data", "none", "--lr", "1e-2", "--save-every", "2",
            "--shard-weights"]
    assert torchrun(*args, "--out-dir", str(tmp_path / "straight")).returncode == 0
    assert torchrun(*args, "--out-dir", str(tmp_path / "run")).returncode == 0
    # A crash after step 5: the last checkpoint is step 4, and the run never finished.
    for name in ("delta.safetensors", "results.json"):
        (tmp_path / "run" / name).unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000006")
    resumed = torchrun("--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after step 4" in resumed.stdout
    straight, delta = (read_delta(str(tmp_path / run / "delta.safetensors"))[0] for run in ("straight", "run"))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    assert delta.keys() == straight.keys() and all(torch.equal(delta[name], straight[name]) for name in delta)


@pytest.mark.slow
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_bloom])  # BLOOM: LayerNorms with biases
def test_sharded_bf16_weights_train_and_evaluate_every_n_steps(tmp_path, make_model):
    model_dir = saved(make_model, tmp_path / "model")
    launched = torchrun("--model", model_dir, *ARGS, "--max-steps", "4", "--eval-every", "2", "--bf16", "--bf16-weights",
                        "--shard-weights", "--out-dir", str(tmp_path / "run"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2]  # step 4's is the evaluation after training
    assert json.loads((tmp_path / "run" / "results.json").read_text())["after"]["loss"] > 0


@pytest.mark.slow
def test_sharding_the_weights_of_a_run_with_one_process_is_refused(tmp_path, capsys):
    model_dir = saved(tiny_llama, tmp_path / "model")
    assert train.main(["--model", model_dir, "--shard-weights", "--out-dir", str(tmp_path / "run")]) == 2
    assert "error: --shard-weights splits the frozen weights between torchrun's processes" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("change", ["removed", "reshaped"])
def test_a_checkpoint_without_a_parameter_of_the_model_in_its_shape_is_refused_naming_it(change, tmp_path):
    model_dir = Path(saved(tiny_llama, tmp_path / "model"))
    tensors = load_file(model_dir / "model.safetensors")
    if change == "removed":
        del tensors["model.norm.weight"]
    else:
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:1].clone()  # one row would broadcast: refused
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    launched = torchrun("--model", str(model_dir), "--shard-weights", "--out-dir", str(tmp_path / "run"))
    errors = [line for line in launched.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.norm.weight" in errors[0] and "without --shard-weights" in errors[0], launched.stderr[-2000:]
