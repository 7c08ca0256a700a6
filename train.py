"""Fine-tune only the biases of a pretrained transformer (BitFit), with a hand-written loop.

    python train.py                       # offline: SmolLM2-135M-Instruct on the built-in task (~1-2 min, 2 CPU cores)
    python train.py --task classify       # offline: all-MiniLM-L6-v2 classifies the built-in sentiment task
    python train.py --model bigscience/bloomz-1b1 --data yahma/alpaca-cleaned --split "train[:1000]"
    python train.py --help                # every flag, with its default

This file is the recipe: read it top to bottom, edit it to try an idea.
    run           setup -> evaluate -> fit -> check and save the delta -> evaluate
    setup_model   the model frozen but for its biases, each a view into ONE flat fp32 buffer
    fit           THE LOOP: a step's passes -> train_step -> the lr schedule -> the step's record; between
                  steps, held-out measures, checkpoints and stopping
    main          the exit codes
The step itself is bitfit/core/step.py: train_step, with make_optimizer beside it. Everything else (the
run folder and resume, the data, evaluation, reports) is one call into bitfit/run/ (its __init__ maps it).
"""

# First of all: while the rest loads (seconds), Ctrl-C is one line, not a traceback (bitfit.run.interrupt).
import bitfit  # noqa: F401  # isort: skip

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bitfit.cli import os_error, out_of_memory
from bitfit.core.biases import add_missing_biases, count_trainable, describe, group_counts, select_biases
from bitfit.core.errors import BitfitError, Interrupted, NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import counted
from bitfit.core.step import lr_schedule, make_optimizer, train_step
from bitfit.data.collate import collator, idle_pass
from bitfit.data.examples import Example
from bitfit.data.layout import Passes
from bitfit.model import pretrained
from bitfit.model.delta import save_delta
from bitfit.run import evaluate, finite, inputs, ranks, report, run_folder, start
from bitfit.run.checkpoint import latest_checkpoint, save_checkpoint
from bitfit.run.config import TrainConfig, from_args, memory_advice
from bitfit.run.interrupt import StopRequest, graceful_stop


