"""A run's folder: bitfit writes only into a folder it created, and only one run at a time.

    runs/20261123-151200/      the default name; a second run in the same second gets ...-2, and so on
        .bitfit-run            written first, into a folder that was new or empty: it marks the folder as
                               bitfit's, and the run holds a lock on it (with its pid) while it owns it

So `--out-dir` pointing at a model's folder, a home directory or any folder with files that bitfit did
not write is refused before anything is written, and two runs never share a folder (two runs started
in the same second, or two given the same `--out-dir`). A run that fails before it recorded a step gives
the folder back as it found it (`release`): no folder holding only a config.json passes for a run.
"""

import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO

from . import checkpoint
from .errors import BitfitError
from .files import write_error, write_json

MARKER = ".bitfit-run"
# What a run writes, and so what --overwrite may delete: nothing else in the folder is touched.
RUN_FILES = ("delta.safetensors", "results.json", "eval_before.json", "metrics.jsonl", "loss.png", "config.json",
             "inputs.json", "bias_change.png")

# This process's runs until release(): the open, locked marker, the folder, and the folders the run created
# for it (the folder and any parents that did not exist, deepest first).
_held: list[tuple[IO, Path, list[Path]]] = []


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file()


def _lock(path: Path, created: list[Path]) -> None:
    """Take the folder's lock, or say which process holds it. The OS drops it when this process ends,
    however it ends, so a killed run never leaves a folder locked."""
    marker = open(path / MARKER, "a+")
    try:
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        marker.seek(0)
        owner = marker.read().strip() or "?"
        marker.close()
        raise BitfitError(f"{path} is in use by another run (pid {owner}); wait for it, or pick another --out-dir") from None
    try:
        marker.truncate(0)
        marker.write(f"{os.getpid()}\n")
        marker.flush()
    except OSError:  # a full disk: the folder is given back as it was
        try:
            marker.close()  # it tries the write once more, and fails again
        except OSError:
            pass
        (path / MARKER).unlink(missing_ok=True)
        _remove_empty(created)
        raise
    _held.append((marker, path, created))


def _new_default(root: Path = Path("runs")) -> Path:
    """runs/<date-time>, or runs/<date-time>-N if that exists: mkdir is atomic, so no two runs get one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise BitfitError(f"cannot find a free folder name under {root}/ for {stamp}")


def claim(out_dir: str) -> Path:
    """The run's folder, created or checked, marked and locked for this process.

    '' means a new runs/<date-time>. A given path must be new, an empty folder, or a folder an earlier
    bitfit run marked; anything else is refused untouched."""
    try:
        if not out_dir:
            created = _missing(Path("runs"))
            path = _new_default()
            created.insert(0, path)
        else:
            path = Path(out_dir)
            if path.exists() and not path.is_dir():
                raise BitfitError(f"--out-dir {path} is a file, not a folder")
            if path.is_dir() and any(path.iterdir()) and not is_run_folder(path):
                raise BitfitError(f"--out-dir {path} holds files bitfit did not write (it has no {MARKER}); bitfit "
                                  "writes only into a new or empty folder or one of its own runs: pick another --out-dir")
            created = _missing(path)
            path.mkdir(parents=True, exist_ok=True)
        _lock(path, created)
    except OSError as error:
        raise write_error(Path(out_dir or "runs"), error) from None
    return path


def release(failed: bool = False) -> None:
    """Drop this process's folder locks (a run ends; the OS drops them anyway when the process exits).

    A run that `failed` before it recorded anything of its training (no metrics line, checkpoint or
    delta) gives its folder back as it found it: the files it wrote go, and the folder too if the run
    made it. An earlier run's steps, and anything bitfit did not write, always stay."""
    while _held:
        marker, path, created = _held.pop()
        if failed and not _holds_training(path):
            for name in (*RUN_FILES, MARKER):
                (path / name).unlink(missing_ok=True)
            _remove_empty(created)
        marker.close()


def _missing(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what making it creates."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run created, deepest first, each only if empty: what else is there stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            return


def _holds_training(path: Path) -> bool:
    metrics = path / "metrics.jsonl"
    return (path / "delta.safetensors").exists() or bool(checkpoint.checkpoints(path)) or (
        metrics.is_file() and metrics.stat().st_size > 0)


def same_inputs(path: Path, inputs: dict[str, str], resuming: bool) -> None:
    """Record what a run trains on (hashes of its model and data) in inputs.json, or, resuming, refuse
    if they differ from the recorded ones: the data order and the biases would no longer match."""
    file = path / "inputs.json"
    if resuming and file.is_file():
        try:
            recorded = json.loads(file.read_text())
        except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
            recorded = f"cannot be read ({error})"
        if not isinstance(recorded, dict) or not all(isinstance(recorded.get(name), str) for name in inputs):
            why = recorded if isinstance(recorded, str) else f"does not hold the {' and '.join(inputs)} hashes"
            raise BitfitError(f"--resume {path}: {file} {why}; it records the hashes of the model and data the run "
                              "started with, which a resume must match: restore it, or start a new run")
        changed = [name for name in inputs if recorded[name] != inputs[name]]
        if changed:
            raise BitfitError(f"--resume {path}: the {' and the '.join(changed)} changed since the run started "
                              f"({', '.join(f'{n} {recorded[n]} then, {inputs[n]} now' for n in changed)}); "
                              "resume needs the same ones, or start a new run")
        return
    write_json(file, inputs)


def clear(path: Path) -> list[Path]:
    """--overwrite: delete what an earlier run wrote here, by name (RUN_FILES, the hidden temporary files
    of a write it did not finish, its checkpoints file by file), and nothing else. Returns what stays:
    anything bitfit did not write, which the run then names in its log."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
        for unfinished in path.glob(f".{name}.*.writing"):  # files.write_atomically's, left by a killed run
            unfinished.unlink(missing_ok=True)
    return checkpoint.remove_all(path)
