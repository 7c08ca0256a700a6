"""Writing files so that a crash or a full disk never leaves a half-written one that looks whole; and
reading JSON back so that no content, however made, ends in a traceback (parse_json).

A file is written under a hidden temporary name in the folder it belongs in, flushed to the disk, and
only then renamed to its name: a rename within one folder is atomic, so the name holds either the old
file or the whole new one. Whatever goes wrong, the temporary file is removed.

Files get the permissions any new file of the user gets (0o666 less the umask: 0644 usually), not the
0600 that temporary-file functions and safetensors give, so a merged model can be shared like any other.
"""

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from bitfit.core.errors import BitfitError


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


# How libraries that write without Python's file objects (safetensors, tokenizers: Rust) report an OSError.
OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
NEARLY_FULL = 2**20  # bytes: with less free, a library's unexplained failure while writing is taken as a full disk


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system `path` is (or would be) on; None if that cannot be read."""
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size(n_bytes: float) -> str:
    """'512 B', '62.1 KiB', '1.3 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:,.1f} {unit}" if unit != "B" else f"{n_bytes} B"
        n_bytes /= 1024


def free_space(path: Path) -> str:
    """'12.0 MiB free there' for the file system `path` is (or would be) on."""
    free = free_bytes(path)
    return "free space unknown" if free is None else f"{size(free)} free there"


def write_error(path: Path, error: BaseException) -> BitfitError | None:
    """The one-line error for `error` met while writing `path`, whichever library raised it (an OSError,
    safetensors' or tokenizers' own error type carrying an OS error code, or any failure on a disk that
    is full); None when it is no write error (a bug, which keeps its traceback). Says plainly when the
    disk is full, and how much space is free there."""
    code = None
    if isinstance(error, OSError):
        code, reason = error.errno, error.strerror or str(error)
    elif match := OS_ERROR_IN_TEXT.search(str(error)):
        code = int(match[1] or match[2])
        reason = os.strerror(code)
    elif type(error).__module__.split(".")[0] in ("safetensors", "tokenizers") and \
            (free := free_bytes(path)) is not None and free < NEARLY_FULL:  # their errors may not say why
        code, reason = errno.ENOSPC, ""
    else:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    return BitfitError(f"cannot write {path}: {reason} ({free_space(path)})")


def cannot_write(path: Path, error: OSError) -> BitfitError:
    """A one-line error for an OSError met while writing `path` (see write_error)."""
    return write_error(path, error)


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
    try:
        out = Path(given).resolve()  # '.' and 'a/..' have no name to rename a finished folder to
    except RuntimeError as error:  # a link loop
        raise BitfitError(f"cannot use {flag} {given}: {error}") from None
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
    except BitfitError:  # `fill` refused (a check failed): its own words
        raise
    except Exception as error:  # noqa: BLE001: a library's write error (safetensors' is no OSError) is one line
        if (failure := write_error(out, error)) is None:
            raise  # not a write error: a bug, with its traceback
        raise failure from None
    finally:  # gone after the rename; otherwise whatever was written so far
        shutil.rmtree(staging, ignore_errors=True)


def append(file: BinaryIO, path: Path, data: bytes) -> None:
    """Add `data` to the end of `file` (opened 'ab' with buffering=0, so nothing waits in a buffer for a
    close that could fail), whole or not at all: after a failed write (a full disk) the file is cut back
    to where it ended, so it never ends in half a line, and the error is one line (write_error)."""
    end = file.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view) :]
    except OSError as error:
        try:
            file.truncate(end)
        except OSError:
            pass
        raise cannot_write(path, error) from None


def parse_json(text: str, strict: bool = True) -> object:
    """`text` as JSON, or a ValueError saying why not, whatever is wrong with it: bad syntax, nesting too deep
    for Python's parser (a RecursionError of its own), an integer past Python's digit limit. `strict`: NaN
    and Infinity, which Python's reader accepts and JSON does not, are refused too (bitfit's own files
    never hold them; data rows may, and their checks name them)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(text, **({"parse_constant": refuse} if strict else {}))
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def digest(value: object) -> str:
    """16 hex digits of the SHA-256 of `value` as JSON: a change to any part of it changes them."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finite_number(value: object) -> bool:
    """Whether a value read from JSON is a finite number (an int of any size counts if a float can hold it)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int of 400 digits
        return False
