"""benchmarks/gpu.py cannot rot while no GPU is lent: on the CPU, with tiny configs, it runs whole."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_the_cpu_with_tiny_configs_and_both_contenders_agree_on_the_losses():
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--steps", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("device: CPU (no GPU: the --tiny check)")
    for model in ("bloomz-1b1 shape", "SmolLM2-135M"):
        assert f"## {model}: 2 steps of 1 x 8" in out
    gaps = [float(gap) for gap in re.findall(r"per-step losses \(largest relative difference ([0-9.e+-]+)\)", out)]
    assert len(gaps) == 2 and max(gaps) < 1e-4  # fp32 on the CPU: the same losses up to rounding
    assert out.count("| tokens/s |") == 2 and out.count("| BitFit-MFU |") == 2
    assert "flat buffer, fused" in out and "bloomz-1b1 memory with --bf16 --bf16-weights" in out
