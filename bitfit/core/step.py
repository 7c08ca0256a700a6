"""THE BITFIT STEP: `train_step` is one optimizer step; `make_optimizer` builds the optimizer it steps,
and `lr_schedule` (`lr_factor`) gives the learning rate of each step.

Read `train_step` first: forward each pass, backward into the flat gradient, sum over processes,
normalize by the step's label tokens, clip, read what the step did, update, zero. Everything around a
step (logging, metrics, checkpoints, stopping) is train.py's loop, `fit`: between steps, never inside.
"""

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from bitfit.core.errors import NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import HOST_KEYS, Batch, input_tokens, label_tokens, loss_sum

# ----------------------------------------------------------------------------------------------------
# THE BITFIT STEP BEGIN
# ----------------------------------------------------------------------------------------------------

def train_step(model: nn.Module, flat: FlatBiases, optimizer: torch.optim.Optimizer, passes: list[Batch],
               grad_clip: float, bf16: bool) -> dict:
    """One optimizer step over this process's passes of the step's examples (each counted on the host:
    core.loss.counted). Returns the whole step's (every process's) mean loss per label token, gradient
    norm, label tokens and input tokens.

    Token-weighted: each pass backpropagates its plain sum of token losses; the step's label tokens, known
    once every pass on every process is done, then divide the summed gradient, so each token weighs the same
    whatever pass or process it landed in, and every layout gives the same gradient. (A classifier's
    "label tokens" are its rows, one label each.) The host reads what the step did ONCE, before the update:
    a NaN or inf loss, gradient or bias raises there, and nothing moves. A measure of the gradient goes into
    `record` here, before the update (the gradient is zeroed after it); one of the biases, in train.py's loop."""
    device = flat.grads.device
    summed = torch.zeros((), dtype=torch.float64, device=device)
    for batch in passes:
        batch = {key: value if key in HOST_KEYS else to_device(value, device) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_sum(model, batch)
        loss.backward()  # autograd adds each bias's gradient in place into its view of flat.grads
        summed += loss.detach()
    n_labels, n_tokens = sum(label_tokens(b) for b in passes), sum(input_tokens(b) for b in passes)  # on the host
    totals = torch.stack([summed, summed.new_full((), n_labels), summed.new_full((), n_tokens)])  # fills: no copy
    # ONE all-reduce of the whole flat gradient (4 bytes per bias), one of three numbers; no-ops in one process.
    summed_over_processes(flat.grads)
    summed_over_processes(totals)
    flat.grads.div_(totals[1])
    # The norm, the clip and the optimizer each see ONE tensor: the flat buffers, not hundreds of small biases.
    norm = torch.nn.utils.clip_grad_norm_([flat.param], grad_clip if grad_clip > 0 else math.inf)
    loss_total, n_labels, n_tokens, grad_norm, biases_finite = torch.stack(  # THE one read of the step
        [*totals, norm.double(), torch.isfinite(flat.values).all().double()]).tolist()
    record = {"loss": loss_total / n_labels, "grad_norm": grad_norm,  # the norm before clipping
              "label_tokens": int(n_labels), "tokens": int(n_tokens)}
    if not (math.isfinite(loss_total) and math.isfinite(grad_norm) and biases_finite):
        flat.zero_grad()
        raise NonFiniteError(f"loss {record['loss']}, gradient norm {grad_norm}" if biases_finite else
                             "the biases hold NaN or inf: the update of the step before made them so (is --lr or "
                             "--weight-decay too large?)")
    optimizer.step()
    flat.zero_grad()  # in place: the bias gradients stay views of the buffer (never optimizer.zero_grad())
    return record

# THE BITFIT STEP END ---------------------------------------------------------------------------------


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting: on CUDA, copied from pinned memory, which runs
    behind the device's queued work (a copy from ordinary memory would wait for it)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def summed_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process of a torchrun launch, in place; itself in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def make_optimizer(param: torch.Tensor, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """THE optimizer, over `param`: the ONE flat fp32 tensor of every trainable bias (FlatBiases.param).
    AdamW, fused (one kernel for the whole update) on CUDA and the CPU; its state is two more tensors of
    the buffer's size. Swap it here for any torch.optim optimizer (drop `fused` where it has none): the
    step calls only its step(), a checkpoint saves and restores whatever its state_dict() holds
    (bitfit.run.checkpoint), and the checks and --help of --lr, --eps, --beta1/2 and --weight-decay follow
    what this builds (bitfit.run.config.optimizer_in_use calls it on one number: the bounds of Adam's family
    apply to that family alone, and a flag the optimizer takes no value for is refused). A hyperparameter
    of a new kind is a new TrainConfig field, passed here from train.py and listed in config.OPTIMIZER_FLAGS."""
    return torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=param.device.type in ("cuda", "cpu"))


def lr_schedule(optimizer: torch.optim.Optimizer, peak_lr: float, total: int, warmup: int, schedule: str,
                first_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr of every step, `peak_lr` x lr_factor: a pure function of the step, so a run resumed after
    `first_step` steps goes on exactly where the interrupted one was."""
    for group in optimizer.param_groups:
        group["initial_lr"] = peak_lr  # what LambdaLR scales; a resumed optimizer's own lr is the last step's
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total=total, warmup=warmup, schedule=schedule), last_epoch=first_step - 1)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay.

    The same formulas as transformers' get_{linear,cosine,constant}_schedule_with_warmup, so runs
    compare step for step with the HF Trainer recipe.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}: linear, cosine or constant")
