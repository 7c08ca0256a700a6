"""Classification with BitFit, measured: against a walkthrough's loop, and against full fine-tuning and a frozen encoder.

    python benchmarks/classify.py                    # both tables, the embedded all-MiniLM-L6-v2: ~10 min on 2 CPU cores
    python benchmarks/classify.py --part walkthrough # only the first table (~3 min)

1. The walkthrough's loop as written, against `python train.py --task classify` (its defaults), on the
   built-in sentiment and topic tasks (800 training rows, 200 held out), the same encoder and the same
   rows in the same order, one epoch of batches of 8. The loop is the one a popular BitFit tutorial starts from:
   `BertForSequenceClassification`, every parameter frozen, those with "bias" in their name unfrozen (so
   the classifier's random weight stays frozen: only its bias trains), `torch.optim.Adam` at lr 1e-3 over
   what requires grad, `CrossEntropyLoss`, dropout on. Two rounds per side, alternating, each run in a
   process of its own: seconds of training, peak RSS, held-out accuracy.
2. The BitFit paper's comparison on two classification tasks and one regression task generated in code
   (bitfit.data.tasks: sentiment, 2 classes; topic, 4 classes; rating, 1-5 stars): BitFit (`train.py` as it
   is), full fine-tuning (every weight, AdamW at --full-lr), and a frozen encoder whose new head alone
   trains (AdamW at train.py's lr), with the same rows, order, batches, linear schedule and clipping.
   Held-out accuracy and MCC (Pearson and Spearman for the rating), trainable parameters, seconds, peak RSS.
Every number is printed as a table and written to benchmarks/results/classify.json with the machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitfit.core.step import lr_factor  # noqa: E402
from bitfit.data.collate import pad_id, pad_labelled  # noqa: E402
from bitfit.data.examples import read_records  # noqa: E402
from bitfit.data.labelled import check_labelled, encode_labelled, label_names  # noqa: E402
from bitfit.data.layout import draw_steps  # noqa: E402
from bitfit.model import pretrained  # noqa: E402
from bitfit.run import report
from bitfit.run.config import TrainConfig  # noqa: E402
from bitfit.run.evaluate import labelled_measures  # noqa: E402
from bitfit.run.report import peak_memory_gb

TASKS = {"sentiment": ("builtin-sentiment", "classify"), "topic": ("builtin-topic", "classify"),
         "rating": ("builtin-rating", "regress")}
SEED, BATCH = 0, 8


def rows_of(source: str, task: str, split: str) -> tuple[list, list[str]]:
    return read_records(source, split, check=lambda row, place: check_labelled(row, place, task))


def data(source: str, task: str, tokenizer, classes) -> tuple[list, list]:
    """(training examples in bitfit's order, held-out examples), as train.py encodes them."""
    train = encode_labelled(*rows_of(source, task, "train"), tokenizer, 256, task, classes, progress=False)
    held_out = encode_labelled(*rows_of(source, task, "heldout"), tokenizer, 256, task, classes, progress=False)
    ordered = [[train[i] for i in step] for step in draw_steps(len(train), BATCH, 1, SEED)]
    return ordered, held_out


def classes_of(source: str, task: str) -> list | None:
    if task != "classify":
        return None
    records, places = rows_of(source, task, "train")
    return label_names([row["label"] for row in records], places)


def bitfit_side(source: str, task: str) -> dict:
    """`python train.py --task TASK --data SOURCE` with every other flag at its default."""
    import train

    with tempfile.TemporaryDirectory() as out:
        results = train.run(TrainConfig(task=task, data=source, out_dir=str(Path(out) / "run")))
    return {"seconds": results["train_seconds"], "after": results["after"], "trainable": results["trainable"],
            "peak_rss_gb": peak_memory_gb(torch.device("cpu"))}


def loop_side(method: str, source: str, task: str, lr: float) -> dict:
    """The walkthrough's loop as written ('walkthrough'), or full fine-tuning / a frozen encoder with its new
    head ('full' / 'head'): a plain loop over the same batches as bitfit's."""
    torch.manual_seed(SEED)
    classes = classes_of(source, task)
    model, tokenizer, head = pretrained.load_classifier(pretrained.EMBEDDED_ENCODER, [str(c) for c in classes] if classes else None)
    batches, held_out = data(source, task, tokenizer, classes)
    collate = lambda examples: pad_labelled(examples, pad_id(tokenizer), tokenizer.padding_side)  # noqa: E731
    for name, param in model.named_parameters():
        param.requires_grad_({"walkthrough": "bias" in name, "full": True, "head": name in head}[method])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == "walkthrough":  # as written: Adam, constant lr, CrossEntropyLoss over each batch's mean
        optimizer = torch.optim.Adam(trainable, lr=lr)
        criterion = torch.nn.CrossEntropyLoss()
    else:  # train.py's optimizer and schedule
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        criterion = torch.nn.MSELoss() if task == "regress" else torch.nn.CrossEntropyLoss()
    model.train()
    started = time.perf_counter()
    for step, examples in enumerate(batches):
        batch = collate(examples)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss = criterion(logits.squeeze(-1) if task == "regress" else logits, labels)
        optimizer.zero_grad()
        loss.backward()
        if method != "walkthrough":
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, len(batches), 0, "linear")
        optimizer.step()
    seconds = time.perf_counter() - started
    after = labelled_measures(model, held_out, collate, torch.device("cpu"), False, len(classes or []))
    return {"seconds": seconds, "after": after, "trainable": sum(p.numel() for p in trainable),
            "peak_rss_gb": peak_memory_gb(torch.device("cpu"))}


