"""benchmarks/gpu.py cannot rot while no GPU is lent: on the CPU, with tiny configs, it runs whole."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIDES = ["recipe", "bitfit, CPU pass budget", "bitfit, GPU defaults"]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_the_cpu_with_tiny_configs_and_every_side_agrees_on_the_losses(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--steps", "4", "--warmup", "1",
                           "--out", str(tmp_path / "gpu.json")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("device: CPU (no GPU: the --tiny check)")
    for model in ("bloomz-1b1 shape", "SmolLM2-135M shape"):
        assert f"## {model}: 4 steps of 1 x 8, 3 timed" in out
    gaps = [float(gap) for gap in re.findall(r"largest relative difference ([0-9.e+-]+)", out)]
    assert len(gaps) == 4 and max(gaps) < 1e-4  # fp32 on the CPU: the same losses up to rounding
    assert out.count("| tokens/s |") == 2 and out.count("| BitFit-MFU, of the measured matmul |") == 2
    table = json.loads((tmp_path / "gpu.json").read_text())
    assert table["gpu"].startswith("CPU") and table["steps"] == 4 and table["warmup"] == 1
    for model in table["models"].values():
        assert list(model) == SIDES
        assert all(side["timed_steps"] == 3 and side["tokens_per_s"] > 0 for side in model.values())
        assert model["bitfit, CPU pass budget"]["max_pass_tokens"] == 256


@pytest.mark.slow
def test_the_gpu_benchmark_refuses_too_few_steps_to_time():
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--steps", "5", "--warmup", "5"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--steps must be more than --warmup + 1" in done.stderr
