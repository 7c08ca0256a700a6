"""The training loop: `train_step` is one optimizer step of BitFit; `fit` is everything around it.

Read `train_step` first: forward each pass, backward into the flat gradient, sum over processes,
normalize by the step's label tokens, clip, AdamW, zero. Logging, metrics, checkpoints and stopping
live in `fit`, between steps, never inside one.
"""

import json
import math
import os
import resource
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .checkpoint import latest_checkpoint, save_checkpoint
from .collate import idle_pass
from .config import TrainConfig
from .data import Example
from .errors import Interrupted, NonFiniteError
from .files import append
from .flat import FlatBiases
from .interrupt import StopRequest
from .layout import Passes
from .loss import Batch, input_tokens, label_tokens, loss_sum


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay.

    The same formulas as transformers' get_{linear,cosine,constant}_schedule_with_warmup, so runs
    compare step for step with the seeds' Trainer recipe.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


# ----------------------------------------------------------------------------------------------------
# THE BITFIT STEP
# ----------------------------------------------------------------------------------------------------

def train_step(model: nn.Module, flat: FlatBiases, optimizer: torch.optim.Optimizer, passes: list[Batch],
               grad_clip: float, bf16: bool) -> dict:
    """One optimizer step over this process's passes of the step's examples. Returns the whole step's
    (every process's) mean loss per label token, gradient norm, label tokens and input tokens.

    Why token-weighted: the step's loss is its summed token losses over its label tokens, so each token
    weighs the same whatever pass or process it landed in, and every layout gives the same gradient.
    (A classifier's "label tokens" are its rows, one label each: the step's loss is the mean over them.)
    Each pass backpropagates its plain sum; the step's token count, known once every pass on every
    process is done, then divides the summed gradient.
    """
    device = flat.grads.device
    summed = torch.zeros((), dtype=torch.float64, device=device)
    for batch in passes:
        batch = {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_sum(model, batch)
        loss.backward()  # autograd adds each bias's gradient in place into its view of flat.grads
        summed += loss.detach()
    n_labels, n_tokens = sum(label_tokens(b) for b in passes), sum(input_tokens(b) for b in passes)  # on the host
    totals = torch.stack([summed, summed.new_tensor(n_labels), summed.new_tensor(n_tokens)])
    # Sum every process's share: ONE all-reduce of the whole flat gradient (4 bytes per bias, whatever
    # the model's size), one of three numbers. Both are no-ops in a single process.
    distributed.sum_(flat.grads)
    loss_total, n_labels, n_tokens = distributed.sum_(totals).tolist()
    flat.grads.div_(n_labels)
    # The norm, the clip and AdamW each see ONE tensor: the flat buffers, not hundreds of small biases.
    grad_norm = torch.nn.utils.clip_grad_norm_([flat.param], grad_clip if grad_clip > 0 else math.inf).item()
    record = {"loss": loss_total / n_labels, "grad_norm": grad_norm, "label_tokens": int(n_labels), "tokens": int(n_tokens)}
    if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"loss {record['loss']}, gradient norm {grad_norm}")  # raised before the biases move
    optimizer.step()
    flat.zero_grad()  # in place: the bias gradients stay views of the buffer (never optimizer.zero_grad())
    return record


# ----------------------------------------------------------------------------------------------------

