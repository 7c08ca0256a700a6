"""Writing files so that a crash or a full disk never leaves a half-written one that looks whole.

A file is written under a hidden temporary name in the folder it belongs in, flushed to the disk, and
only then renamed to its name: a rename within one folder is atomic, so the name holds either the old
file or the whole new one. Whatever goes wrong, the temporary file is removed.

Files get the permissions any new file of the user gets (0o666 less the umask: 0644 usually), not the
0600 that temporary-file functions and safetensors give, so a merged model can be shared like any other.
"""

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BitfitError


def umask() -> int:
    """The process's umask. os.umask can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode a new folder gets from mkdir: 0o777 less the umask."""
    return 0o777 & ~umask()


def fsync(path: Path) -> None:
    """Flush a file's or folder's contents to the disk (for a folder: the names in it, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cannot_write(path: Path, error: OSError) -> BitfitError:
    """A one-line error for an OSError met while writing `path`, saying plainly when the disk is full."""
    reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    return BitfitError(f"cannot write {path}: {reason}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path`, replacing a file there only once the new one is whole on the disk.

    On any failure the temporary file is removed and an earlier file at `path` is left as it was; an
    OSError (disk full, no permission, no such folder) becomes a BitfitError.
    """
    temporary = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".writing")
        temporary = Path(name)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            os.fchmod(file.fileno(), file_mode())  # mkstemp makes it 0600
        os.replace(temporary, path)
        temporary = None
        fsync(path.parent)  # the rename itself reaches the disk
    except OSError as error:
        raise cannot_write(path, error) from None
    finally:  # also on Ctrl-C or any other exception
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def write_json(path: Path, value) -> None:
    """`value` as indented, strict JSON (a NaN or inf raises ValueError, never reaches the file), written
    with write_atomically."""
    write_atomically(path, (json.dumps(value, indent=2, allow_nan=False) + "\n").encode())


def check_new_folder(given: str, flag: str) -> Path:
    """`given` as an absolute path, if bitfit may create a folder there: it does not exist, or is an empty
    folder, in a place this user may write. Never a file, never a folder that holds anything (a base
    model's folder, a run folder): nothing already there is overwritten."""
    out = Path(given).resolve()  # '.' and 'a/..' have no name to rename a finished folder to
    try:
        if out.exists() and not out.is_dir():
            raise BitfitError(f"{flag} {given} is a file: give a new folder, or an empty one")
        if out.is_dir() and any(out.iterdir()):
            raise BitfitError(f"{flag} {given} is a folder that is not empty: give a new folder, or an empty one, "
                              "so that nothing already there is overwritten")
        nearest = next(folder for folder in out.parents if folder.exists())  # where the first new folder goes
        if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
            raise BitfitError(f"cannot write {flag} {given}: {nearest} is not a folder this user may write in")
    except OSError as error:  # a folder we may not list
        raise BitfitError(f"cannot use {flag} {given}: {error.strerror or error}") from None
    return out


def write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Make the folder `out` (checked by check_new_folder) whole or not at all: `fill` writes (and may
    check) a hidden folder beside it; its files and folders then get a new file's usual permissions
    (safetensors and mkdtemp write 0600 and 0700, and a model folder is meant to be shared) and are
    flushed to the disk, and it is renamed to `out`. A failure, a Ctrl-C or a full disk leaves no `out` and no hidden folder
    (parent folders created for it stay)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing-"))
    except OSError as error:
        raise cannot_write(out, error) from None
    try:
        fill(staging)
        for path in staging.rglob("*"):
            os.chmod(path, folder_mode() if path.is_dir() else file_mode())
            if path.is_file():
                fsync(path)  # the files reach the disk before the name that says they are whole
        os.chmod(staging, folder_mode())
        staging.rename(out)  # replaces an empty folder; fails, writing nothing, if one appeared meanwhile
        fsync(out.parent)
    except OSError as error:
        raise cannot_write(out, error) from None
    finally:  # gone after the rename; otherwise whatever was written so far
        shutil.rmtree(staging, ignore_errors=True)
