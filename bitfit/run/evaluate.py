"""Held-out loss and exact match (or, for classifiers and regressors, accuracy, F1, MCC, Pearson and
Spearman): the numbers that show whether BitFit worked; and a cache of the untrained base's, which every
run on the same base and held-out data would otherwise measure again."""

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bitfit.core.loss import label_tokens, loss_sum, rows_loss
from bitfit.data.collate import pad_batch, pad_id
from bitfit.data.examples import Example, asks, questions
from bitfit.data.tasks import is_correct
from bitfit.files import digest, finite_number
from bitfit.model.pretrained import cache_dir, is_sharded, new_tokens_within_context
from bitfit.run import measures


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
