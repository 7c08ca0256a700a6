"""The training loop: `fit` is everything around the BitFit step (bitfit.core.step.train_step).

Between steps, never inside one: the step's record sent to every sink (bitfit.run.report), held-out
measures, checkpoints, and stopping on a Ctrl-C or a non-finite value.
"""

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from bitfit.core.errors import Interrupted, NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import counted
from bitfit.core.step import train_step
from bitfit.data.collate import idle_pass
from bitfit.data.examples import Example
from bitfit.data.layout import Passes
from bitfit.run import ranks, report
from bitfit.run.checkpoint import latest_checkpoint, save_checkpoint
from bitfit.run.config import TrainConfig
from bitfit.run.interrupt import StopRequest


def fit(model: nn.Module, flat: FlatBiases, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, plan: list[Passes], examples: list[Example],
        collate, cfg: TrainConfig, run_dir: Path, stop: StopRequest, first_step: int = 0,
        measure_held_out: Callable[[], dict] | None = None) -> list[dict]:
    """Train the steps of `plan` (this process's passes of every step) after `first_step`; return one
    record per step (its loss, lr, gradient norm, tokens, time and tokens/s), each sent to the console,
    metrics.jsonl and --report-to as it is made (bitfit.run.report).

    Between steps, never inside one:
    - every --eval-every steps but the last (train.py evaluates after training), the held-out measures
      of `measure_held_out()`: on rank 0, or on every process under sharded weights (a collective);
    - a checkpoint every --save-every steps;
    - on a Ctrl-C or SIGTERM (`stop`), a checkpoint and Interrupted, once every process agrees.
    A NaN or inf in the loss or gradient, caught before the optimizer steps, raises NonFiniteError naming
    the step and its training examples: nothing of that step is saved. Biases an update made non-finite
    (an lr far past its bound) are caught before the next checkpoint or step, named as the update's.
    """
    model.train()
    device = flat.values.device
    records = []
    with report.sinks(run_dir, len(plan), first_step, cfg.log_every, cfg.report_to, device) as send:
        for step in range(first_step + 1, len(plan) + 1):
            # What a Ctrl-C now says it waits for (bitfit.run.interrupt): this step, then a checkpoint.
            stop.at_once, stop.finishing = None, f"step {step}, then writing a checkpoint"
            passes = [counted(collate([examples[i] for i in indices]) if indices else idle_pass()) for indices in plan[step - 1]]
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            try:
                record = {"step": step, "lr": lr, **train_step(model, flat, optimizer, passes, cfg.grad_clip, cfg.bf16)}
                flat.check()  # every bias still a view of what AdamW stepped (else training silently stops)
            except NonFiniteError as error:
                held = sorted((examples[i]["row"], examples[i]["place"]) for indices in plan[step - 1] for i in indices)
                whose = "this process's share of the step" if ranks.active() else "the step"
                raise NonFiniteError(f"step {step}: {error}; {whose} held the training examples of "
                                     f"{', '.join(place for _, place in held)}; nothing of this "
                                     f"step was saved and no delta was written; last good checkpoint: "
                                     f"{latest_checkpoint(run_dir) or 'none (see --save-every)'}") from None
            scheduler.step()
            record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - started)
            record["time"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
            if measure_held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < len(plan):
                record.update(measure_held_out())  # rank 0; every process under sharded weights, where it is a collective
            records.append(record)
            send(record)  # to the console, metrics.jsonl and --report-to (bitfit.run.report)

            stopping = ranks.any_rank(stop.asked, device)
            if ranks.is_main() and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
                save_checkpoint(run_dir, step, flat, optimizer, cfg.keep_checkpoints)
            if stopping:
                ranks.barrier()  # the checkpoint is whole before any process exits
                launcher = "torchrun ... train.py" if ranks.active() else "python train.py"
                raise Interrupted(f"stopped after step {step}; checkpoint {latest_checkpoint(run_dir)}; "
                                  f"resume with: {launcher} --resume {run_dir}")
    return records
