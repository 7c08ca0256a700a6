"""The README and docs/ are true to the code: every link leads somewhere, every command names a script
or module that exists and flags it takes, the README stays short, and no page speaks of what our users
never saw."""

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
NO_VALUE = {"--standalone", "-u", "-O", "-B"}  # launcher and interpreter options without a value


def commands(page: Path) -> list[str]:
    """The shell commands in a page's code blocks that run bitfit's code: python/python3/torchrun lines,
    continuation lines joined, comments dropped."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if re.match(r"(python3?|torchrun)\s", line):
                found.append(line.split(" #")[0].strip())
    return found


def target(command: str) -> tuple[str, list[str]]:
    """(the script or module a command runs, the flags it passes to it)."""
    words = shlex.split(command)[1:]
    while words and words[0].startswith("-") and words[0] != "-m":  # python's or torchrun's own options
        option = words.pop(0)
        if "=" not in option and option not in NO_VALUE:
            words.pop(0)  # its value
    name, rest = (words[1], words[2:]) if words[0] == "-m" else (words[0], words[1:])
    return name, [word.split("=")[0] for word in rest if re.match(r"--[a-z]", word)]


@cache
def every_scripts_flags() -> dict[str, set[str] | None]:
    """flags_of each script or module the pages run, asked two at a time (each --help is a process that
    imports torch: seconds, mostly one core's)."""
    names = sorted({target(command)[0] for page in PAGES for command in commands(page)})
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(flags_of, names)))


def flags_of(name: str) -> set[str] | None:
    """The flags a script or module of this repository accepts (from its --help), None for others (pytest)."""
    path = REPO / name if name.endswith(".py") else REPO.joinpath(*name.split(".")).with_suffix(".py")
    if not path.is_file():
        return None
    run = subprocess.run([sys.executable, *([name] if name.endswith(".py") else ["-m", name]), "--help"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{name} --help: {run.stderr[-500:]}"
    return set(re.findall(r"--[a-z][a-z0-9-]*", run.stdout))


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) < 250


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_of_the_repository(page):
    for link in LINK.findall(page.read_text()):
        if not re.match(r"[a-z]+:", link) and not link.startswith("#"):
            assert (page.parent / link.split("#")[0]).exists(), f"{page.name}: {link}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_no_page_speaks_of_the_seeds(page):
    assert not re.search(r"\bseeds?'", page.read_text()), "say 'the HF Trainer recipe'"
    assert "--layout seeds" not in page.read_text()


def test_the_readme_gives_both_test_tiers():
    blocks = "\n".join(FENCE.findall((REPO / "README.md").read_text()))
    assert re.search(r'^python3? -m pytest -m "not slow"', blocks, re.M)
    assert re.search(r"^python3? -m pytest -q$", blocks, re.M)  # the full suite: what CI runs


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_command_runs_a_script_or_module_that_exists_with_flags_it_takes(page):
    for command in commands(page):
        name, flags = target(command)
        if name.endswith(".py"):
            assert (REPO / name).is_file(), f"{page.name}: {command}"
        known = every_scripts_flags()[name]
        if known is None:
            assert name in ("pytest", "pip", "venv") or name.startswith("tensorboard"), f"{page.name}: {command}"
            continue
        assert set(flags) <= known, f"{page.name}: {command}: unknown {sorted(set(flags) - known)}"
