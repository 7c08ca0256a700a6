"""What the entry points share on the command line: one-line argument errors and the --device check.

argparse's own errors (an unknown flag, `-n x`) print a usage block and then `prog: error: ...`, and
exit 2 from inside `parse_args`. Every other bad input of bitfit is ONE line `error: ...` with exit
code 2, printed by the entry point's main(). `ArgumentParser` here makes argparse's errors the same.
"""

import argparse
import functools
import re
import sys
from collections.abc import Callable

import torch

from bitfit.core.errors import BitfitError
from bitfit.files import check_new_folder
from bitfit.run.interrupt import started

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors raise BitfitError instead of printing usage and exiting.

    The entry point's main() catches BitfitError, prints it as `error: ...` and returns 2, as for any
    other bad input; --help still prints the help and exits 0.
    """

    def error(self, message: str) -> None:  # argparse's one hook for every parse error
        raise BitfitError(f"{message} (see --help)")


def add_trust_flags(cli: argparse.ArgumentParser) -> None:
    """--trust-remote-code and --trust-pickle-weights, as every command that loads a model takes them
    (train.py's come from its config, with the same meaning)."""
    cli.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")
    cli.add_argument("--trust-pickle-weights", action="store_true",
                     help="load weights stored as pickle (.bin/.pt), which can run any code they contain")


def delta_to_folder_args(argv: list[str] | None, description: str, out_help: str) -> argparse.Namespace:
    """The command line of a tool that makes a new folder of a delta (merge, the adapter export): --delta,
    --out, --model and the trust flags; --out is checked to be new or empty before any model loads (a
    refusal should not take a minute)."""
    cli = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("--delta", required=True, help="a delta.safetensors written by train.py")
    cli.add_argument("--out", required=True, help=out_help)
    cli.add_argument("--model", default="", help="the base model; '' means the one the delta names")
    add_trust_flags(cli)
    args = cli.parse_args(argv)
    check_new_folder(args.out, "--out")
    return args


def check_device(name: str) -> str:
    """`name` if it is 'auto', 'cpu', 'cuda' or 'cuda:N' for a GPU this machine has; else a BitfitError.

    Checked before a model is loaded: torch accepts 'meta' or 'tpu' here and fails later, with a traceback.
    """
    if not DEVICE.fullmatch(name):
        raise BitfitError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {name!r}")
    if name.startswith("cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            raise BitfitError(f"--device {name}: this machine has no CUDA device")
        if ":" in name and int(name.split(":")[1]) >= count:
            raise BitfitError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device or the host running out of memory (torch's CPU allocator says so in a
    RuntimeError of its own)."""
    said = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in said or "out of memory" in said))


def os_error(error: OSError) -> str:
    """'path: reason' of an OSError (the reason alone where it names no path)."""
    return f"{error.filename}: {error.strerror or error}" if error.filename else str(error.strerror or error)


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A command's main(argv) whose every failure a user can act on is ONE line and an exit code: 2 for
    bad input (a BitfitError), a path the system refuses (too long, a link loop, no permission: an
    OSError) or no memory left; 130 for Ctrl-C. Anything else is a bug in bitfit and keeps its traceback."""
    @functools.wraps(main)
    def guarded(argv: list[str] | None = None) -> int:
        started()  # Ctrl-C from here on is the KeyboardInterrupt answered below (bitfit.run.interrupt)
        try:
            return main(argv)
        except BitfitError as error:
            said, code = f"error: {error}", 2
        except KeyboardInterrupt:
            said, code = "interrupted", 130
        except OSError as error:
            said, code = f"error: {os_error(error)}", 2
        except Exception as error:  # noqa: BLE001: only out of memory; the rest re-raised
            if not out_of_memory(error):
                raise
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            said, code = f"error: out of memory ({first}): ask for less at once (fewer or shorter inputs, fewer new tokens)", 2
        print(said, file=sys.stderr)
        return code

    return guarded
