"""A run's folder: bitfit writes only into a folder it created, and only one run at a time.

    runs/20261123-151200/      the default name; a second run in the same second gets ...-2, and so on
        .bitfit-run            written first, into a folder that was new or empty: it marks the folder as
                               bitfit's, and the run holds a lock on it (with its pid) while it owns it
        .replaced/             --overwrite: the earlier run, set aside until the new run has finished

So `--out-dir` pointing at a model's folder, a home directory or any folder with files that bitfit did
not write is refused before anything is written, and two runs never share a folder (two runs started
in the same second, or two given the same `--out-dir`). A run that fails before it recorded a step gives
the folder back as it found it (`release`): no folder holding only a config.json passes for a run.

The life of an earlier run under --overwrite, whatever stops a command at whatever write:
    set aside     its files move into .setting-aside/, which is renamed .replaced/ once all are in
    the new run   fails before its first step: its files go, the earlier run comes back (via .returning/)
                  fails or is killed later: both stay, the new run resumable, the earlier one set aside
                  finishes (its delta and results.json written): only then is .replaced/ deleted
Every command that claims the folder first settles what a killed one left half done (`_settle`): a move
cut short is completed back, a set-aside run whose replacement never trained comes back, and one whose
replacement finished goes. So a finished delta is lost only to a newer finished delta. The three hidden
names are bitfit's own: a link, a file, or a folder holding anything bitfit did not put there is refused
before anything moves.
"""

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO

from bitfit.core.errors import BitfitError
from bitfit.files import parse_json, write_error, write_json
from bitfit.run import checkpoint


MARKER = ".bitfit-run"
REPLACED = ".replaced"  # --overwrite: the earlier run's files, set aside until the new run has finished
SETTING_ASIDE = ".setting-aside"  # the earlier run's files on their way into REPLACED
RETURNING = ".returning"  # the earlier run's files on their way back out of REPLACED
ASIDE = (SETTING_ASIDE, RETURNING, REPLACED)  # bitfit's own hidden folders of an earlier run
# What a run writes, and so what --overwrite may set aside: nothing else in the folder is touched.
DELTA = "delta.safetensors"  # the trained delta: the one file a finished run is for
RESULTS = "results.json"  # written last: a run that has it finished
RUN_FILES = (DELTA, RESULTS, "eval_before.json", "metrics.jsonl", "loss.png", "measures.png", "config.json",
             "inputs.json", "bias_change.png")  # every file a run (or its inspection) writes: --overwrite sets them aside
TENSORBOARD = "tensorboard"  # --report-to tensorboard: a folder of TensorBoard's event files, made at the first step
EVENTS = "events.out.tfevents."  # how the name of each of those files starts

# This process's runs until release(): the open, locked marker, the folder, the folders the run created
# for it (the folder and any parents that did not exist, deepest first), and whether it wrote the marker.
_held: list[tuple[IO, Path, list[Path], bool]] = []


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file()


def _lock(path: Path, created: list[Path]) -> None:
    """Take the folder's lock, or say which process holds it. The OS drops it when this process ends,
    however it ends, so a killed run never leaves a folder locked."""
    marked = not (path / MARKER).exists()
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
        if marked:
            (path / MARKER).unlink(missing_ok=True)
        _remove_empty(created)
        raise
    _held.append((marker, path, created, marked))


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
    """The run's folder, created or checked, marked and locked for this process, with whatever a killed
    run left half done settled (`_settle`).

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
            checkpoints = path / "checkpoints"
            if checkpoints.is_symlink() or (checkpoints.exists() and not checkpoints.is_dir()):
                raise BitfitError(f"{checkpoints} is named like the folder of a run's checkpoints, but is "
                                  f"{'a link' if checkpoints.is_symlink() else 'no folder'}: bitfit never writes or "
                                  "deletes through it; move it out, or pick another --out-dir")
            if (path / TENSORBOARD).exists() and not _own_events(path / TENSORBOARD):
                raise BitfitError(f"{path / TENSORBOARD} is named like the folder of TensorBoard event files a run "
                                  "writes, but holds something else: move it out, or pick another --out-dir")
            if occupied:  # a run would fail to write it, at the end: say so now
                raise BitfitError(f"{occupied[0]} is named like a file a run writes, but is "
                                  f"{'a link' if occupied[0].is_symlink() else 'no file'}: move it out, or pick another --out-dir")
            for name in ASIDE:  # before the lock writes anything
                _check_own(path / name)
            created = _missing(path)
            path.mkdir(parents=True, exist_ok=True)
        _lock(path, created)
        _settle(path)
    except OSError as error:
        raise write_error(Path(out_dir or "runs"), error) from None
    return path


def release(failed: bool = False) -> None:
    """Drop this process's folder locks (a run ends; the OS drops them anyway when the process exits).

    A run that `failed` before it recorded anything of its training (no metrics line, checkpoint or
    delta) takes its files away again, and an earlier run set aside (--overwrite) comes back; the marker
    and the folder go too where this run made them. A run that finished (its delta and results written)
    deletes the earlier run it replaced. A run that failed after it trained leaves everything as it is:
    itself resumable, and the earlier run set aside until it finishes. Anything bitfit did not write
    always stays."""
    while _held:
        marker, path, created, marked = _held.pop()
        try:
            if failed and not holds_training(path):
                _drop_run_files(path)
                if (path / REPLACED).exists():
                    _put_back(path)
                elif marked:
                    (path / MARKER).unlink(missing_ok=True)
                    _remove_empty(created)
            elif finished(path) and (path / REPLACED).exists():
                shutil.rmtree(path / REPLACED)  # only bitfit's files: claim checked it (_check_own)
        except (OSError, BitfitError) as error:  # the run's own outcome stands; the next claim settles the rest
            print(f"warning: {path} was not tidied up ({error}); the next run there settles it", file=sys.stderr)
        finally:
            marker.close()


def finished(path: Path) -> bool:
    """Whether the run in `path` finished: its delta and, written last, its results."""
    return (path / DELTA).is_file() and (path / RESULTS).is_file()


def holds_training(path: Path) -> bool:
    """Whether the run in `path` recorded anything of its training: a step's metrics, a checkpoint, a delta."""
    metrics = path / "metrics.jsonl"
    return (path / DELTA).exists() or bool(checkpoint.checkpoints(path)) or (
        metrics.is_file() and metrics.stat().st_size > 0)


