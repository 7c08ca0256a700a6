"""Held-out loss and exact match (or, for classifiers and regressors, accuracy, F1, MCC, Pearson and
Spearman): the numbers that show whether BitFit worked; and a cache of the untrained base's, which every
run on the same base and held-out data would otherwise measure again.

A run measures them three times, each one call of train.py's:
    before_training   the untrained model (cached, and read back by a resumed run)
    during_training   every --eval-every steps, as fields of the step's record
    after_training    the tuned model; a non-finite loss there deletes the delta just written
"""

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bitfit import __version__
from bitfit.core.errors import BitfitError, NonFiniteError
from bitfit.core.loss import label_tokens, loss_sum, rows_loss
from bitfit.data.collate import collator, pad_batch, pad_id, padder
from bitfit.data.examples import Example, asks, questions
from bitfit.data.tasks import is_correct
from bitfit.files import digest, finite_number, parse_json, write_json
from bitfit.model.pretrained import cache_dir, eager, is_sharded, new_tokens_within_context
from bitfit.run import measures, ranks, run_folder
from bitfit.run.config import TrainConfig
from bitfit.run.report import said


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    examples: list[Example],
    collate: Callable[[list[Example]], dict[str, torch.Tensor]],
    device: torch.device,
    bf16: bool,
    batch_size: int = 16,
) -> float:
    """Mean next-token loss per label token over all examples (token-weighted, as in training)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += loss_sum(model, batch).double()
        count += label_tokens(batch)
    model.train(was_training)
    return total.item() / count


@torch.no_grad()
def answers(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    device: torch.device,
    bf16: bool,
    max_new_tokens: int,
    batch_size: int = 50,
    generation: dict | None = None,
) -> list[str]:
    """Answers to prompts (token ids, from bitfit.data.examples.questions), generated in left-padded batches and cut at eos.

    Greedy unless `generation` says otherwise (do_sample, temperature, top_p, a streamer...: passed
    to `model.generate`). At most as many new tokens as the model's context leaves after the prompts
    (bitfit.model.pretrained.new_tokens_within_context)."""
    was_training = model.training
    model.eval()
    pad = pad_id(tokenizer)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = [{"input_ids": i, "attention_mask": [1] * len(i)} for i in prompts[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad, padding_side="left").items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # synced_gpus: with sharded weights a process whose answers ended keeps stepping with the others
            most = new_tokens_within_context(model, batch["input_ids"].shape[1], max_new_tokens)
            out = model.generate(**batch, max_new_tokens=most, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=is_sharded(model), **(generation or {"do_sample": False}))
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return texts


def exact_match(model: nn.Module, tokenizer, records: list[dict], template: str, device: torch.device,
                bf16: bool, max_new_tokens: int) -> dict:
    """Share of records whose greedy answer's first line equals the expected answer, overall and per task;
    {} where no record asks a question (plain text rows: their measure is the held-out loss alone)."""
    records = [record for record in records if asks(record)]
    if not records:
        return {}
    asked = questions(records, tokenizer, template)
    generated = answers(model, tokenizer, [ids for ids, _, _ in asked], device, bf16, max_new_tokens)
    correct = [is_correct(text, expected) for text, (_, _, expected) in zip(generated, asked)]
    by_task: dict[str, list[bool]] = {}
    for row, ok in zip(records, correct):
        by_task.setdefault(row.get("task", "all"), []).append(ok)
    return {
        "exact_match": sum(correct) / len(correct),
        "by_task": {task: sum(oks) / len(oks) for task, oks in by_task.items()},
        "samples": [{"prompt": tokenizer.decode(ids), "expected": expected, "generated": g}
                    for (ids, _, expected), g in list(zip(asked, generated))[:5]],
    }


@torch.no_grad()
def labelled_measures(model: nn.Module, examples: list[Example], collate: Callable[[list[Example]], dict[str, torch.Tensor]],
                      device: torch.device, bf16: bool, n_classes: int, batch_size: int = 64) -> dict:
    """Held-out loss (mean per example, as in training) and the measures of bitfit.run.measures: accuracy, MCC
    and F1 (two classes) of the argmax class; Pearson and Spearman of a regressor's number (n_classes 0)."""
    was_training = model.training
    model.eval()
    total, predicted = torch.zeros((), device=device, dtype=torch.float64), []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        total += rows_loss(logits, batch["labels"]).double()  # as in training
        predicted += (logits.squeeze(-1) if not n_classes else logits.argmax(-1)).tolist()
    model.train(was_training)
    expected = [example["label"] for example in examples]
    scores = measures.regression(predicted, expected) if not n_classes else measures.classification(predicted, expected, n_classes)
    return {"loss": total.item() / len(examples), **scores}


