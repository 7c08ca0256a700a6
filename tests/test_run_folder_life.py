"""A run folder's whole life, with a crash or a full disk injected at EVERY write of every command.

The way storage systems are tested. Each command of a run folder's life (a first run, `--overwrite`, and
from an interrupted --overwrite run `--resume`, `--overwrite` again and a plain rerun) runs watched by a
Python audit hook that sees every write it makes: a file or folder created, opened for writing, renamed
or removed. Then, at each write k in turn:
- a crash: the folder as the command left it just before write k, which is what kill -9 at that
  moment leaves (nothing after it runs, no cleanup; the OS drops the lock): copied at each write of
  one watched run;
- a full disk: the command run again with write k, and every later write that needs space, failing
  with ENOSPC.
After each, and after the next command of the life that follows it, the folder must hold:
- the newest finished delta, byte for byte: a finished delta is lost only to a newer one;
- every file bitfit did not write, byte for byte;
and a command that is not killed ends with exit 0, or with exactly one `error:` line, having completed
or undone every move it began: an earlier run is set aside only while a run that trained and has not
finished replaces it.
"""

import contextlib
import errno
import hashlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_train import saved

import train
from bitfit.files import write_atomically
from bitfit.run import report, run_folder
from tiny import tiny_llama

# The audit events of a change to the disk (os.rename also stands for os.replace; os.remove for unlink).
CHANGES = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp",
           "os.truncate")
NEEDS_SPACE = ("open", "os.mkdir", "tempfile.mkstemp", "tempfile.mkdtemp")  # what a full disk refuses
ASIDE = (run_folder.REPLACED, run_folder.SETTING_ASIDE, run_folder.RETURNING)
USER_FILES = ("notes.txt", "checkpoints/notes.txt", "plots/mine.txt")  # put in the folder by its user
FOLLOW_UPS = (("plain", 4), ("resume", 0), ("overwrite", 5))  # the later commands, with their seeds

_watchers: list = []  # the watcher of the command running now: audit hooks cannot be removed, so one dispatches
sys.addaudithook(lambda event, args: _watchers[-1](event, args) if _watchers and _watchers[-1] else None)


def write_in(folder: Path, event: str, args: tuple) -> bool:
    """Whether an audit event is a write under `folder`."""
    if event == "open":
        path, mode, flags = args
        wanted = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return not isinstance(path, int) and wanted and str(path).startswith(str(folder))
    if event not in CHANGES:
        return False
    # inside shutil.rmtree a name is relative to a folder's descriptor, and that folder is under `folder`
    return str(args[0]).startswith(str(folder)) or (len(args) > 1 and isinstance(args[-1], int) and args[-1] >= 0)


class Crashes:
    """At each write under `folder`, before it happens, a copy of the folder: what a kill there leaves."""

    def __init__(self, folder: Path, into: Path):
        self.folder, self.into, self.states, self.busy = folder, into, [], False

    def __call__(self, event: str, args: tuple) -> None:
        if self.busy or not write_in(self.folder, event, args):
            return
        self.busy = True  # the copy's own writes are not the command's
        try:
            copy = self.into / f"crash-{len(self.states) + 1}"
            if self.folder.exists():
                shutil.copytree(self.folder, copy, symlinks=True)
            self.states.append((f"{event} {args[0]}", copy if self.folder.exists() else None))
        finally:
            self.busy = False


class FullDisk:
    """From write number `at` under `folder` on, every write that needs space fails with ENOSPC."""

    def __init__(self, folder: Path, at: int):
        self.folder, self.at, self.count = folder, at, 0

    def __call__(self, event: str, args: tuple) -> None:
        if write_in(self.folder, event, args):
            self.count += 1
            if self.count >= self.at and event in NEEDS_SPACE:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deltas_in(folder: Path) -> set[str]:
    """The deltas anywhere a run keeps one: the folder itself, and where an earlier run is set aside."""
    places = [folder / run_folder.DELTA, *(folder / aside / run_folder.DELTA for aside in ASIDE)]
    return {digest(path) for path in places if path.is_file()}


def signature(folder: Path) -> tuple[str, ...]:
    """The shape of a folder's state: its names, a temporary file's random part left out."""
    return tuple(sorted(str(p.relative_to(folder)).split(".writing")[0] for p in folder.rglob("*")))


