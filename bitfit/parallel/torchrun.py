"""Data parallelism under torchrun: joining its process group. train.py imports this module only when
torchrun launched it (WORLD_SIZE > 1); a run in one process never loads it.

    torchrun --nproc_per_node=N train.py ...

Every process loads the same model and data and plans the same steps (the order is a pure function of
the seed); each takes its share of every step's examples (bitfit.data.layout.deal) and runs them in its
own passes. After its passes, ONE all-reduce sums the flat gradient buffer (4 bytes per bias: 1.6 MB for
bloomz-1b1) and one more sums three numbers (the loss, the label tokens, the input tokens), so the step
is normalized by the whole step's label tokens exactly as in one process (bitfit.core.step); every
process then takes the same AdamW step. Rank 0 alone prints, evaluates (all do under --shard-weights:
bitfit.parallel.sharding), writes metrics, checkpoints and the delta (bitfit.run.ranks says which
process this is).
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
