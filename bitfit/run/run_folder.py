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
import os
import shutil
import time
from pathlib import Path
from typing import IO

from bitfit.core.errors import BitfitError
from bitfit.files import parse_json, write_error, write_json
from bitfit.run import checkpoint

MARKER = ".bitfit-run"
REPLACED = ".replaced"  # --overwrite: the earlier run's files, set aside until this run records a step
# What a run writes, and so what --overwrite may delete: nothing else in the folder is touched.
DELTA = "delta.safetensors"  # the trained delta: the one file a finished run is for
RUN_FILES = (DELTA, "results.json", "eval_before.json", "metrics.jsonl", "loss.png", "config.json",
             "inputs.json", "bias_change.png")
TENSORBOARD = "tensorboard"  # --report-to tensorboard: a folder of TensorBoard's event files, made at the first step
EVENTS = "events.out.tfevents."  # how the name of each of those files starts

# This process's runs until release(): the open, locked marker, the folder, and the folders the run created
# for it (the folder and any parents that did not exist, deepest first).
_held: list[tuple[IO, Path, list[Path]]] = []
_set_aside: set[Path] = set()  # the run folders whose earlier run this process set aside (--overwrite)


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
            occupied = [path / name for name in RUN_FILES if (path / name).is_symlink() or (path / name).exists()
                        and not (path / name).is_file()]
            if (path / TENSORBOARD).exists() and not _own_events(path / TENSORBOARD):
                raise BitfitError(f"{path / TENSORBOARD} is named like the folder of TensorBoard event files a run "
                                  "writes, but holds something else: move it out, or pick another --out-dir")
            if occupied:  # a run would fail to write it, at the end: say so now
                raise BitfitError(f"{occupied[0]} is named like a file a run writes, but is "
                                  f"{'a link' if occupied[0].is_symlink() else 'no file'}: move it out, or pick another --out-dir")
            created = _missing(path)
            path.mkdir(parents=True, exist_ok=True)
        _lock(path, created)
        _settle_replaced(path)
    except OSError as error:
        raise write_error(Path(out_dir or "runs"), error) from None
    return path


def release(failed: bool = False) -> None:
    """Drop this process's folder locks (a run ends; the OS drops them anyway when the process exits).

    A run that `failed` before it recorded anything of its training (no metrics line, checkpoint or
    delta) takes its files away again, and the folder too if the run made it; an earlier run it set
    aside (--overwrite) is put back. An earlier run's steps, and anything bitfit did not write, always
    stay. (A failed --resume or a rerun into an untrained run folder leaves that folder untrained, as
    it was, less the files of the run that failed.)"""
    while _held:
        marker, path, created = _held.pop()
        replaced = path in _set_aside
        _set_aside.discard(path)
        if failed and not _holds_training(path):
            for name in (*RUN_FILES, *(() if replaced else (MARKER,))):
                if (path / name).is_file():
                    (path / name).unlink()
            if replaced:
                _put_back(path)
            _remove_empty(created)
        elif replaced:  # this run replaced the earlier one: its set-aside files go
            shutil.rmtree(path / REPLACED)
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


def _own_events(folder: Path) -> bool:
    """Whether `folder` is one --report-to tensorboard writes: a real folder of TensorBoard event files only."""
    return (folder.is_dir() and not folder.is_symlink()
            and all(entry.name.startswith(EVENTS) and entry.is_file() and not entry.is_symlink() for entry in folder.iterdir()))


def delta_of(given: str | Path) -> Path:
    """The delta of a run folder, or what was given (a delta file or a PEFT adapter folder)."""
    path = Path(given)
    return path / DELTA if is_run_folder(path) else path


def _holds_training(path: Path) -> bool:
    metrics = path / "metrics.jsonl"
    return (path / DELTA).exists() or bool(checkpoint.checkpoints(path)) or (
        metrics.is_file() and metrics.stat().st_size > 0)


def same_inputs(path: Path, inputs: dict[str, str], resuming: bool) -> None:
    """Record what a run trains on (hashes of its model and data) in inputs.json, or, resuming, refuse
    if they differ from the recorded ones: the data order and the biases would no longer match."""
    file = path / "inputs.json"
    if resuming and not file.is_file():
        raise BitfitError(f"--resume {path}: its inputs.json is gone; it records the hashes of the model and data the "
                          "run started with, which a resume must match: restore it, or start a new run")
    if resuming:
        try:
            recorded = parse_json(file.read_text())
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


def set_aside(path: Path) -> list[Path]:
    """--overwrite: move what an earlier run wrote here (its files by name, its checkpoint folders) into
    the hidden folder REPLACED, where `release` deletes them once this run has recorded a step, or puts
    them back if it fails before one: a typo in the new command costs nothing. Links and anything else
    bitfit did not write stay where they are; returns them, for the log."""
    aside = path / REPLACED
    own, foreign = checkpoint.own_and_foreign(path)  # refuses before anything moves
    (aside / "checkpoints").mkdir(parents=True)
    _set_aside.add(path)
    for folder in own:
        folder.rename(aside / "checkpoints" / folder.name)
    for name in RUN_FILES:
        if (path / name).is_file() and not (path / name).is_symlink():
            (path / name).rename(aside / name)
        for unfinished in path.glob(f".{name}.*.writing"):  # files.write_atomically's, left by a killed run
            unfinished.unlink(missing_ok=True)
    if _own_events(path / TENSORBOARD):  # else the new run's events would be drawn as one run with the old
        (path / TENSORBOARD).rename(aside / TENSORBOARD)
    if (path / "checkpoints").is_dir() and not (path / "checkpoints").is_symlink() and not any((path / "checkpoints").iterdir()):
        (path / "checkpoints").rmdir()
    ours = {MARKER, REPLACED, "checkpoints"}
    return foreign + sorted(entry for entry in path.iterdir() if entry.name not in ours)


def _settle_replaced(path: Path) -> None:
    """An earlier run set aside by an --overwrite run that was killed (so never released): put back if that
    run recorded no step, deleted if it did (it replaced the earlier one)."""
    aside = path / REPLACED
    if not aside.is_dir() or aside.is_symlink():
        return
    if _holds_training(path):
        shutil.rmtree(aside)
        return
    for name in RUN_FILES:  # the killed run's own files, none of them a result
        if (path / name).is_file():
            (path / name).unlink()
    _put_back(path)


def _put_back(path: Path) -> None:
    """Undo set_aside: the earlier run's files where they were (this run wrote none that stayed)."""
    aside = path / REPLACED
    for entry in sorted(aside.iterdir()):
        if entry.name != "checkpoints":
            entry.rename(path / entry.name)
    folders = sorted((aside / "checkpoints").iterdir())
    if folders:
        (path / "checkpoints").mkdir(exist_ok=True)
    for folder in folders:
        folder.rename(path / "checkpoints" / folder.name)
    shutil.rmtree(aside)
