"""Data parallelism under torchrun: which process does what, and the few collectives the loop needs.

    torchrun --nproc_per_node=N train.py ...

Every process loads the same model and data and plans the same steps (the order is a pure function of
the seed); each takes its share of every step's examples (bitfit.layout.share) and runs them in its own
passes. After its passes, ONE all-reduce sums the flat gradient buffer (4 bytes per bias: 1.6 MB for
bloomz-1b1) and one more sums three numbers (the loss, the label tokens, the input tokens), so the step
is normalized by the whole step's label tokens exactly as in one process; every process then takes the
same AdamW step. Rank 0 alone prints, evaluates (all do under --shard-weights: bitfit.sharding), writes
metrics, checkpoints and the delta. Without torchrun (no WORLD_SIZE, or 1) none of this runs and every
helper is a no-op.
"""

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, int]:
    """Join torchrun's process group if launched by it: (rank, world size, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # gloo: CPU tensors, the tests' machine
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    if dist.get_rank() != 0:
        _quiet_progress_bars()
    return dist.get_rank(), world, local_rank


def _quiet_progress_bars() -> None:
    """Only rank 0 draws progress bars. Another process's half-drawn bar (written with \\r, no newline)
    would otherwise share a line with rank 0's output, e.g. `...20/20 [00:00]error: ...`."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0, or the only process: the one that talks and writes."""
    return not active() or dist.get_rank() == 0


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (no-op in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: ranks must agree before they stop."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def share(value):
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


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    if active():
        dist.destroy_process_group()