def run(cfg: TrainConfig) -> dict:
    """One training run, from the flags to the saved delta and its measures: the results (results.json)."""
    started = time.perf_counter()
    rank, world, local_rank = 0, 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        from bitfit.parallel import torchrun  # loaded only here: one process never needs it, and a fork may delete it

        rank, world, local_rank = torchrun.init()
    log = print if ranks.is_main() else (lambda *args, **kwargs: None)  # rank 0 speaks for all
    with graceful_stop(announce=ranks.is_main()) as stop:  # Ctrl-C / SIGTERM, until the delta is on disk (bitfit.run.interrupt)
        # --- setup: what can be wrong with the inputs is said before the model loads ---
        cfg, out_dir = start.open_run(cfg, log)  # a new run, an --overwrite or a --resume; its config.json saved
        log("config:", cfg.to_json())
        rows = inputs.read_data(cfg)  # every row read and checked: a typo fails in seconds
        device = setup_device(cfg, local_rank, log)
        classes = [str(label) for label in rows["classes"]] if rows["classes"] else None  # class i's name: id2label[i]
        model, tokenizer, flat, added, head = setup_model(cfg, classes, device, world, rank, log)
        examples, plan, collate, data_facts = inputs.training_plan(cfg, rows, model, tokenizer, world, rank, log)
        # Rank 0 evaluates, the others wait; with sharded weights each forward needs them all, so all do.
        held_out = inputs.held_out_set(cfg, rows, model, tokenizer) if ranks.is_main() or cfg.shard_weights else None
        base_fingerprint = inputs.check_inputs(cfg, model, flat, added, head, examples, held_out, out_dir)
        optimizer = make_optimizer(flat.param, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
        log(f"optimizer: {type(optimizer).__name__} over {flat.values.numel():,} values in one fp32 tensor, peak lr "
            f"{cfg.lr:g} (bitfit.core.step.make_optimizer)")
        first_step = start.resume(cfg, flat, optimizer, out_dir, len(plan), log)  # 0, or the checkpoint's step
        scheduler = lr_schedule(optimizer, cfg.lr, len(plan), cfg.warmup_steps, cfg.schedule, first_step)
        results = {"task": cfg.task, **({"classes": classes} if classes else {}),
                   "trainable": flat.num_trainable, "total": sum(p.numel() for p in model.parameters()),
                   **data_facts, **report.memory_per_process(model, flat), "device": str(device),
                   **report.environment(device)}
        if held_out and (before := evaluate.before_training(model, tokenizer, held_out, cfg, device, out_dir,
                                                            first_step, base_fingerprint, log)):
            results["before"] = before

        # --- train ---
        train_start = time.perf_counter()
        if cfg.compile:  # after the flat buffer (compiled code reads the biases' views) and the packing check
            log(f"compiling {pretrained.compile_blocks(model)} blocks (torch.compile, dynamic shapes) for the training "
                "passes; evaluation runs eager")
        measure_held_out = partial(evaluate.during_training, model, tokenizer, held_out, cfg, device) if held_out else None
        fit(model, flat, optimizer, scheduler, plan, examples, collate, cfg, out_dir, stop, first_step, measure_held_out)
        results["train_seconds"] = time.perf_counter() - train_start

        # --- check and save: only a model whose biases AND outputs are finite is saved ---
        stop.at_once, stop.finishing = None, "writing the delta, then stopping"  # a Ctrl-C now waits for this
        flat.check()  # every bias still a view of the buffer the optimizer stepped
        check_outputs(model, tokenizer, examples, cfg, len(plan))
        ranks.on_main(lambda: save_delta(str(out_dir / run_folder.DELTA), model, flat, base_model=cfg.model, added=added,
                                         selection=cfg.biases, fingerprint_of_base=base_fingerprint, head=head,
                                         task=cfg.task, classes=classes))
        stop.at_once = f"after the delta was saved to {out_dir / run_folder.DELTA}; the evaluation after training was skipped"
        if ranks.any_rank(stop.asked, device):  # all stop, or none: the evaluation may be a collective
            raise Interrupted(f"{stop.at_once}")
        try:  # the delta is whole on the disk: a failure from here on says so (but a non-finite held-out loss
            # after training deletes it: evaluate.after_training)
            if held_out:
                results["after"] = evaluate.after_training(model, tokenizer, held_out, cfg, device, out_dir)
            if ranks.is_main():
                report.write_results(model, out_dir, results, started, log)
        except (BitfitError, OSError) as error:  # a full disk, say: the report is lost, not the training
            raise BitfitError(f"{error}; the trained delta is whole in {out_dir / run_folder.DELTA}, its report "
                              "is not written") from None
        ranks.barrier()  # no process tears down the group while rank 0 still evaluates and writes (gloo aborts then)
    return results


# --- setup ------------------------------------------------------------------------------------------

def setup_device(cfg: TrainConfig, local_rank: int, log) -> torch.device:
    device = pretrained.pick_device(cfg.device, local_rank)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
    tf32 = device.type == "cuda" and not cfg.bf16  # fp32 matmuls on the tensor cores (bf16 ones already are)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log(f"device: {device} | frozen weights {'bfloat16' if cfg.bf16_weights else 'float32'} | biases and optimizer "
        f"state float32 | bf16 autocast {'on' if cfg.bf16 else 'off'}" + (" | fp32 matmuls in TF32" if tf32 else ""))
    return device


