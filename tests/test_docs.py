"""The README and docs/ are true to the code: every link leads somewhere, every command names a script
or module that exists and flags it takes, the README stays short, and no page speaks of what our users
never saw."""

import json
import re
import shlex
import subprocess
import sys
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


# Run in ONE process for every script: torch and transformers are imported once, not once per script.
HELP_OF_EACH = """
import contextlib, io, json, os, runpy, sys
said = {}
for name in sys.argv[1:]:
    sys.argv, text, code = [name, "--help"], io.StringIO(), 0
    if name.endswith(".py"):  # as `python path/script.py` runs it: its own folder first on the path
        sys.path.insert(0, os.path.dirname(os.path.abspath(name)))
    try:
        with contextlib.redirect_stdout(text):
            runpy.run_path(name, run_name="__main__") if name.endswith(".py") else runpy.run_module(
                name, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code or 0
    if name.endswith(".py"):
        sys.path.pop(0)
    said[name] = [code, text.getvalue()]
print(json.dumps(said))
"""


@cache
def every_scripts_flags() -> dict[str, set[str] | None]:
    """The flags each script or module of this repository that the pages run accepts (from its --help),
    None for the others (pytest)."""
    names = sorted({target(command)[0] for page in PAGES for command in commands(page)})
    ours = [name for name in names if (REPO / name if name.endswith(".py") else
                                       REPO.joinpath(*name.split(".")).with_suffix(".py")).is_file()]
    run = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *ours], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    said = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (code, _) in said.items():
        assert code == 0, f"{name} --help exited {code}"
    return {name: set(re.findall(r"--[a-z][a-z0-9-]*", said[name][1])) if name in said else None for name in names}


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