def replaced(path: Path) -> bool:
    """Whether an earlier run is set aside in `path`, waiting for the run there to finish."""
    return (path / REPLACED).is_dir()


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


def same_inputs(path: Path, inputs: dict[str, str], resuming: bool) -> None:
    """Record what a run trains and measures on (hashes of its model, its data and its held-out data) in
    inputs.json, or, resuming, refuse if they differ from the recorded ones: the data order and the biases
    would no longer match, nor the measures before and after. (A run of a bitfit that recorded no held-out
    hash is not checked on it.)"""
    file = path / "inputs.json"
    if resuming and not file.is_file():
        raise BitfitError(f"--resume {path}: its inputs.json is gone; it records the hashes of the model and data the "
                          "run started with, which a resume must match: restore it, or start a new run")
    if resuming:
        try:
            recorded = parse_json(file.read_text())
        except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
            recorded = f"cannot be read ({error})"
        needed = [name for name in inputs if name != "held-out data"]
        if not isinstance(recorded, dict) or not all(isinstance(recorded.get(name), str) for name in needed):
            why = recorded if isinstance(recorded, str) else f"does not hold the {' and '.join(needed)} hashes"
            raise BitfitError(f"--resume {path}: {file} {why}; it records the hashes of the model and data the run "
                              "started with, which a resume must match: restore it, or start a new run")
        changed = [name for name in inputs if name in recorded and recorded[name] != inputs[name]]
        if changed:
            raise BitfitError(f"--resume {path}: the {' and the '.join(changed)} changed since the run started "
                              f"({', '.join(f'{n} {recorded[n]} then, {inputs[n]} now' for n in changed)}); "
                              "resume needs the same ones (restore them), or start a new run")
        return
    write_json(file, inputs)


# ----------------------------------------------------------------------------------------------------
# --overwrite: the earlier run set aside, put back, or deleted once replaced
# ----------------------------------------------------------------------------------------------------


def set_aside(path: Path) -> tuple[list[Path], str]:
    """--overwrite: move what the earlier run wrote here (its files by name, its checkpoint folders, its
    TensorBoard events) into REPLACED, where it stays until this run finishes (`release`), and comes
    back if this run fails before its first step: a typo in the new command costs nothing.

    Where an earlier --overwrite run left a run set aside and stopped after it trained without finishing,
    the one of the two with a delta is the one kept: that run's delta if it has one (a finished delta
    replaces an earlier one), else the set-aside run, and the unfinished run's own files go.
    Returns what stays where it is (links and anything else bitfit did not write) and what was discarded,
    for the log."""
    own, foreign = checkpoint.own_and_foreign(path)  # refuses a mixed checkpoint folder before anything moves
    discarded = ""
    if (path / REPLACED).exists():  # _settle left it: the run here trained, and did not finish
        if (path / DELTA).is_file():
            shutil.rmtree(path / REPLACED)
            discarded = f"the run set aside in {path / REPLACED} (the one here has a newer delta)"
        else:
            steps = [folder.name for folder in own]
            _drop_run_files(path)
            _put_back(path)
            discarded = (f"the unfinished run that had set it aside ({', '.join(steps) or 'no checkpoint'}); "
                         "the run it replaced is the one set aside now")
            own, foreign = checkpoint.own_and_foreign(path)
    moving = [name for name in RUN_FILES if (path / name).is_file() and not (path / name).is_symlink()]
    events = _own_events(path / TENSORBOARD)
    for unfinished in _unfinished_writes(path):  # files.write_atomically's, left by a killed run
        unfinished.unlink(missing_ok=True)
    if moving or own or events:
        staging = path / SETTING_ASIDE
        try:
            (staging / "checkpoints").mkdir(parents=True)
            for folder in own:
                folder.rename(staging / "checkpoints" / folder.name)
            for name in moving:
                (path / name).rename(staging / name)
            if events:  # else the new run's events would be drawn as one run with the old
                (path / TENSORBOARD).rename(staging / TENSORBOARD)
        except BaseException:  # a full disk at the first mkdir, a Ctrl-C: back as it was (renames need no space)
            if staging.exists():
                _move_out(staging, path)
            raise
        staging.rename(path / REPLACED)  # all of it set aside at once
    if (path / "checkpoints").is_dir() and not (path / "checkpoints").is_symlink() and not any((path / "checkpoints").iterdir()):
        (path / "checkpoints").rmdir()
    ours = {MARKER, REPLACED, "checkpoints"}
    return foreign + sorted(entry for entry in path.iterdir() if entry.name not in ours), discarded


