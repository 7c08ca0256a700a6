"""A run's folder: bitfit writes only into a folder it created, and only one run at a time.

    runs/20261123-151200/      the default name; a second run in the same second gets ...-2, and so on
        .bitfit-run            written first, into a folder that was new or empty: it marks the folder as
                               bitfit's, and the run holds a lock on it (with its pid) while it owns it

So `--out-dir` pointing at a model's folder, a home directory or any folder with files that bitfit did
not write is refused before anything is written, and two runs never share a folder (two runs started
in the same second, or two given the same `--out-dir`).
"""

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO

from .errors import BitfitError
from .files import write_json

MARKER = ".bitfit-run"
# What a run writes, and so what --overwrite may delete: nothing else in the folder is touched.
RUN_FILES = ("delta.safetensors", "results.json", "eval_before.json", "metrics.jsonl", "loss.png", "config.json",
             "inputs.json", "bias_change.png")

_held: list[IO] = []  # the open, locked marker files of this process's runs, until release()


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file()


def _lock(path: Path) -> None:
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
    marker.truncate(0)
    marker.write(f"{os.getpid()}\n")
    marker.flush()
    _held.append(marker)


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
            path = _new_default()
        else:
            path = Path(out_dir)
            if path.exists() and not path.is_dir():
                raise BitfitError(f"--out-dir {path} is a file, not a folder")
            if path.is_dir() and any(path.iterdir()) and not is_run_folder(path):
                raise BitfitError(f"--out-dir {path} holds files bitfit did not write (it has no {MARKER}); bitfit "
                                  "writes only into a new or empty folder or one of its own runs: pick another --out-dir")
            path.mkdir(parents=True, exist_ok=True)
        _lock(path)
    except OSError as error:
        raise BitfitError(f"cannot write to the output folder {out_dir or 'runs/'}: {error.strerror}") from None
    return path


def release() -> None:
    """Drop this process's folder locks (a run ends; the OS drops them anyway when the process exits)."""
    while _held:
        _held.pop().close()


def same_inputs(path: Path, inputs: dict[str, str], resuming: bool) -> None:
    """Record what a run trains on (hashes of its model and data) in inputs.json, or, resuming, refuse
    if they differ from the recorded ones: the data order and the biases would no longer match."""
    file = path / "inputs.json"
    if resuming and file.is_file():
        recorded = json.loads(file.read_text())
        changed = [name for name in inputs if recorded.get(name) != inputs[name]]
        if changed:
            raise BitfitError(f"--resume {path}: the {' and the '.join(changed)} changed since the run started "
                              f"({', '.join(f'{n} {recorded.get(n)} then, {inputs[n]} now' for n in changed)}); "
                              "resume needs the same ones, or start a new run")
        return
    write_json(file, inputs)


def clear(path: Path) -> None:
    """--overwrite: delete what an earlier run wrote here (only that; the folder is bitfit's, see claim)."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / "checkpoints", ignore_errors=True)
