"""The run's data, from the rows to each process's passes: read and checked before the model loads,
encoded into examples, laid out into steps and passes; the held-out set; and the hashes of all of it
that a resumed run must match.

    read_data          every row read and checked, and a classifier's classes: a typo fails in seconds
    training_plan      the examples, this process's passes of every step, the collator of a pass
    held_out_set       the held-out records and examples, with the hash their measures depend on
    check_inputs       the model's, the training data's and the held-out data's hashes recorded, or compared
"""

import math
from functools import partial
from pathlib import Path

from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import forward_accepts
from bitfit.data import layout, packing
from bitfit.data.collate import collator
from bitfit.data.examples import examples_of, read_records
from bitfit.data.labelled import check_labelled, check_rows, encode_labelled
from bitfit.data.sources import declared_classes, is_builtin
from bitfit.files import digest
from bitfit.model import pretrained
from bitfit.model.delta import base_fingerprint
from bitfit.run import ranks, run_folder
from bitfit.run.config import MAX_DRAWS, TrainConfig


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
    take a longer row (a causal LM's rows past its context are only warned about: training_plan)."""
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


def training_plan(cfg: TrainConfig, rows: dict, model, tokenizer, world: int, rank: int, log) -> tuple:
    """(examples, this process's passes of every step, the collator that makes a pass a batch, and the facts
    for results.json: examples kept and dropped, steps, layout)."""
    if cfg.task == "lm" and (context := pretrained.context_length(model)) and cfg.max_len > context:
        log(f"warning: --max-len {cfg.max_len} is past the model's context of {context} tokens: an example longer than "
            f"{context} tokens trains positions the model never saw; --max-len {context} keeps them within it")
    examples, dropped = examples_for(cfg, rows, "train", f"{cfg.data} {cfg.split}", model, tokenizer, log)
    lengths = [len(e["input_ids"]) for e in examples]
    log(f"data: {len(examples)} examples from {cfg.data} {cfg.split}"
        + (f", {dropped} dropped (response cut away by max_len {cfg.max_len})" if cfg.task == "lm" else "")
        + f", {sum(lengths) / len(lengths):.1f} tokens on average")

    pad = collator(cfg.task, tokenizer)
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


def held_out_set(cfg: TrainConfig, rows: dict, model, tokenizer) -> dict | None:
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
    ranks.on_main(lambda: run_folder.same_inputs(out_dir, {"model": fingerprint, "training data": digest(token_ids(examples)),
                                                     "held-out data": held_out["hash"] if held_out else "none"},
                                           resuming=bool(cfg.resume)))
    return fingerprint