def _check_own(aside: Path) -> None:
    """Refuse, before anything moves, a hidden folder of an earlier run (ASIDE) that is a link or a file, or
    that holds anything bitfit does not put there: its content is moved back or deleted whole."""
    if aside.is_symlink():
        problem = "is a link"
    elif not aside.exists():
        return
    elif not aside.is_dir():
        problem = "is no folder"
    else:
        foreign = [entry.name for entry in sorted(aside.iterdir()) if not (
            entry.name in RUN_FILES and entry.is_file() and not entry.is_symlink()
            or entry.name == TENSORBOARD and _own_events(entry)
            or entry.name == "checkpoints" and entry.is_dir() and not entry.is_symlink()
            and all(checkpoint.is_own(folder) for folder in entry.iterdir()))]
        if not foreign:
            return
        problem = f"holds what bitfit did not put there ({', '.join(foreign[:3])})"
    raise BitfitError(f"{aside} is where --overwrite keeps an earlier run, but it {problem}: move it out (bitfit "
                      "moves nothing in this folder until then)")


def _settle(path: Path) -> None:
    """What a killed command left half done with an earlier run, settled before this one does anything:
    a move cut short is completed back (SETTING_ASIDE, RETURNING); a run set aside (REPLACED) comes back
    if the run that replaces it never trained, goes if that run finished, and stays while it is unfinished."""
    for name in (SETTING_ASIDE, RETURNING):
        if (path / name).exists():
            _move_out(path / name, path)
    if not (path / REPLACED).exists():
        return
    if finished(path):  # killed after it finished, before release deleted what it replaced
        shutil.rmtree(path / REPLACED)
    elif not holds_training(path):  # killed before its first step: it replaced nothing
        _drop_run_files(path)
        _put_back(path)


def _put_back(path: Path) -> None:
    """The set-aside run where it was: REPLACED renamed RETURNING (so a crash from here on is completed by
    _settle, never mistaken for a new run's files), then emptied into `path`."""
    (path / REPLACED).rename(path / RETURNING)
    _move_out(path / RETURNING, path)


def _move_out(aside: Path, path: Path) -> None:
    """Every entry of a hidden folder of bitfit's back into the run folder (checkpoints into its
    checkpoints/), then the hidden folder removed. A name already taken there is refused, not replaced."""
    for entry in sorted(aside.iterdir()):
        if entry.name == "checkpoints":
            continue
        if (path / entry.name).exists() or (path / entry.name).is_symlink():
            raise BitfitError(f"{path / entry.name} is in the way of the earlier run's {entry.name} kept in {aside}: "
                              "move one of the two out")
        entry.rename(path / entry.name)
    if (aside / "checkpoints").is_dir():
        for folder in sorted((aside / "checkpoints").iterdir()):
            target = path / "checkpoints" / folder.name
            if target.exists() or target.is_symlink():
                raise BitfitError(f"{target} is in the way of the earlier run's checkpoint kept in {folder}: move "
                                  "one of the two out")
            target.parent.mkdir(exist_ok=True)
            folder.rename(target)
        (aside / "checkpoints").rmdir()
    aside.rmdir()


def _drop_run_files(path: Path) -> None:
    """Delete the files of the run in `path` (not the marker): its files by name, its checkpoint folders
    (file by file), its TensorBoard events, what a killed write left. Nothing else is touched."""
    for name in RUN_FILES:
        if (path / name).is_file() and not (path / name).is_symlink():
            (path / name).unlink()
    folders = path / "checkpoints"
    if folders.is_dir() and not folders.is_symlink():
        for folder in folders.iterdir():
            checkpoint.remove(folder)  # only a folder of bitfit's own files, finished or being written
        if not any(folders.iterdir()):
            folders.rmdir()
    if _own_events(path / TENSORBOARD):
        shutil.rmtree(path / TENSORBOARD)
    for unfinished in _unfinished_writes(path):
        unfinished.unlink(missing_ok=True)


def _unfinished_writes(path: Path) -> list[Path]:
    """What a killed files.write_atomically left beside a run file: a hidden temporary of that name."""
    return [leftover for name in RUN_FILES for leftover in path.glob(f".{name}.*.writing")]
