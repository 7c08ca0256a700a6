"""Which process this is, and what the processes of a torchrun launch agree on between steps.

Every helper is a no-op in one process (no process group: plain `python train.py`), so the run reads
the same either way. The process group itself is joined in bitfit/parallel/torchrun.py; the one sum
inside a step (the flat gradient's) is bitfit.core.step's.
"""

import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from bitfit.core.errors import BitfitError

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: torchrun's RANK before the group is joined or after it is left, 0 alone."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that talks and writes."""
    return rank() == 0


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: ranks must agree before they stop."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast(value):
    """Rank 0's value on every rank (the output folder's name, which holds a timestamp, or why it was refused)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's value, in rank order, on every rank ([value] in one process)."""
    if not active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_main(work: Callable[[], T]) -> T | None:
    """`work()` on process 0, which alone reads and writes the run folder; its BitfitError is raised on
    every process, so that none is left waiting at a collective (torchrun). The others get None."""
    result, error = None, ""
    if is_main():
        try:
            result = work()
        except BitfitError as failure:
            error = str(failure)
    if error := broadcast(error):
        raise BitfitError(error)
    return result


def say_once(message: str, own_error: bool = False) -> None:
    """Print why the run ended ONCE, under torchrun too (on stderr).

    Process 0 speaks for all: the processes agree on non-finite values and on interrupts, and a bad input
    fails every process alike. An input error could still be one process's own (a file only it cannot
    read), so another process with an input error waits a few seconds first: when process 0 fails alike,
    torchrun ends this process before it speaks; otherwise it says what went wrong where."""
    if rank() == 0:
        print(message, file=sys.stderr)
    elif own_error:
        time.sleep(5)
        print(f"{message} (process {rank()})", file=sys.stderr)


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