def setup_model(cfg: TrainConfig, classes: list[str] | None, device: torch.device, world: int, rank: int, log) -> tuple:
    """(model, tokenizer, flat biases, names of the biases bitfit added, names of the new parameters (a
    classifier's head)): the model frozen but for the selected biases and the new parameters, each of them
    a view into the one flat fp32 buffer the optimizer steps. With --shard-weights each process holds 1/N
    of the frozen weights (bitfit.parallel.sharding)."""
    if cfg.shard_weights and world == 1:
        raise BitfitError("--shard-weights splits the frozen weights between torchrun's processes, and this run has "
                          "one: launch it with torchrun --nproc_per_node=N train.py ... (N >= 2)"
                          + (" (the run was started with --shard-weights, and a resumed run keeps its config)"
                             if cfg.resume else ", or drop the flag"))
    weights_dtype = torch.bfloat16 if cfg.bf16_weights else torch.float32
    if cfg.task == "lm":
        model, tokenizer = pretrained.load(cfg.model, device, weights_dtype, cfg.trust_remote_code,
                                           cfg.trust_pickle_weights, weights_on_meta=cfg.shard_weights)
        head = []
    else:  # an encoder (or a causal LM) with a sequence classification head, new and drawn from the seed
        model, tokenizer, head = pretrained.load_classifier(cfg.model, classes, device, weights_dtype,
                                                            cfg.trust_remote_code, cfg.trust_pickle_weights)
        log(f"task: {cfg.task}, " + (f"{len(classes)} classes: {', '.join(classes)}" if classes else "one number per row")
            + f"; the checkpoint lacks {', '.join(head) or 'nothing'}" + (": new, trained whole" if head else ""))
    if cfg.bf16_weights:
        pretrained.norms_in_fp32(model)  # beside their fp32 biases (on the CPU, layer_norm needs one dtype)
    added = add_missing_biases(model) if cfg.add_biases else []
    if added:
        log(f"added {len(added)} zero biases to bias-free linear layers inside the blocks")
    selection = select_biases(model, cfg.biases, head)  # THE decision of what trains (bitfit.core.biases.trains)
    if cfg.shard_weights:  # the selected biases stay whole: FSDP ignores them
        from bitfit.parallel import sharding  # loaded only here (FSDP2): `import bitfit` stays free of it

        log(sharding.shard_and_fill(model, selection, cfg.model, added, device, rank, world, causal=cfg.task == "lm"))
    flat = FlatBiases(model, selection)  # after the model is on its device and in its dtype
    params = dict(model.named_parameters())
    log(describe(*count_trainable(model, selection), {name: params[name].numel() for name in head}))
    log("biases by group: " + ", ".join(f"{group} {n:,}" for group, n in group_counts(model, selection, head).items()))
    if flat.mask is not None and cfg.weight_decay > 0:
        raise BitfitError("--weight-decay would shrink the frozen key/value entries of fused q/k/v biases under "
                          "--biases reduced; use --weight-decay 0 (the BitFit paper's setting)")
    return model, tokenizer, flat, added, head


# ----------------------------------------------------------------------------------------------------
# THE LOOP BEGIN
# ----------------------------------------------------------------------------------------------------

