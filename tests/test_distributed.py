"""torchrun data parallelism over the flat bias buffer, on this CPU with the gloo backend."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import saved

import train
from bitfit.model.delta import read_delta
from tiny import tiny_llama

REPO = Path(__file__).resolve().parent.parent


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_give_the_biases_and_loss_log_of_one_process(tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "model")
    # 44 examples: 5 full steps of 8 and a last step of 4, so processes also share a short step. The
    # default layout: packed, each process's 4 examples in one pass.
    args = ["--model", model_dir, "--split", "train[:44]", "--eval-split", "heldout[:2]", "--max-new-tokens", "2",
            "--lr", "1e-2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker runs: matmuls round alike whatever the thread count
    try:
        assert train.main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)

    launched = torchrun(*args, "--out-dir", str(tmp_path / "two"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("saved the bias delta") == 1  # rank 0 alone speaks and writes
    assert "| 2 processes, 4 examples each" in launched.stdout  # a step's 8 examples shared, none idle

    one, two = read_delta(str(tmp_path / "one" / "delta.safetensors"))[0], read_delta(str(tmp_path / "two" / "delta.safetensors"))[0]
    assert one.keys() == two.keys()
    # The gradient sums in another order (two partial sums, then the all-reduce), so the biases agree to
    # float32 rounding, not bitwise: relative L2 error of the whole delta under 3e-6 (AdamW divides each
    # step by the root of the gradient's running square, so rounding in small gradients does not shrink
    # with them: over 6 steps it reaches ~1e-6 of the delta).
    flat_one, flat_two = (torch.cat([d[name].reshape(-1) for name in sorted(d)]) for d in (one, two))
    assert torch.linalg.vector_norm(flat_one - flat_two) / torch.linalg.vector_norm(flat_one) < 3e-6
    assert not torch.equal(flat_one, torch.zeros_like(flat_one))
    log_one, log_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(log_one) == len(log_two) == 6
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(log_one, log_two)), (log_one, log_two)
    assert torch.isfinite(torch.tensor(log_two)).all()


@pytest.mark.slow
def test_a_torchrun_run_resumed_from_a_checkpoint_ends_bitwise_identical(tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:48]", "--eval-split", "heldout[:2]", "--max-new-tokens", "2",
            "--lr", "1e-2", "--save-every", "2", "--keep-checkpoints", "3"]
    assert torchrun(*args, "--out-dir", str(tmp_path / "run")).returncode == 0
    straight = read_delta(str(tmp_path / "run" / "delta.safetensors"))[0], losses(tmp_path / "run")

    # A crash after step 5: the last checkpoint is step 4, and the run never finished.
    for name in ("delta.safetensors", "results.json"):
        (tmp_path / "run" / name).unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000006")
    resumed = torchrun("--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "after step 4" in resumed.stdout
    delta, log = read_delta(str(tmp_path / "run" / "delta.safetensors"))[0], losses(tmp_path / "run")
    assert log == straight[1]
    assert all(torch.equal(delta[name], straight[0][name]) for name in delta)


@pytest.mark.slow
def test_a_run_checkpointed_under_torchrun_resumes_in_one_process(tmp_path):
    # A step's examples do not depend on how many processes share them, so a checkpoint does not either.
    model_dir = saved(tiny_llama, tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:32]", "--eval-data", "none", "--lr", "1e-2",
            "--save-every", "2"]
    assert torchrun(*args, "--out-dir", str(tmp_path / "run")).returncode == 0
    straight = losses(tmp_path / "run")
    (tmp_path / "run" / "delta.safetensors").unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(["--resume", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = losses(tmp_path / "run")
    assert resumed[:2] == straight[:2] and len(resumed) == 4
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(straight[2:], resumed[2:])), (straight, resumed)


@pytest.mark.slow
def test_a_bad_input_under_torchrun_prints_one_error_line_and_process_0_exits_2(tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "model")
    (tmp_path / "bad.jsonl").write_text('{"question": "no instruction here"}\n')
    launched = torchrun("--model", model_dir, "--data", str(tmp_path / "bad.jsonl"), "--out-dir", str(tmp_path / "run"))
    ours = [line for line in launched.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "bad.jsonl line 1" in ours[0], launched.stderr[-3000:]
    assert not re.search(r'File ".*(train\.py|bitfit/)', launched.stderr)  # no traceback of ours (torchrun prints its own)
    # torchrun exits 1 whenever a process fails (its code, not ours); the process that spoke exited 2
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 2" in launched.stderr and launched.returncode == 1
