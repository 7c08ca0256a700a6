"""The layout draws the architecture: the algorithm apart from the plumbing, no import cycles, and the
parts a fork may not want (more than one process, export) deletable."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import saved

from tiny import tiny_llama

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "bitfit"
ENTRY_POINTS = ["train", "generate", "bitfit.export.merge", "bitfit.export.adapter", "bitfit.export.inspection",
                "bitfit.infer.classify"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def module_path(name: str) -> Path | None:
    """The file of a module of this repository, or None (a third-party or standard module)."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports(path: Path) -> set[str]:
    """The modules of this repository that `path` imports, at its top or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            # `from bitfit.run import ranks` imports the module bitfit.run.ranks; `from x import name`, x
            found |= {f"{base}.{alias.name}" if module_path(f"{base}.{alias.name}") else base for alias in node.names}
    return {name for name in found if module_path(name) and name != module_name(path)}


def graph() -> dict[str, set[str]]:
    files = [*PACKAGE.rglob("*.py"), REPO / "train.py", REPO / "generate.py"]
    return {module_name(path): imports(path) for path in files}


def test_the_core_imports_nothing_of_bitfit_outside_the_core():
    for name, deps in graph().items():
        if name.startswith("bitfit.core"):
            assert all(dep.startswith("bitfit.core") for dep in deps), (name, deps)


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in edges.get(start, ()):
            if dep == target or (dep not in seen and (seen.add(dep) or reaches(dep, target, seen))):
                return True
        return False

    assert [name for name in edges if reaches(name, name, set())] == []


def test_no_entry_point_imports_another():
    for name in ENTRY_POINTS:
        others = set(ENTRY_POINTS) - {name}
        assert not imports(module_path(name)) & others, name


def test_no_module_is_named_like_a_standard_library_module():
    names = {path.stem for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    names |= {path.name for path in PACKAGE.rglob("*") if path.is_dir() and path.name != "__pycache__"}
    assert sorted(names & sys.stdlib_module_names) == []


@pytest.mark.slow
def test_importing_bitfit_and_its_parts_loads_no_distributed_training_code():
    code = ("import sys, bitfit, bitfit.core.step, bitfit.model.delta, bitfit.run.start, bitfit.run.evaluate; "
            "print([m for m in sys.modules if m.startswith(('torch.distributed.fsdp', 'torch.distributed.tensor', "
            "'bitfit.parallel'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_a_fork_that_deletes_the_parallel_and_export_parts_still_trains(tmp_path):
    fork = tmp_path / "fork"
    fork.mkdir()
    shutil.copytree(PACKAGE, fork / "bitfit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "train.py", fork)
    shutil.rmtree(fork / "bitfit" / "parallel")
    shutil.rmtree(fork / "bitfit" / "export")
    model = saved(tiny_llama, tmp_path / "model")
    run = subprocess.run([sys.executable, "train.py", "--model", model, "--split", "train[:16]", "--eval-split",
                          "heldout[:2]", "--max-new-tokens", "2", "--out-dir", str(tmp_path / "run")],
                         cwd=fork, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(fork)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "delta.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2

