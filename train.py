"""Fine-tune only the biases of a pretrained transformer (BitFit), with a hand-written loop.

    python train.py                       # offline: SmolLM2-135M-Instruct on the built-in task (README: time)
    python train.py --task classify       # offline: all-MiniLM-L6-v2 classifies the built-in sentiment task
    python train.py --model bigscience/bloomz-1b1 --data yahma/alpaca-cleaned --split "train[:1000]"
    python train.py --help                # every flag, with its default

`run()` is the table of contents: run folder -> data read and checked -> device -> model and biases ->
examples and layout -> optimizer and resume -> evaluate -> train -> check the outputs -> save -> evaluate.
Each stage is a small function below; the work itself lives in bitfit/ (the step a reader learns BitFit
from is bitfit/core/step.py: train_step; the loop around it is bitfit/run/loop.py: fit).
"""

# First of all: while the rest loads (seconds), Ctrl-C is one line, not a traceback (bitfit.run.interrupt).
import bitfit  # noqa: F401  # isort: skip

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from bitfit import __version__
from bitfit.cli import os_error, out_of_memory
from bitfit.core.biases import (
    add_missing_biases,
    count_trainable,
    describe,
    group_counts,
    select_biases,
)
from bitfit.core.errors import BitfitError, Interrupted, NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import forward_accepts
from bitfit.core.step import lr_schedule, make_optimizer
from bitfit.data import layout, packing
from bitfit.data.collate import pad_batch, pad_id, pad_labelled
from bitfit.data.examples import examples_of, read_records
from bitfit.data.labelled import check_labelled, check_rows, encode_labelled
from bitfit.data.sources import declared_classes, is_builtin
from bitfit.files import digest, finite_number, parse_json, size, write_atomically, write_error, write_json
from bitfit.model import pretrained
from bitfit.model.delta import base_fingerprint, save_delta
from bitfit.run import ranks, report, run_folder
from bitfit.run.checkpoint import latest_checkpoint, load_checkpoint
from bitfit.run.config import MAX_DRAWS, TrainConfig, from_args
from bitfit.run.evaluate import (
    base_eval_cache,
    exact_match,
    heldout_loss,
    labelled_measures,
    stored_evaluation_problem,
)
from bitfit.run.finite import nonfinite_outputs
from bitfit.run.interrupt import graceful_stop
from bitfit.run.loop import fit

T = TypeVar("T")


