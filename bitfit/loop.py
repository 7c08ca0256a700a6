"""The training loop: windows of micro-batches, one AdamW step over the flat bias buffer per window.

The loss of a window is the sum of its token losses over ALL its micro-batches divided by the number
of label tokens in the whole window. Averaging each micro-batch's mean loss instead (what the HF
Trainer did until late 2024) over-weights the tokens of short examples; with this normalization,
accumulating 8 micro-batches of 1 gives the same gradient as one batch of the same 8 examples.
"""

import functools
import inspect
import json
import math
import os
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .checkpoint import latest_checkpoint, save_checkpoint
from .collate import pack_batch
from .config import TrainConfig
from .data import IGNORE_INDEX, Example
from .errors import BitfitError, Interrupted, NonFiniteError
from .flat import FlatBiases

Window = list[list[int]]  # the micro-batches of one optimizer step, as indices into the examples


def make_windows(n_examples: int, batch_size: int, grad_accum: int, epochs: int, seed: int) -> list[Window]:
    """Every epoch: shuffle the example indices (seeded), cut them into micro-batches, group grad_accum
    micro-batches per window. The order is a pure function of the seed, so a resumed run finds its
    place from the step number alone. A last, shorter window of an epoch is kept: its loss is
    normalized by its own token count.
    """
    windows = []
    for epoch in range(epochs):
        order = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        micro = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        windows += [micro[s : s + grad_accum] for s in range(0, len(micro), grad_accum)]
    return windows


def regroup(window: Window, pass_size: int, lengths: list[int]) -> Window:
    """The examples of a window regrouped into forward passes of `pass_size`, longest first, so that
    sequences of similar length share a pass and little of it is padding.

    Because the window's loss is the sum of its token losses over its label-token count, how its
    examples are grouped into passes does not change the gradient (up to float rounding); fewer,
    larger passes use the hardware better on short sequences and cost more activation memory.
    """
    indices = sorted((i for micro in window for i in micro), key=lambda i: -lengths[i])
    return [indices[start : start + pass_size] for start in range(0, len(indices), pass_size)]


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


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that count in the loss: labels other than -100, after the one-position shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens of a padded or packed batch."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