def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on CUDA, the process's resident set (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: this process's own peak. ru_maxrss is not: on Linux it carries over from the process
        # that started this one (a parent that peaked at 1.7 GB makes every child "peak" at 1.7 GB).
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        return int(line.split()[1]) / 2**20  # KiB
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fit(model: nn.Module, flat: FlatBiases, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, plan: list[Passes], examples: list[Example],
        collate, cfg: TrainConfig, run_dir: Path, stop: StopRequest, first_step: int = 0,
        held_out: Callable[[], dict] | None = None) -> list[dict]:
    """Train the steps of `plan` (this process's passes of every step) after `first_step`; return one
    record per step, also appended to run_dir/metrics.jsonl as it is made, with its time and tokens/s.

    Between steps: the held-out measures of `held_out()` every --eval-every steps (rank 0, every
    process under sharded weights; the last
    step's are the evaluation after training), a log line every --log-every steps, a checkpoint every
    --save-every steps, and on a Ctrl-C/SIGTERM a checkpoint and Interrupted (all processes agree
    first). A NaN or inf (in the loss or gradient, caught before AdamW steps; or in the biases after it)
    raises NonFiniteError naming the step and its training examples: nothing of that step is saved.
    """
    model.train()
    device = flat.values.device
    main = distributed.is_main()  # under torchrun, rank 0 alone logs and writes
    records, since_log, tokens_since_log = [], time.perf_counter(), 0
    # Unbuffered: each line reaches the file whole or not at all (files.append), and closing it has nothing
    # left to write, so a full disk is one error, said once.
    with open(run_dir / "metrics.jsonl" if main else os.devnull, "ab", buffering=0) as metrics, \
            tqdm(total=len(plan), initial=first_step, desc="training", unit="step", dynamic_ncols=True,
                 disable=not main) as bar:
        for step in range(first_step + 1, len(plan) + 1):
            stop.at_once, stop.finishing = None, f"step {step}, then writing a checkpoint"
            passes = [collate([examples[i] for i in indices]) if indices else idle_pass() for indices in plan[step - 1]]
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            try:
                record = {"step": step, "lr": lr, **train_step(model, flat, optimizer, passes, cfg.grad_clip, cfg.bf16)}
                flat.check()  # every bias still a view of what AdamW stepped (else training silently stops)
                if not bool(torch.isfinite(flat.values).all()):  # a finite gradient with a huge lr can still overflow
                    raise NonFiniteError("the AdamW step left NaN or inf in the biases (is --lr or --weight-decay too large?)")
            except NonFiniteError as error:
                held = sorted((examples[i]["row"], examples[i]["place"]) for indices in plan[step - 1] for i in indices)
                whose = "this process's share of the step" if distributed.active() else "the step"
                raise NonFiniteError(f"step {step}: {error}; {whose} held the training examples of "
                                     f"{', '.join(place for _, place in held)}; nothing of this "
                                     f"step was saved and no delta was written; last good checkpoint: "
                                     f"{latest_checkpoint(run_dir) or 'none (see --save-every)'}") from None
            scheduler.step()
            record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - started)
            record["time"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
            if held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < len(plan):
                record.update(held_out())  # rank 0; every process under sharded weights, where it is a collective
            if main and "eval_loss" in record:
                bar.write(f"step {step:>5}/{len(plan)} | held-out loss {record['eval_loss']:.4f}" + (
                    f" | exact match {100 * record['eval_exact_match']:.1f}%" if "eval_exact_match" in record else ""))

            records.append(record)
            append(metrics, run_dir / "metrics.jsonl", (json.dumps(record, allow_nan=False) + "\n").encode())  # strict JSON
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            tokens_since_log += record["tokens"]
            if main and (step % cfg.log_every == 0 or step == len(plan)):
                elapsed, since_log = time.perf_counter() - since_log, time.perf_counter()
                bar.write(f"step {step:>5}/{len(plan)} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                          f"grad norm {record['grad_norm']:.3f} | {tokens_since_log / elapsed:,.0f} tok/s | "
                          f"peak mem {peak_memory_gb(device):.2f} GB")
                tokens_since_log = 0

            stopping = distributed.any_rank(stop.asked, device)
            if main and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
                save_checkpoint(run_dir, step, flat, optimizer, cfg.keep_checkpoints)
            if stopping:
                distributed.barrier()  # the checkpoint is whole before any process exits
                launcher = "torchrun ... train.py" if distributed.active() else "python train.py"
                raise Interrupted(f"stopped after step {step}; checkpoint {latest_checkpoint(run_dir)}; "
                                  f"resume with: {launcher} --resume {run_dir}")
    return records