def run(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    rank, world, local_rank = 0, 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        from bitfit.parallel import torchrun  # loaded only here: one process never needs it, and a fork may delete it

        rank, world, local_rank = torchrun.init()
    log = print if ranks.is_main() else (lambda *args, **kwargs: None)  # rank 0 speaks for all
    with graceful_stop(announce=ranks.is_main()) as stop:  # Ctrl-C / SIGTERM, until the delta is on disk (bitfit.run.interrupt)
        cfg, out_dir = setup_run_dir(cfg, log)
        log("config:", cfg.to_json())
        rows = read_data(cfg)  # every row read and checked before the model loads: a typo fails in seconds
        device = setup_device(cfg, local_rank, log)

        names = [str(label) for label in rows["classes"]] if rows["classes"] else None  # class i's name: id2label[i]
        model, tokenizer, flat, added, head, memory = setup_model(cfg, names, device, world, rank, log)
        examples, plan, collate, data_facts = setup_data_and_layout(cfg, rows, model, tokenizer, world, rank, log)
        # Rank 0 evaluates, the others wait; with sharded weights each forward needs them all, so all do.
        held_out = setup_evaluation(cfg, rows, model, tokenizer) if ranks.is_main() or cfg.shard_weights else None
        base = check_inputs(cfg, model, flat, added, head, examples, held_out, out_dir)  # the base's fingerprint
        optimizer, scheduler, first_step = setup_optimizer(cfg, flat, out_dir, len(plan), log)
        results = {"task": cfg.task, **({"classes": names} if names else {}),
                   "trainable": flat.num_trainable, "total": sum(p.numel() for p in model.parameters()),
                   **data_facts, **memory, "device": str(device), **report.environment(device)}
        if held_out and (before := evaluate_untrained(model, tokenizer, held_out, cfg, device, out_dir, first_step, base, log)):
            results["before"] = before

        train_start = time.perf_counter()
        during = partial(evaluate_during, model, tokenizer, held_out, cfg, device) if held_out else None
        if cfg.compile:  # after the flat buffer (compiled code reads the biases' views) and the packing check
            log(f"compiling {pretrained.compile_blocks(model)} blocks (torch.compile, dynamic shapes) for the training "
                "passes; evaluation runs eager")
        fit(model, flat, optimizer, scheduler, plan, examples, collate, cfg, out_dir, stop, first_step, during)
        results["train_seconds"] = time.perf_counter() - train_start
        stop.at_once, stop.finishing = None, "writing the delta, then stopping"
        flat.check()  # every bias still a view of the buffer the optimizer stepped
        check_outputs(model, tokenizer, examples, cfg, len(plan))  # finite biases, but finite outputs?
        on_main(lambda: save_delta(str(out_dir / run_folder.DELTA), model, flat, base_model=cfg.model, added=added,
                                   selection=cfg.biases, fingerprint_of_base=base, head=head, task=cfg.task,
                                   classes=names))
        stop.at_once = f"after the delta was saved to {out_dir / run_folder.DELTA}; the evaluation after training was skipped"
        if ranks.any_rank(stop.asked, device):  # all stop, or none: the evaluation may be a collective
            raise Interrupted(f"{stop.at_once}")
        try:  # the delta is whole on the disk: a failure from here on says so
            if held_out:
                results["after"] = evaluate_trained(model, tokenizer, held_out, cfg, device, out_dir)
            if ranks.is_main():
                save_results(model, held_out, out_dir, results, started, log)
        except (BitfitError, OSError) as error:  # a full disk, say: the report is lost, not the training
            raise BitfitError(f"{error}; the trained delta is whole in {out_dir / run_folder.DELTA}, its report "
                              "is not written") from None
        ranks.barrier()  # no process tears down the group while rank 0 still evaluates and writes (gloo aborts then)
    return results


def on_main(work: Callable[[], T]) -> T | None:
    """`work()` on process 0, which alone reads and writes the run folder; its BitfitError is raised on
    every process, so that none is left waiting at a collective (torchrun). The others get None."""
    result, error = None, ""
    if ranks.is_main():
        try:
            result = work()
        except BitfitError as failure:
            error = str(failure)
    if error := ranks.broadcast(error):
        raise BitfitError(error)
    return result


# --- run folder -------------------------------------------------------------------------------------

def resumed_config(given: TrainConfig, run_dir: Path, log) -> TrainConfig:
    """The config an interrupted run was started with, to continue it exactly; says which flags it ignores."""
    if not (run_dir / "config.json").is_file():
        raise BitfitError(f"--resume {run_dir}: not a bitfit run folder (no config.json there)")
    ignored = [f.name for f in dataclasses.fields(TrainConfig)
               if getattr(given, f.name) != getattr(TrainConfig(resume=given.resume), f.name)]
    if ignored:
        log(f"--resume continues with the run's own config; ignoring {', '.join('--' + n.replace('_', '-') for n in ignored)}")
    try:
        saved = TrainConfig.from_dict(parse_json((run_dir / "config.json").read_text()))
    except (OSError, ValueError, BitfitError) as error:  # ValueError: not JSON, not UTF-8
        raise BitfitError(f"--resume {run_dir}: its config.json, the config the run started with, is broken ({error}); "
                          "restore it, or start a new run") from None
    # A resume continues a run and never starts one: --overwrite, which the run may have started with, is not its.
    return dataclasses.replace(saved, resume=given.resume, out_dir=given.resume, overwrite=False)


def check_run_dir(cfg: TrainConfig, out_dir: Path, log) -> None:
    """Refuse to mix two runs in one folder: a finished run is neither resumed nor replaced without
    --overwrite, an interrupted one is resumed or overwritten, and a folder where an --overwrite run has
    not finished yet (the run it replaces set aside) is touched by --resume or --overwrite only.
    --overwrite sets the earlier run aside (bitfit.run.run_folder), kept until this run finishes."""
    delta, checkpoint = (out_dir / run_folder.DELTA).exists(), latest_checkpoint(out_dir)
    unfinished = run_folder.replaced(out_dir) and not cfg.overwrite and not cfg.resume
    if delta and (cfg.resume or not cfg.overwrite):
        unreported = "" if run_folder.finished(out_dir) else f" (its {run_folder.RESULTS} was never written)"
        if cfg.resume:
            raise BitfitError(f"{out_dir} is a finished run{unreported}, nothing to resume (its delta is "
                              f"{out_dir / run_folder.DELTA}); to train again, start a new run without --resume")
        raise BitfitError(f"{out_dir} already holds a finished run{unreported}; pick another --out-dir or pass --overwrite")
    if unfinished or (checkpoint and not cfg.resume and not cfg.overwrite):
        kept = (f", started with --overwrite: the run it replaces is kept in {out_dir / run_folder.REPLACED} until it "
                "finishes" if run_folder.replaced(out_dir) else "")
        go_on = f"continue it with: python train.py --resume {out_dir} (or" if checkpoint else "(it has no checkpoint to resume:"
        raise BitfitError(f"{out_dir} holds an interrupted run{kept}; {go_on} pass --overwrite to start over)")
    if cfg.overwrite:  # nothing of the old run may pass for part of the new one
        foreign, discarded = run_folder.set_aside(out_dir)
        log("--overwrite: the earlier run is set aside in " + str(out_dir / run_folder.REPLACED) + ", deleted when this "
            "run finishes, put back if it fails before its first step"
            + (f"; discarded {discarded}" if discarded else "")
            + (f"; kept {len(foreign)} that bitfit did not write: " + ", ".join(str(path) for path in foreign[:5])
               + (" ..." if len(foreign) > 5 else "") if foreign else ""))


def setup_run_dir(cfg: TrainConfig, log) -> tuple[TrainConfig, Path]:
    """The resolved config and the run's folder, with the config saved in it. Process 0 claims the folder
    (settling what a killed run left there before anything is read from it), and tells the others the
    config and the folder's name, or the error that every process then stops with."""
    if cfg.resume and not run_folder.is_run_folder(Path(cfg.resume)):
        raise BitfitError(f"--resume {cfg.resume}: not a bitfit run folder (no {run_folder.MARKER} there)")

    def claim_and_save() -> str:
        try:
            out_dir = run_folder.claim(cfg.resume or cfg.out_dir)
            resolved = resumed_config(cfg, out_dir, log) if cfg.resume else cfg
            check_run_dir(resolved, out_dir, log)
        except OSError as failure:  # a full disk, a folder that cannot be listed or moved in
            raise write_error(Path(cfg.resume or cfg.out_dir or "runs"), failure) from None
        resolved = dataclasses.replace(resolved, out_dir=str(out_dir))
        write_atomically(out_dir / "config.json", (resolved.to_json() + "\n").encode())
        return resolved.to_json()

    resolved = TrainConfig.from_dict(json.loads(ranks.broadcast(on_main(claim_and_save))))  # the folder's name holds
    return resolved, Path(resolved.out_dir)  # a timestamp: process 0's, for all


# --- device, model and biases -----------------------------------------------------------------------

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
    classifier's head), where the memory went): the model frozen but for the selected biases and the new
    parameters, each of them a view into the one flat fp32 buffer the optimizer steps. With
    --shard-weights each process holds 1/N of the frozen weights (bitfit.parallel.sharding)."""
    if cfg.shard_weights and world == 1:
        raise BitfitError("--shard-weights splits the frozen weights between torchrun's processes, and this run has "
                          "one: launch it with torchrun --nproc_per_node=N train.py ... (N >= 2)"
                          + (" (the run was started with --shard-weights, and a resumed run keeps its config)"
                             if cfg.resume else ", or drop the flag"))
    weights_dtype = torch.bfloat16 if cfg.bf16_weights else torch.float32
    if cfg.task == "lm":
        model, tokenizer = pretrained.load(cfg.model, device, weights_dtype, cfg.trust_remote_code, cfg.trust_pickle_weights,
                                       weights_on_meta=cfg.shard_weights)
        head = []
    else:  # an encoder (or a causal LM) with a sequence classification head, new and drawn from the seed
        model, tokenizer, head = pretrained.load_classifier(cfg.model, classes, device, weights_dtype, cfg.trust_remote_code,
                                                        cfg.trust_pickle_weights)
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

        sharding.shard(model, selection, device, world)
        sharding.fill(model, pretrained.resolve(cfg.model), added, rank, world)
        if cfg.task == "lm":  # built on meta, it is checked once filled: every process takes part
            pretrained.check_causal(model, cfg.model)
    flat = FlatBiases(model, selection)  # after the model is on its device and in its dtype
    params = dict(model.named_parameters())
    log(describe(*count_trainable(model, selection), {name: params[name].numel() for name in head}))
    log("biases by group: " + ", ".join(f"{group} {n:,}" for group, n in group_counts(model, selection, head).items()))
    if cfg.task == "lm" and (context := pretrained.context_length(model)) and cfg.max_len > context:
        log(f"warning: --max-len {cfg.max_len} is past the model's context of {context} tokens: an example longer than "
            f"{context} tokens trains positions the model never saw; --max-len {context} keeps them within it")
    if flat.mask is not None and cfg.weight_decay > 0:
        raise BitfitError("--weight-decay would shrink the frozen key/value entries of fused q/k/v biases under "
                          "--biases reduced; use --weight-decay 0 (the BitFit paper's setting)")
    memory = {"weight_bytes_per_process": ranks.gather(pretrained.local_weight_bytes(model)),
              "bias_buffer_bytes_per_process": ranks.gather(flat.values.nbytes)}
    if cfg.shard_weights:
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        log(f"weights: sharded over {world} processes (FSDP2): {size(max(memory['weight_bytes_per_process']))} of the "
            f"{size(frozen)} of frozen weights on each; the {size(flat.values.nbytes)} flat bias buffer whole on each")
    return model, tokenizer, flat, added, head, memory


# --- data and layout --------------------------------------------------------------------------------

def choose_layout(cfg: TrainConfig, model, examples: list, pad) -> tuple[str, str]:
    """The layout to train with, and why: 'auto' is packed when the model can keep packed examples
    apart (bitfit.data.packing checks it on the first examples) by its position ids, else padded. An
    ALiBi model (BLOOM) packs only when asked: its attention scores a packed row's whole square."""
    requested = cfg.layout
    if requested not in ("auto", "packed"):
        return requested, "as asked"
    if cfg.task != "lm":  # config refused packed for it
        return "padded", "one label per row: rows padded to the pass's longest"
    if requested == "auto" and "position_ids" not in forward_accepts(type(model)):
        return "padded", (f"not packed: {type(model).__name__} takes no position ids, and its attention would score a "
                          "packed row's whole square; --layout packed packs it exactly")
    why_not = packing.enable(model, examples, pad, cfg.max_pass_tokens, cfg.bf16)
    if why_not is None:
        return "packed", "checked: a pass's examples packed and padded give the same loss"
    if requested == "packed":
        raise BitfitError(f"--layout packed: {why_not}; use --layout padded (the same gradient)")
    return "padded", f"not packed: {why_not}"


def examples_for(cfg: TrainConfig, rows: dict, part: str, name: str, model, tokenizer,
                 log=lambda *args: None) -> tuple[list, int]:
    """(examples, number dropped) of the rows of `part` ('train' or 'held_out', from read_data, named `name`
    in errors), encoded for the task: next-token examples, or labelled ones (none dropped; classes checked
    against the training data's by read_data)."""
    records, places = rows[part]
    role, progress = "training data" if part == "train" else "evaluation data", ranks.is_main()
    if cfg.task == "lm":
        return examples_of(records, places, name, tokenizer, cfg.max_len, cfg.template, role=role, progress=progress)
    return encode_labelled(records, places, tokenizer, labelled_max_len(cfg, model, log), cfg.task, rows["classes"],
                           progress=progress), 0


def labelled_max_len(cfg: TrainConfig, model, log=lambda *args: None) -> int:
    """--max-len, or the encoder's positions where they are fewer: an encoder with absolute positions cannot
    take a longer row (a causal LM's rows past its context are only warned about: setup_model)."""
    most = pretrained.positions(model)
    if most and cfg.max_len > most:
        log(f"--max-len {cfg.max_len} is past the encoder's {most} positions: rows are cut at {most} tokens")
        return most
    return cfg.max_len


def read_data(cfg: TrainConfig) -> dict:
    """The training rows and the held-out rows (or None), each as (records, places), every row checked,
    and a classifier's classes (bitfit.data.labelled): what can be wrong with the data is said before the
    model loads."""
    check = partial(check_labelled, task=cfg.task) if cfg.task != "lm" else None
    source = eval_source(cfg)
    train = read_records(cfg.data, cfg.split, check=check, config=cfg.data_config)
    per_step = cfg.batch_size * cfg.grad_accum
    draws = min(cfg.epochs * len(train[0]), cfg.max_steps * per_step or math.inf)
    if draws > MAX_DRAWS:  # checked on the rows, before they are tokenized and the plan is drawn
        raise BitfitError(f"--epochs {cfg.epochs} over {len(train[0]):,} rows is {draws:,} examples to train on "
                          f"({-(-draws // per_step):,} optimizer steps); a run draws at most {MAX_DRAWS:,}: lower "
                          "--epochs, or set --max-steps")
    held_out = read_records(source, cfg.eval_split, "evaluation data", check, cfg.data_config) if source else None
    classes = None
    if cfg.task != "lm":  # one shape of row throughout, and the classes (bitfit.data.labelled)
        declared = declared_classes(cfg.data, cfg.split, cfg.data_config) if cfg.task == "classify" else None
        classes = check_rows(train, held_out, cfg.task, declared)
    return {"train": train, "held_out": held_out, "classes": classes}


def eval_source(cfg: TrainConfig) -> str:
    """The held-out data's source, or '' for none: --eval-data '' means the built-in task's held-out split
    when --data is a built-in task, and no evaluation otherwise."""
    return {"": cfg.data if is_builtin(cfg.data) else "", "none": ""}.get(cfg.eval_data, cfg.eval_data)


def setup_data_and_layout(cfg: TrainConfig, rows: dict, model, tokenizer, world: int, rank: int, log) -> tuple:
    """(examples, this process's passes of every step, the collator that makes a pass a batch, and the facts
    for results.json: examples kept and dropped, steps, layout)."""
    examples, dropped = examples_for(cfg, rows, "train", f"{cfg.data} {cfg.split}", model, tokenizer, log)
    lengths = [len(e["input_ids"]) for e in examples]
    log(f"data: {len(examples)} examples from {cfg.data} {cfg.split}"
        + (f", {dropped} dropped (response cut away by max_len {cfg.max_len})" if cfg.task == "lm" else "")
        + f", {sum(lengths) / len(lengths):.1f} tokens on average")

    pad = collator(cfg, tokenizer)
    kind, why = choose_layout(cfg, model, examples, pad)
    per_step = cfg.batch_size * cfg.grad_accum
    all_steps = cfg.epochs * -(-len(examples) // per_step)  # every epoch, before --max-steps (read_data bounded it)
    steps = layout.draw_steps(len(examples), per_step, cfg.epochs, cfg.seed, cfg.max_steps)
    if cfg.warmup_steps >= len(steps):  # the first step's lr is 0, and the peak never comes
        raise BitfitError(f"--warmup-steps {cfg.warmup_steps}: the run has {len(steps)} optimizer step(s), so its lr "
                          f"would never reach --lr {cfg.lr:g}; use fewer warmup steps than that")
    # Sharded weights: every forward is a collective, so every process runs the same number of passes.
    plan = layout.plan(steps, lengths, kind, cfg.max_pass_tokens, cfg.batch_size, world, rank, cfg.shard_weights)
    log(layout.describe(steps, lengths, kind, cfg.max_pass_tokens, cfg.batch_size, world, cfg.shard_weights) + f" ({why})")
    log(f"steps: {len(steps)} optimizer steps, {cfg.epochs} epoch(s)"
        + (f", capped by --max-steps {cfg.max_steps} (of {all_steps})" if len(steps) < all_steps else ""))
    facts = {"examples": len(examples), "dropped": dropped, "steps": len(steps), "layout": kind}
    return examples, plan, packing.pack_batch if kind == "packed" else pad, facts


def padder(tokenizer):
    """The padded collator of this tokenizer: its pad id, on its padding side."""
    return partial(pad_batch, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)


def collator(cfg: TrainConfig, tokenizer):
    """The padded collator of the task: next-token rows (padder), or labelled rows, one label each."""
    if cfg.task == "lm":
        return padder(tokenizer)
    return partial(pad_labelled, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)


def setup_evaluation(cfg: TrainConfig, rows: dict, model, tokenizer) -> dict | None:
    """The held-out records and examples to evaluate on before and after training, or None."""
    if rows["held_out"] is None:
        return None
    records = rows["held_out"][0]
    name = f"{eval_source(cfg)} {cfg.eval_split}"
    examples, _ = examples_for(cfg, rows, "held_out", name, model, tokenizer)
    # What the numbers depend on besides the model: the rows, and the token ids the tokenizer made of them.
    return {"records": records, "examples": examples, "name": name, "classes": rows["classes"],
            "hash": digest([records, token_ids(examples)])}


def token_ids(examples: list) -> list:
    return [[e["input_ids"], e["labels"] if "labels" in e else e["label"]] for e in examples]


def check_inputs(cfg: TrainConfig, model, flat: FlatBiases, added: list[str], head: list[str], examples: list,
                 held_out: dict | None, out_dir: Path) -> str:
    """Record the hashes of the model, the training data and the held-out data in the run, or refuse to
    resume on other ones (the data order, and the measures before and after, would not be of one run).
    Rank 0 checks, and returns the base's fingerprint (every process does under sharded weights, '' elsewhere);
    every process stops if it refuses."""
    fingerprint = ""
    if ranks.is_main() or cfg.shard_weights:  # sharded, it gathers each weight: a collective, all take part
        fingerprint = base_fingerprint(model, flat, added, head)
    on_main(lambda: run_folder.same_inputs(out_dir, {"model": fingerprint, "training data": digest(token_ids(examples)),
                                                     "held-out data": held_out["hash"] if held_out else "none"},
                                           resuming=bool(cfg.resume)))
    return fingerprint


# --- optimizer and resume ---------------------------------------------------------------------------

def setup_optimizer(cfg: TrainConfig, flat: FlatBiases, out_dir: Path, n_steps: int, log) -> tuple:
    """(the optimizer over the ONE flat bias tensor, its lr schedule, the step to start after): 0 for a new
    run, the checkpoint's step for a resumed one, whose metrics.jsonl is cut back to the steps it holds."""
    optimizer = make_optimizer(flat, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
    log(f"optimizer: {type(optimizer).__name__} over {flat.values.numel():,} values in one fp32 tensor, peak lr {cfg.lr:g} "
        f"(bitfit.core.step.make_optimizer)")
    first_step = 0
    if cfg.resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise BitfitError(f"--resume {out_dir}: no checkpoint there to continue from")
        first_step = load_checkpoint(checkpoint, flat, optimizer)
        if first_step > n_steps:
            raise BitfitError(f"checkpoint {checkpoint} is after step {first_step}, and this run has {n_steps} steps: it is "
                              "not this run's")
        log(f"resuming from {checkpoint}: after step {first_step}")
    metrics = out_dir / "metrics.jsonl"  # it holds exactly the steps done: none, or the checkpoint's
    done = on_main(lambda: recorded_steps(metrics, first_step) if first_step else [])
    if ranks.is_main():
        write_atomically(metrics, "".join(line + "\n" for line in done).encode())
    scheduler = lr_schedule(optimizer, cfg.lr, n_steps, cfg.warmup_steps, cfg.schedule, first_step)
    return optimizer, scheduler, first_step


def recorded_steps(path: Path, steps: int) -> list[str]:
    """The lines of the first `steps` steps of a resumed run's metrics.jsonl, each checked to be the record
    of its step (the loss curve and the best step are drawn from them); none if the file is gone."""
    try:
        lines = path.read_text().splitlines()[:steps]
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:  # ValueError: not UTF-8
        raise BitfitError(f"--resume: {path} cannot be read ({error})") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = parse_json(line)
        except ValueError:
            record = None
        loss = record.get("loss") if isinstance(record, dict) else None
        fields_ok = isinstance(record, dict) and all(finite_number(record[key]) for key in record
                                                     if key in ("loss", "eval_loss", "eval_exact_match", "grad_norm"))
        if not fields_ok or record.get("step") != number or not finite_number(loss):
            raise BitfitError(f"--resume: {path} line {number} is not the record of step {number} that bitfit wrote; "
                              f"restore it, or delete {path.name} to resume without the records of steps 1-{steps}")
    if 0 < len(lines) < steps:  # the next step's line would follow a gap
        raise BitfitError(f"--resume: {path} holds {len(lines)} steps and the checkpoint {steps}; restore it, or "
                          f"delete {path.name} to resume without the records of steps 1-{steps}")
    return lines


# --- evaluate and save ------------------------------------------------------------------------------

# Evaluation and generation run the blocks eager: compiled ones (--compile) would be compiled again for
# generation's KV cache and every new length, for a few forwards.
EAGER = torch.compiler.set_stance("force_eager")


@EAGER
def evaluate(model, tokenizer, held_out: dict, cfg: TrainConfig, device) -> dict:
    """Held-out loss and exact match (a classifier's or regressor's measures: bitfit.run.measures), timed."""
    start = time.perf_counter()
    if cfg.task != "lm":
        result = labelled_measures(model, held_out["examples"], collator(cfg, tokenizer), device, cfg.bf16,
                                   len(held_out["classes"] or []))
        finite_loss(result["loss"])
        return {**result, "seconds": time.perf_counter() - start}
    loss = finite_loss(heldout_loss(model, held_out["examples"], padder(tokenizer), device, cfg.bf16))
    result = exact_match(model, tokenizer, held_out["records"], cfg.template, device, cfg.bf16, cfg.max_new_tokens)
    return {"loss": loss, **result, "seconds": time.perf_counter() - start}


def said(measured: dict, task: str) -> str:
    """'held-out loss 0.6931, accuracy 50.0%, F1 0.667, MCC 0.000' and the like, for the log."""
    parts = [f"held-out loss {measured['loss']:.4f}"]
    if task == "lm":
        if "exact_match" in measured:  # none on plain text, which asks no question
            parts.append(f"exact match {100 * measured['exact_match']:.1f}%")
    elif task == "classify":
        parts += [f"accuracy {100 * measured['accuracy']:.1f}%", *([f"F1 {measured['f1']:.3f}"] if "f1" in measured else []),
                  f"MCC {measured['mcc']:.3f}"]
    else:
        parts += [f"Pearson {measured['pearson']:.3f}", f"Spearman {measured['spearman']:.3f}"]
    return ", ".join(parts)


def gain(before: dict, after: dict, task: str) -> str:
    """' (+45.0 points)': the change of the headline measure."""
    if task == "regress":
        return f" (Pearson {after['pearson'] - before['pearson']:+.3f})"
    key = "exact_match" if task == "lm" else "accuracy"
    if key not in before or key not in after:  # plain text held out: the loss is the measure
        return f" (loss {after['loss'] - before['loss']:+.4f})"
    return f" ({100 * (after[key] - before[key]):+.1f} points)"


def evaluate_trained(model, tokenizer, held_out: dict, cfg: TrainConfig, device, out_dir: Path) -> dict:
    """The evaluation after training. A NaN held-out loss means the tuned model is broken on data it did
    not train on: the delta written just before is deleted, so nothing broken is left named like a result."""
    try:
        return evaluate(model, tokenizer, held_out, cfg, device)
    except NonFiniteError as error:
        if ranks.is_main():
            (out_dir / run_folder.DELTA).unlink(missing_ok=True)
        raise NonFiniteError(f"after training, {error}: the tuned model is broken on the held-out data, so its delta "
                             f"was deleted (try a lower --lr)") from None


@EAGER
def check_outputs(model, tokenizer, examples: list, cfg: TrainConfig, steps: int) -> None:
    """NonFiniteError unless the trained model's outputs on a few training examples are finite: biases can
    be finite while the logits are not, and such a model must never be saved as a result. Every process
    checks the same examples (a collective forward under sharded weights), so all agree."""
    probe = collator(cfg, tokenizer)(examples[:4])
    if problem := nonfinite_outputs(model, probe, cfg.bf16):
        raise NonFiniteError(f"after step {steps}, {problem}: the biases diverged and no delta was written (try a "
                             "lower --lr)")


def evaluate_untrained(model, tokenizer, held_out: dict, cfg: TrainConfig, device, out_dir: Path, first_step: int,
                       base: str, log) -> dict | None:
    """The evaluation before training, kept in eval_before.json (a resumed run reports it) and in a cache
    shared by runs (a second run on the same base and held-out data does not measure it again). A resumed
    run holds trained biases: it reads the untrained numbers back, never measures them (None if lost).
    Under sharded weights every process calls this: rank 0 reads, and all measure or none does."""
    path = out_dir / "eval_before.json"
    # A classifier's untrained head is drawn from the seed: its numbers depend on it, an LM's do not.
    cached = base_eval_cache({"base": base, "task": cfg.task, "classes": held_out["classes"],
                              "head seed": cfg.seed if cfg.task != "lm" else None,
                              "held-out data": held_out["hash"], "template": cfg.template,
                              "max_new_tokens": cfg.max_new_tokens, "bf16": cfg.bf16, "bf16_weights": cfg.bf16_weights,
                              "device": device.type, "sharded": cfg.shard_weights, "bitfit": __version__})
    before, source = None, ""
    if ranks.is_main():
        if first_step and (before := read_cached(path, cfg.task, log)) is not None:  # what the run measured when it started
            source = "this run's eval_before.json"
        elif (before := read_cached(cached, cfg.task, log)) is not None:
            source = f"cached in {cached}"
    if cfg.shard_weights:  # every process measures, or none does
        before, source = ranks.broadcast((before, source))
    if before is None and first_step:
        log("before training: not reported (the run's eval_before.json is gone, and the cache has no entry)")
        return None
    if before is None:
        before, source = evaluate(model, tokenizer, held_out, cfg, device), "measured"
        try:
            if ranks.is_main():
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_json(cached, before)
        except (OSError, BitfitError):  # a cache that cannot be written costs time next run, nothing else
            pass
    if ranks.is_main():
        write_json(path, before)
    log(f"before training: {said(before, cfg.task)} "
        f"({len(held_out['records'])} examples of {held_out['name']}; {source})")
    return before


def finite_loss(loss: float) -> float:
    """`loss`, or NonFiniteError: a NaN held-out loss means the model is broken, and is never saved."""
    if not math.isfinite(loss):
        raise NonFiniteError(f"the held-out loss is {loss}")
    return loss


def read_cached(path: Path, task: str, log) -> dict | None:
    """A stored evaluation, or None when there is none, or when it fails validation (then it is measured
    again where it can be, and the log says why)."""
    try:
        stored = parse_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        problem = f"it cannot be read ({error})"
    else:
        if (problem := stored_evaluation_problem(stored, task)) is None:
            return stored
    log(f"ignoring the stored evaluation {path}: {problem}")
    return None


@EAGER
def evaluate_during(model, tokenizer, held_out: dict, cfg: TrainConfig, device) -> dict:
    """The held-out measures of one --eval-every point, as metrics.jsonl fields."""
    measured = {"eval_loss": finite_loss(heldout_loss(model, held_out["examples"], collator(cfg, tokenizer), device, cfg.bf16))}
    if cfg.eval_every_exact_match and (matched := exact_match(model, tokenizer, held_out["records"], cfg.template,
                                                              device, cfg.bf16, cfg.max_new_tokens)):
        measured["eval_exact_match"] = matched["exact_match"]
    return measured


def save_results(model, held_out, out_dir: Path, results: dict, started: float, log) -> None:
    """After the delta is saved (what training made must not wait on evaluation) and evaluated: results.json
    and the loss curve (rank 0)."""
    delta_path = out_dir / run_folder.DELTA
    if held_out:
        before, after, task = results.get("before"), results["after"], results["task"]  # before: None if a resume lost it
        log(f"after training:  {said(after, task)}" + (gain(before, after, task) if before else ""))
        for sample in after.get("samples", [])[:3]:
            log(f"  {sample['prompt']!r} -> {sample['generated'].strip()!r} (expected {sample['expected']!r})")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    points = report.held_out_points(records, results.get("before"), results.get("after"), results["steps"])
    if best := report.best_step(points):
        results["best"] = best
        log(f"best held-out loss: {best['loss']:.4f} after step {best['step']}" if best["step"] else
            f"best held-out loss: {best['loss']:.4f}, the untrained base's: no trained step beat it (try another --lr)")
    report.save_loss_curve(records, points, out_dir / "loss.png")
    report.save_measures(records, out_dir / "measures.png")
    results["total_seconds"] = time.perf_counter() - started
    write_json(out_dir / "results.json", results)  # the last file written: a run that says it finished, did
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    log(f"saved the bias delta to {delta_path} ({delta_path.stat().st_size / 2**10:,.0f} KiB; "
        f"the full model is {model_mb:,.0f} MiB)")
    log(f"loss curve: {out_dir / 'loss.png'}; every other measure by step: {out_dir / 'measures.png'}")
    log(f"done in {results['total_seconds']:.0f} s ({results['train_seconds']:.0f} s training)")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a problem with the input (out of memory too), 3 a non-finite loss, gradient or
    output, 130 interrupted. A run that fails before it recorded a step gives its folder back as it was."""
    cfg, code = None, 1
    try:
        cfg = from_args(argv)
        run(cfg)
        code = 0
    except BitfitError as error:
        code = exit_with(f"error: {error}", 2, own_error=True)
    except NonFiniteError as error:
        code = exit_with(f"error: non-finite values, run stopped: {error}", 3)
    except Interrupted as error:
        code = exit_with(f"interrupted: {error}", 130)
    except KeyboardInterrupt:
        code = exit_with("interrupted twice: stopped at once, without a checkpoint", 130)
    except OSError as error:  # a path the system refuses: too long, a link loop, no permission
        code = exit_with(f"error: {os_error(error)}", 2, own_error=True)
    except Exception as error:  # noqa: BLE001: out of memory is said in one line with the knobs; the rest are bugs
        if not out_of_memory(error):
            raise
        code = exit_with(f"error: {memory_advice(cfg, error)}", 2, own_error=True)
    finally:
        run_folder.release(failed=code != 0)
        ranks.finish()
    return code


def memory_advice(cfg: TrainConfig, error: Exception) -> str:
    """One line: memory ran out, and which flags lower it by about how much."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if cfg.layout == "trainer":
        knobs = (f"a pass is --batch-size {cfg.batch_size} rows of at most --max-len {cfg.max_len} tokens, and halving "
                 "either about halves them")
    else:
        knobs = (f"at most --max-pass-tokens {cfg.max_pass_tokens} here, and halving it about halves them; --max-len "
                 f"{cfg.max_len} caps the longest example (one longer than a pass gets a pass of its own)")
    return (f"out of memory ({first_line}). A forward pass's activations grow with its tokens: {knobs}. "
            "--bf16 --bf16-weights halves the frozen weights' memory"
            + (" (a resumed run keeps its config: these need a new run)" if cfg.resume else ""))


def exit_with(message: str, code: int, own_error: bool = False) -> int:
    """Print why the run ended ONCE, under torchrun too, and return the exit code.

    Process 0 speaks for all: the processes agree on non-finite values and on interrupts, and a bad input
    fails every process alike. An input error could still be one process's own (a file only it cannot
    read), so another process with an input error waits a few seconds first: when process 0 fails alike,
    torchrun ends this process before it speaks; otherwise it says what went wrong where."""
    rank = ranks.rank()
    if rank == 0:
        print(message, file=sys.stderr)
    elif own_error:
        time.sleep(5)
        print(f"{message} (process {rank})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