@functools.cache
def _forward_accepts(model_class: type) -> frozenset[str]:
    """The keyword arguments a model class's forward takes (looked up once per class, not per micro-batch)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the next-token cross-entropies (fp32) at the labelled positions of a padded batch or packed row.

    Logits are computed only at positions followed by a label: the LM head's matmul and the
    (tokens x vocab) logits tensor, often the largest activation, shrink to the response tokens.
    Positions count from each sequence's first real token, so a left-padded sequence sees the same
    positions as an unpadded one (BLOOM's ALiBi does this by itself and takes no position_ids). A
    packed batch brings its own position ids, which also keep its sequences apart.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    accepts = _forward_accepts(type(model))
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:  # a packed row (collate.pack_batch): no padding, so no attention mask
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in accepts:
            inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepts:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def packing_gap(model: nn.Module, examples: list[Example], pad: Callable[[list[Example]], dict[str, torch.Tensor]]) -> float:
    """Relative difference between the loss of `examples` packed in one row and padded in rows.

    Near 0 (float rounding) when the model keeps packed sequences apart; far from 0 when its attention
    lets one example see another, which would silently train on a different problem.
    """
    if "position_ids" not in _forward_accepts(type(model)):
        raise BitfitError(f"--pack needs a model whose forward takes position_ids; {type(model).__name__} does not "
                          "(BLOOM's ALiBi attention, for one); leave --pack off")
    was_training = model.training
    model.eval()  # no dropout: both layouts must see the same function
    device = next(model.parameters()).device
    padded, packed = (loss_sum(model, {key: tensor.to(device) for key, tensor in collate(examples).items()})
                      for collate in (pad, pack_batch))
    model.train(was_training)
    return float((packed - padded).abs() / padded.abs().clamp(min=1e-12))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on CUDA, the process's resident set (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def fit(
    model: nn.Module,
    flat: FlatBiases,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    windows: list[Window],
    examples: list[Example],
    collate: Callable[[list[Example]], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    run_dir: Path,
    stop_asked: Callable[[], bool],
    start: tuple[int, int, torch.Tensor | None] = (0, 0, None),
) -> list[dict]:
    """Train over `windows` from `start` (step, micro-batch, loss so far in that window: a checkpoint's
    position); append one JSON line per optimizer step to run_dir/metrics.jsonl; return the records.

    Raises Interrupted (after writing a checkpoint) when `stop_asked()` turns true, and NonFiniteError
    before applying a step whose loss or gradient is NaN or inf.
    """
    model.train()
    main = distributed.is_main()  # under torchrun, rank 0 alone logs and writes
    first_step, first_micro, carried_loss = start
    records, since_log, tokens_since_log = [], time.perf_counter(), 0
    with open(run_dir / "metrics.jsonl" if main else os.devnull, "a") as metrics, \
            tqdm(total=len(windows), initial=first_step, desc="training", unit="step", dynamic_ncols=True,
                 disable=not main) as bar:
        for step in range(first_step + 1, len(windows) + 1):
            window = windows[step - 1]  # under torchrun: this rank's share of the window's micro-batches
            batches = [collate([examples[i] for i in micro]) for micro in window]
            # Label tokens of the whole window (all ranks), known before any backward.
            n_labels = int(distributed.sum_(torch.tensor(sum(label_tokens(b) for b in batches), device=device)))
            resuming = step == first_step + 1 and first_micro > 0
            loss = carried_loss if resuming else torch.zeros((), device=device)
            for micro in range(first_micro if resuming else 0, len(batches)):
                batch = batches[micro]
                tokens_since_log += input_tokens(batch)  # counted on the host: no GPU sync
                batch = {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    micro_loss = loss_sum(model, batch) / n_labels
                micro_loss.backward()  # accumulates in place into the flat gradient buffer
                loss += micro_loss.detach()
                if stop_asked() and not distributed.active():  # under torchrun, ranks agree at the window's end
                    path = save_checkpoint(run_dir, step - 1, micro + 1, flat, optimizer, loss, cfg.keep_checkpoints)
                    raise Interrupted(f"stopped at step {step - 1}, micro-batch {micro + 1} of {len(batches)}; "
                                      f"checkpoint {path}; resume with: python train.py --resume {run_dir}")

            # ONE all-reduce of the whole flat gradient (and one of the loss scalar for the log) under torchrun.
            distributed.sum_(flat.grads)
            distributed.sum_(loss)
            # One tensor each: the norm, the clip and the AdamW step all see just the flat buffers.
            grad_norm = torch.nn.utils.clip_grad_norm_([flat.param], cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            record = {"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": grad_norm.item(), "label_tokens": n_labels}
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                last_good = latest_checkpoint(run_dir)
                rows = sorted(examples[i]["row"] for micro in window for i in micro)
                raise NonFiniteError(f"step {step}: loss {record['loss']}, gradient norm {record['grad_norm']}; the "
                                     f"window held training records {rows}; the step was not applied and no delta was "
                                     f"written; last good checkpoint: {last_good or 'none (see --save-every)'}")
            optimizer.step()
            scheduler.step()
            flat.zero_grad()

            records.append(record)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if main and (step % cfg.log_every == 0 or step == len(windows)):
                elapsed, since_log = time.perf_counter() - since_log, time.perf_counter()
                bar.write(f"step {step:>5}/{len(windows)} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                          f"grad norm {record['grad_norm']:.3f} | {tokens_since_log / elapsed:,.0f} tok/s | "
                          f"peak mem {peak_memory_gb(device):.2f} GB")
                tokens_since_log = 0
            stopping = distributed.active() and distributed.any_rank(stop_asked(), device)
            if main and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
                save_checkpoint(run_dir, step, 0, flat, optimizer, torch.zeros((), device=device), cfg.keep_checkpoints)
            if stopping:
                distributed.barrier()  # the checkpoint is whole before any rank exits
                raise Interrupted(f"stopped after step {step}; checkpoint {latest_checkpoint(run_dir)}; "
                                  f"resume with: torchrun ... train.py --resume {run_dir}")
    return records