def base_eval_cache(depends_on: dict) -> Path:
    """Where the evaluation of an untrained base is cached: one JSON file per combination of what its
    numbers depend on (the base's fingerprint, the held-out data's hash, the template, the generation
    settings, the device...), so a change to any of them misses the cache. $BITFIT_EVAL_CACHE, or
    base-evals/ in bitfit's cache folder."""
    folder = Path(os.environ["BITFIT_EVAL_CACHE"]) if "BITFIT_EVAL_CACHE" in os.environ else cache_dir() / "base-evals"
    return folder / f"{digest(depends_on)}.json"


MEASURES = {"lm": ("loss",), "classify": ("loss", "accuracy", "mcc"), "regress": ("loss", "pearson", "spearman")}


def stored_evaluation_problem(value: object, task: str = "lm") -> str | None:
    """What is wrong with an evaluation read back from a file (a run's eval_before.json, a cache entry),
    or None when it has every field its task's evaluation gives, each of its type and range."""
    if not isinstance(value, dict):
        return f"it holds a {type(value).__name__}, not a JSON object"
    for key in (*MEASURES[task], "seconds", *(("f1",) if "f1" in value else ())):
        number = value.get(key)
        if not finite_number(number):
            return f"its {key!r} is {str(number)[:40]!r}, not a finite number"
    if task != "lm" or "exact_match" not in value:  # plain text held out: no question, no exact match
        return None
    if not finite_number(value["exact_match"]):
        return f"its 'exact_match' is {str(value['exact_match'])[:40]!r}, not a finite number"
    shares = value.get("by_task")
    if not 0 <= value["exact_match"] <= 1 or not isinstance(shares, dict) or not all(
            finite_number(share) and 0 <= share <= 1 for share in shares.values()):
        return "its exact match shares are not numbers from 0 to 1"
    samples = value.get("samples")
    if not isinstance(samples, list) or not all(
            isinstance(sample, dict) and all(isinstance(sample.get(key), str) for key in ("prompt", "expected", "generated"))
            for sample in samples):
        return "its 'samples' are not a list of {prompt, expected, generated} texts"
    return None


# --- the three evaluations of a run ------------------------------------------------------------------

def before_training(model, tokenizer, held_out: dict, cfg: TrainConfig, device, out_dir: Path, first_step: int,
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
        before, source = measure(model, tokenizer, held_out, cfg, device), "measured"
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


@eager
def during_training(model, tokenizer, held_out: dict, cfg: TrainConfig, device) -> dict:
    """The held-out measures of one --eval-every point, as metrics.jsonl fields."""
    measured = {"eval_loss": finite_loss(heldout_loss(model, held_out["examples"], collator(cfg.task, tokenizer), device, cfg.bf16))}
    if cfg.eval_every_exact_match and (matched := exact_match(model, tokenizer, held_out["records"], cfg.template,
                                                              device, cfg.bf16, cfg.max_new_tokens)):
        measured["eval_exact_match"] = matched["exact_match"]
    return measured


def after_training(model, tokenizer, held_out: dict, cfg: TrainConfig, device, out_dir: Path) -> dict:
    """The evaluation after training. A NaN held-out loss means the tuned model is broken on data it did
    not train on: the delta written just before is deleted, so nothing broken is left named like a result."""
    try:
        return measure(model, tokenizer, held_out, cfg, device)
    except NonFiniteError as error:
        if ranks.is_main():
            (out_dir / run_folder.DELTA).unlink(missing_ok=True)
        raise NonFiniteError(f"after training, {error}: the tuned model is broken on the held-out data, so its delta "
                             f"was deleted (try a lower --lr)") from None


@eager
def measure(model, tokenizer, held_out: dict, cfg: TrainConfig, device) -> dict:
    """Held-out loss and exact match (a classifier's or regressor's measures: bitfit.run.measures), timed."""
    start = time.perf_counter()
    if cfg.task != "lm":
        result = labelled_measures(model, held_out["examples"], collator(cfg.task, tokenizer), device, cfg.bf16,
                                   len(held_out["classes"] or []))
        finite_loss(result["loss"])
        return {**result, "seconds": time.perf_counter() - start}
    loss = finite_loss(heldout_loss(model, held_out["examples"], padder(tokenizer), device, cfg.bf16))
    result = exact_match(model, tokenizer, held_out["records"], cfg.template, device, cfg.bf16, cfg.max_new_tokens)
    return {"loss": loss, **result, "seconds": time.perf_counter() - start}


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