class Life:
    """The run folder under test, the commands of its life, and what it must keep across them."""

    def __init__(self, model_dir: str, root: Path):
        self.root, self.folder = root, root / "run"
        self.common = ["--model", model_dir, "--split", "train[:16]", "--eval-data", "none", "--max-steps", "2",
                       "--save-every", "1", "--report-to", "tensorboard", "--out-dir", str(self.folder)]
        self.history: list[str] = []  # every finished delta seen, oldest first
        self.users: list[str] = []  # the user's files in the folder at the start
        self.saved = 0

    def argv(self, name: str, seed: int) -> list[str]:
        return {"first": [*self.common, "--seed", str(seed)], "plain": [*self.common, "--seed", str(seed)],
                "overwrite": [*self.common, "--seed", str(seed), "--overwrite"],
                "resume": ["--resume", str(self.folder)]}[name]

    def start(self, state: Path | None, history: list[str]) -> None:
        """The folder as `state` holds it (a saved copy; None: no folder), with the deltas seen until then."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if state:
            shutil.copytree(state, self.folder, symlinks=True)
        self.users = [name for name in USER_FILES if (self.folder / name).is_file()]
        self.history = list(history)

    def save(self) -> Path | None:
        """A copy of the folder as it is now (None where there is none), for start() to go back to."""
        if not self.folder.exists():
            return None
        self.saved += 1
        copy = self.root / "states" / str(self.saved)
        shutil.copytree(self.folder, copy, symlinks=True)
        return copy

    def crashes(self) -> Crashes:
        """A watcher that copies the folder at each write, into a folder of its own."""
        self.saved += 1
        return Crashes(self.folder, self.root / "states" / f"crashes-{self.saved}")

    def run(self, name: str, seed: int, watcher=None) -> tuple[int, str]:
        """train.py's exit code and error output for the command, watched by `watcher`; checked."""
        err, kept = io.StringIO(), deltas_in(self.folder) if self.folder.exists() else set()
        if self.folder.exists() and run_folder.finished(self.folder):  # it replaced what it set aside
            kept = {digest(self.folder / run_folder.DELTA)}
        _watchers.append(watcher)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = train.main(self.argv(name, seed))
        finally:
            _watchers.pop()
        self.check(f"{name} (exit {code}):\n{err.getvalue()[-2000:]}")
        assert code in (0, 2), f"after {name} (exit {code}):\n{err.getvalue()[-2000:]}"
        if code == 2:  # one line says why
            lines = err.getvalue().strip().splitlines()
            assert [line for line in lines if line.startswith("error:")] == lines[-1:], f"after {name}:\n{err.getvalue()}"
        assert not any((self.folder / aside).exists() for aside in ASIDE[1:]), f"a move was left half done after {name}"
        if (self.folder / run_folder.REPLACED).exists():  # kept only for a run that trained and did not finish
            assert run_folder.holds_training(self.folder) and not run_folder.finished(self.folder), f"after {name}"
        if code == 0:
            assert run_folder.finished(self.folder) and not (self.folder / run_folder.REPLACED).exists(), f"after {name}"
        if name == "plain":  # without --overwrite no finished delta is replaced, a set-aside one neither
            assert kept <= deltas_in(self.folder), f"a plain run replaced a finished delta (exit {code}):\n{err.getvalue()}"
        return code, err.getvalue()

    def check(self, after: str) -> None:
        """What holds after anything, a kill included: the newest finished delta and the user's files are there."""
        on_disk = deltas_in(self.folder) if self.folder.exists() else set()
        self.history += sorted(on_disk - set(self.history))  # a delta the command wrote
        if self.history:
            assert self.history[-1] in on_disk, f"the newest finished delta is lost after {after}"
        for name in self.users:
            assert (self.folder / name).read_text() == f"the user's {name}", f"{name} was touched after {after}"

    def everywhere(self, state: Path | None, name: str, seed: int) -> int:
        """`name` from `state` killed at each of its writes, and out of disk at each, every outcome checked, and
        checked again after each later command (FOLLOW_UPS) run from it. Returns how many writes it makes."""
        self.start(state, self.history)
        history = list(self.history)
        crashes = self.crashes()
        self.run(name, seed, crashes)
        assert crashes.states, f"{name} wrote nothing"
        ends = {}
        for write, (event, crashed) in enumerate(crashes.states, start=1):
            self.start(crashed, history)
            self.check(f"a kill of {name} at write {write}, {event}")
            ends.setdefault(signature(self.folder) if crashed else (), (crashed, list(self.history)))
            self.start(state, history)
            self.run(name, seed, FullDisk(self.folder, write))
            ends.setdefault(signature(self.folder), (self.save(), list(self.history)))
        for end, seen in ends.values():
            for later, later_seed in FOLLOW_UPS:
                self.start(end, seen)
                self.run(later, later_seed)
        return len(crashes.states)


@pytest.fixture(scope="module")
def life(tmp_path_factory) -> Life:
    root = tmp_path_factory.mktemp("life")
    return Life(saved(tiny_llama, root / "model"), root)


@pytest.fixture(autouse=True)
def plain_loss_curve(monkeypatch):
    """loss.png and measures.png as a few bytes written like the real ones: drawing is not what these tests are about,
    and it is half the time of a run."""
    monkeypatch.setattr(report, "save_loss_curve", lambda records, points, path: write_atomically(path, b"png"))
    monkeypatch.setattr(report, "save_measures", lambda records, path: write_atomically(path, b"png"))



def finished_run(life: Life) -> Path:
    """A finished run (checkpoints and a delta), with the user's files put in its folder afterwards."""
    life.start(None, [])
    assert life.run("first", seed=1)[0] == 0
    for name in USER_FILES:
        (life.folder / name).parent.mkdir(parents=True, exist_ok=True)
        (life.folder / name).write_text(f"the user's {name}")
    return life.save()


def interrupted_overwrite(life: Life) -> Path:
    """An --overwrite run killed just after its first checkpoint: an unfinished run, and the finished one it
    replaces set aside, share the folder."""
    finished = finished_run(life)
    crashes = life.crashes()
    life.run("overwrite", 2, crashes)
    after = next(state for (write, _), (_, state) in zip(crashes.states, crashes.states[1:])
                 if write.startswith("os.rename") and ".step-000001.writing" in write)  # the checkpoint, renamed whole
    life.start(after, life.history[:1])
    assert run_folder.replaced(life.folder) and run_folder.holds_training(life.folder), finished
    return after


@pytest.mark.slow
def test_a_first_run_killed_or_out_of_disk_at_any_write_leaves_what_the_next_command_resumes_reruns_or_refuses(life):
    life.start(None, [])
    life.everywhere(None, "first", seed=1)


@pytest.mark.slow
def test_an_overwrite_killed_or_out_of_disk_at_any_write_never_loses_the_finished_run_it_replaces(life):
    life.everywhere(finished_run(life), "overwrite", seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resume", "overwrite", "plain"])
def test_any_command_on_an_interrupted_overwrite_killed_or_out_of_disk_at_any_write_loses_no_finished_delta(name, life):
    state = interrupted_overwrite(life)
    life.everywhere(state, name, seed=3)