def in_process(args: list[str]) -> dict:
    """One side in a fresh process, so that its peak memory is its own."""
    done = subprocess.run([sys.executable, __file__, "--side", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def walkthrough_table(rounds: int) -> list[dict]:
    runs = []
    for name in ("sentiment", "topic"):
        source, task = TASKS[name]
        for side in ["walkthrough", "bitfit", "bitfit", "walkthrough"][: 2 * rounds]:
            args = [side, source, task] + (["1e-3"] if side == "walkthrough" else [])
            runs.append({"task": name, "side": side, **in_process(args)})
            print(f"  {name} {side}: {runs[-1]['seconds']:.1f} s, accuracy {100 * runs[-1]['after']['accuracy']:.1f}%",
                  flush=True)
    print("\n| all-MiniLM-L6-v2, one epoch | the walkthrough's loop | `train.py --task classify` |")
    print("| --- | --- | --- |")
    for name in ("sentiment", "topic"):
        sides = [[r for r in runs if r["task"] == name and r["side"] == side] for side in ("walkthrough", "bitfit")]
        rows = (("training seconds (mean of rounds)", lambda rs: f"{sum(r['seconds'] for r in rs) / len(rs):.1f}"),
                ("peak RSS", lambda rs: f"{max(r['peak_rss_gb'] for r in rs):.2f} GiB"),
                ("held-out accuracy", lambda rs: "/".join(f"{100 * r['after']['accuracy']:.1f}%" for r in rs)),
                ("trainable parameters", lambda rs: f"{rs[0]['trainable']:,}"))
        for label, value in rows:
            print(f"| {name}: {label} | {value(sides[0])} | {value(sides[1])} |")
    return runs


def methods_table(full_lr: float) -> list[dict]:
    runs = []
    for name, (source, task) in TASKS.items():
        for method in ("bitfit", "full", "head"):
            args = ["bitfit", source, task] if method == "bitfit" else \
                   [method, source, task, str(full_lr if method == "full" else TrainConfig().lr)]
            runs.append({"task": name, "method": method, **in_process(args)})
            print(f"  {name} {method}: {runs[-1]['after']}", flush=True)
    print("\n| task | method | trainable | held-out | seconds | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        after = run["after"]
        measured = (f"Pearson {after['pearson']:.3f}, Spearman {after['spearman']:.3f}" if "pearson" in after else
                    f"accuracy {100 * after['accuracy']:.1f}%, MCC {after['mcc']:.3f}")
        print(f"| {run['task']} | {run['method']} | {run['trainable']:,} | {measured} | {run['seconds']:.1f} | "
              f"{run['peak_rss_gb']:.2f} GiB |")
    return runs


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--part", choices=("walkthrough", "methods", "both"), default="both")
    cli.add_argument("--rounds", type=int, default=2, help="rounds per side of the walkthrough comparison")
    cli.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning's lr (BERT's usual 2e-5 to 5e-5)")
    cli.add_argument("--side", nargs="+", help=argparse.SUPPRESS)  # a child process: one side, JSON out
    args = cli.parse_args()
    if args.side:
        method, source, task, *lr = args.side
        result = bitfit_side(source, task) if method == "bitfit" else loop_side(method, source, task, float(lr[0]))
        print(json.dumps(result))
        return
    measured = {"machine": report.environment(torch.device("cpu")), "date": time.strftime("%Y-%m-%d")}
    if args.part in ("walkthrough", "both"):
        measured["walkthrough"] = walkthrough_table(args.rounds)
    if args.part in ("methods", "both"):
        measured["methods"] = methods_table(args.full_lr)
    out = Path(__file__).resolve().parent / "results" / "classify.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(measured, indent=2, allow_nan=False) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
