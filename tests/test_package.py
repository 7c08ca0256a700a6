"""bitfit as a package: the README's own loop runs as written, and `pip install .` gives working commands."""

import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from bitfit.model.delta import read_delta

REPO = Path(__file__).resolve().parent.parent


def readme_loop() -> str:
    """The Python block under the README's 'custom loop' marker, exactly as a reader copies it."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- the custom loop:[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert found, "the README lost its custom loop block"
    return found[1]


@pytest.mark.slow
def test_the_readme_custom_loop_runs_as_written_and_saves_a_delta_that_moved(tmp_path, monkeypatch, capsys):
    code = readme_loop()
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)  # it writes delta.safetensors where it runs
    exec(compile(code, "README.md (custom loop)", "exec"), {"__name__": "readme"})
    losses = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("loss ")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    tensors, metadata = read_delta(str(tmp_path / "delta.safetensors"))
    assert metadata["base_model"] == "embedded" and len(tensors) == 210
    assert any(bool(tensor.abs().max() > 0) for tensor in tensors.values())


@pytest.mark.slow
def test_pip_install_in_a_fresh_venv_gives_console_commands_that_train_both_embedded_defaults(tmp_path):
    # A copy of what the package is made of, so the build writes nothing into the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("bitfit", "train.py", "generate.py", "pyproject.toml", "README.md", "LICENSE"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, source / name)
    # The venv sees this environment's packages (torch is gigabytes; setuptools builds it) but not the
    # repository; this environment's pip installs into it (--python), so nothing is downloaded. "This
    # environment" is the one running the tests, a virtual environment itself or not: a .pth file names its
    # site-packages (system_site_packages would name the base interpreter's, which a venv's tests lack).
    venv.create(tmp_path / "venv", with_pip=False)
    bin_dir = tmp_path / "venv" / "bin"
    inner = subprocess.run([bin_dir / "python", "-c", "import site; print(site.getsitepackages()[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    Path(inner, "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--quiet",
                                "--no-deps", "--no-build-isolation", str(source)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([bin_dir / "python", "-c", "import bitfit, train; print(bitfit.__file__); print(train.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert all("site-packages" in line for line in where.stdout.splitlines()), where.stdout + where.stderr
    trained = subprocess.run([bin_dir / "bitfit-train", "--max-steps", "1", "--eval-data", "none", "--out-dir", "run"],
                             cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert read_delta(str(elsewhere / "run" / "delta.safetensors"))[1]["base_model"] == "embedded"
    classified = subprocess.run([bin_dir / "bitfit-train", "--task", "classify", "--max-steps", "1", "--eval-data", "none",
                                 "--out-dir", "classify"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert classified.returncode == 0, classified.stderr[-2000:]
    assert read_delta(str(elsewhere / "classify" / "delta.safetensors"))[1]["base_model"] == "embedded-encoder"
    helped = subprocess.run([bin_dir / "bitfit-generate", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "--delta" in helped.stdout
    for command in ("bitfit-merge", "bitfit-inspect", "bitfit-adapter", "bitfit-classify"):
        assert subprocess.run([bin_dir / command, "--help"], capture_output=True).returncode == 0, command


def test_the_public_api_is_what_the_readme_lists_each_with_a_docstring():
    import bitfit

    listed = {"load", "add_missing_biases", "select_biases", "FlatBiases", "encode", "pad_batch", "pad_id", "loss_sum",
              "label_tokens", "save_delta", "apply_delta", "read_delta"}
    assert set(bitfit.__all__) == listed
    assert all(getattr(bitfit, name).__doc__ for name in listed)


# The newest torch APIs the code uses, each with the release that made it public. A new one goes here
# (the test below fails when the code stops using one, so the list does not outlive its reasons).
NEWEST_TORCH_APIS = {"torch.compiler.set_stance": (2, 6), "from torch.distributed.fsdp import fully_shard": (2, 6),
                     "torch.OutOfMemoryError": (2, 5)}


def test_the_torch_floor_of_requirements_and_pyproject_admits_no_release_without_an_api_the_code_uses():
    code = "\n".join(path.read_text() for path in [REPO / "train.py", REPO / "generate.py", *(REPO / "bitfit").rglob("*.py")])
    floors = {name: re.search(r"torch>=(\d+)\.(\d+)", (REPO / name).read_text()) for name in ("requirements.txt", "pyproject.toml")}
    assert all(floors.values()) and len({match.groups() for match in floors.values()}) == 1, floors
    floor = tuple(int(part) for part in floors["requirements.txt"].groups())
    for api, since in NEWEST_TORCH_APIS.items():
        assert api in code, f"the code no longer uses {api}: drop it from NEWEST_TORCH_APIS"
        assert floor >= since, f"{api} is public from torch {since[0]}.{since[1]}, above the floor {floor[0]}.{floor[1]}"