def fit(model: nn.Module, flat: FlatBiases, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, plan: list[Passes], examples: list[Example],
        collate, cfg: TrainConfig, run_dir: Path, stop: StopRequest, first_step: int = 0,
        measure_held_out: Callable[[], dict] | None = None) -> None:
    """Train the steps of `plan` after `first_step`, each step's record (its loss, lr, gradient norm,
    tokens, time and tokens/s) sent to the console, metrics.jsonl and --report-to as it is made.

    A step is --batch-size x --grad-accum examples; `plan[step - 1]` is this process's passes of it, each a
    list of example indices (the layout cuts a step into passes of at most --max-pass-tokens; a pass is
    one forward and backward: bitfit.data.layout.plan). `collate` makes a pass a batch: padded or packed.

    Between steps, never inside one:
    - every --eval-every steps but the last (run() evaluates after training), the held-out measures
      of `measure_held_out()`: on rank 0, or on every process under sharded weights (a collective);
    - a checkpoint every --save-every steps;
    - on a Ctrl-C or SIGTERM (`stop`), a checkpoint and Interrupted, once every process agrees.
    A NaN or inf in the loss or gradient, caught before the optimizer steps, raises NonFiniteError naming
    the step and its training examples: nothing of that step is saved. Biases an update made non-finite
    (an lr far past its bound) are caught before the next checkpoint or step, named as the update's.
    """
    model.train()
    device = flat.values.device
    with report.sinks(run_dir, len(plan), first_step, cfg.log_every, cfg.report_to, device) as send:
        for step in range(first_step + 1, len(plan) + 1):
            # A Ctrl-C now is not obeyed at once (at_once None): it waits for this step, then a checkpoint.
            stop.at_once, stop.finishing = None, f"step {step}, then writing a checkpoint"
            # Each pass a batch, counted on the host (core.loss.counted); an empty pass (idle under sharded
            # weights, where every process runs as many passes) is one token with no label.
            passes = [counted(collate([examples[i] for i in indices]) if indices else idle_pass())
                      for indices in plan[step - 1]]
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            try:
                record = {"step": step, "lr": lr, **train_step(model, flat, optimizer, passes, cfg.grad_clip, cfg.bf16)}
                flat.check()  # every bias still a view of what the optimizer stepped (else training silently stops)
            except NonFiniteError as error:  # said with the culprit step's examples and the last good checkpoint
                raise finite.failed_step(error, step, plan, examples, flat, run_dir) from None
            scheduler.step()
            record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - started)
            record["time"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
            if measure_held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < len(plan):
                record.update(measure_held_out())  # rank 0; every process under sharded weights, where it is a collective
            # A new measure is one more key: record["name"] = a number (or a nested dict of them) reaches every
            # sink and measures.png. A non-finite one ends the run; a device tensor costs a host read per step.
            send(record)  # to the console, metrics.jsonl and --report-to (bitfit.run.report)

            stopping = ranks.any_rank(stop.asked, device)
            if ranks.is_main() and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
                save_checkpoint(run_dir, step, flat, optimizer, cfg.keep_checkpoints)
            if stopping:
                ranks.barrier()  # the checkpoint is whole before any process exits
                launcher = "torchrun ... train.py" if ranks.active() else "python train.py"
                raise Interrupted(f"stopped after step {step}; checkpoint {latest_checkpoint(run_dir)}; "
                                  f"resume with: {launcher} --resume {run_dir}")

# THE LOOP END -----------------------------------------------------------------------------------------


@pretrained.eager
def check_outputs(model, tokenizer, examples: list, cfg: TrainConfig, steps: int) -> None:
    """NonFiniteError unless the trained model's outputs on a few training examples are finite: biases can
    be finite while the logits are not, and such a model must never be saved as a result. Every process
    checks the same examples (a collective forward under sharded weights), so all agree."""
    probe = collator(cfg.task, tokenizer)(examples[:4])
    if problem := finite.nonfinite_outputs(model, probe, cfg.bf16):
        raise NonFiniteError(f"after step {steps}, {problem}: the biases diverged and no delta was written (try a "
                             "lower --lr)")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a problem with the input (out of memory too), 3 a non-finite loss, gradient or
    output, 130 interrupted; each said in ONE line, once under torchrun. A run that fails before it
    recorded a step gives its folder back as it was."""
    cfg, code, said = None, 1, ""
    try:
        cfg = from_args(argv)
        run(cfg)
        code = 0
    except BitfitError as error:
        code, said = 2, f"error: {error}"
    except NonFiniteError as error:
        code, said = 3, f"error: non-finite values, run stopped: {error}"
    except Interrupted as error:
        code, said = 130, f"interrupted: {error}"
    except KeyboardInterrupt:
        code, said = 130, "interrupted twice: stopped at once, without a checkpoint"
    except OSError as error:  # a path the system refuses: too long, a link loop, no permission
        code, said = 2, f"error: {os_error(error)}"
    except Exception as error:  # noqa: BLE001: out of memory is said in one line with the knobs; the rest are bugs
        if not out_of_memory(error):
            raise
        code, said = 2, f"error: {memory_advice(cfg, error)}"
    finally:
        if said:  # an input error may be one process's own (a file only it cannot read): it says so
            ranks.say_once(said, own_error=code == 2)
        run_folder.release(failed=code != 0)
        ranks.finish()
    return code

if __name__ == "__main__":
    sys.exit(main())
