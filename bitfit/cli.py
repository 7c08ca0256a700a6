"""What the entry points share on the command line: one-line argument errors and the --device check.

argparse's own errors (an unknown flag, `-n x`) print a usage block and then `prog: error: ...`, and
exit 2 from inside `parse_args`. Every other bad input of bitfit is ONE line `error: ...` with exit
code 2, printed by the entry point's main(). `ArgumentParser` here makes argparse's errors the same.
"""

import argparse
import re

import torch

from .errors import BitfitError

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors raise BitfitError instead of printing usage and exiting.

    The entry point's main() catches BitfitError, prints it as `error: ...` and returns 2, as for any
    other bad input; --help still prints the help and exits 0.
    """

    def error(self, message: str) -> None:  # argparse's one hook for every parse error
        raise BitfitError(f"{message} (see --help)")


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
