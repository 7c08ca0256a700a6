"""Classify new text with one or more classifier deltas: each text's label and probability (a regressor's
number), every delta's in ONE batched pass of the shared encoder (bitfit.infer.mixed.classify_many).

    python -m bitfit.infer.classify --delta runs/<run> --text "I loved this movie." --text "It was dreadful."
    python -m bitfit.infer.classify --delta runs/<a> --delta runs/<b> --texts-file reviews.jsonl

A texts file is one text per line (UTF-8), or rows (.json/.jsonl/.csv/.parquet) of any shape train.py
--task classify reads (a text or a pair, the same for every row); rows that carry a label (as training
reads it: " 1", "1" and 1.0 are the class 1) get each delta's answer marked right or wrong, and a row
without one (none, null, or GLUE's -1 of its test splits) is classified unmarked.
"""

import argparse
import sys
from pathlib import Path

import torch

from bitfit.cli import ArgumentParser, add_trust_flags, check_device, entry_point
from bitfit.core.errors import BitfitError
from bitfit.data.labelled import check_label, one_shape, read_class, texts_of
from bitfit.data.sources import load_records, read_lines
from bitfit.infer.mixed import classify_many
from bitfit.model import pretrained
from bitfit.model.delta import read_delta, task_of
from bitfit.run.run_folder import delta_of


def read_texts(args: argparse.Namespace) -> tuple[list[tuple[str, ...]], list, list[str]]:
    """(texts of each input, its label or None, its place): --text, or a --texts-file."""
    if args.text:
        return [(text,) for text in args.text], [None] * len(args.text), [f"--text {n}" for n in range(1, len(args.text) + 1)]
    path = Path(args.texts_file)
    if path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"):
        rows, places = load_records(str(path))
        texts = [texts_of(row, place) for row, place in zip(rows, places)]
        one_shape(texts, places)  # a pair row that lost its second text is no single text
        labels = [given_label(row) for row in rows]
    else:
        lines = [(number, line) for number, line in read_lines(path) if line.strip()]
        texts, labels, places = [(line,) for _, line in lines], [None] * len(lines), [f"{path} line {n}" for n, _ in lines]
    if not texts:
        raise BitfitError(f"--texts-file {path} holds no texts (no rows, or only empty lines)")
    return texts, labels, places


def given_label(row: dict) -> object:
    """A row's label to mark answers by, or None where it has none: no label, null, or GLUE's -1 ("no label",
    as its test splits are); a class label spelt as training reads it (check_label)."""
    label = read_class(row.get("label"))
    return None if label is None or label == -1 else label


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cli = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("--delta", action="append", required=True,
                     help="a classifier's delta.safetensors, run folder or PEFT adapter folder (repeatable: one encoder, "
                          "several tasks, in one batch)")
    cli.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    cli.add_argument("--texts-file", default="", help="texts, one per line, or labelled rows (.json/.jsonl/.csv/.parquet)")
    cli.add_argument("--model", default="", help="the base encoder; '' means the one the deltas were trained on")
    cli.add_argument("--max-len", type=int, default=512, help="texts are cut to this many tokens")
    cli.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    add_trust_flags(cli)
    args = cli.parse_args(argv)
    if bool(args.text) == bool(args.texts_file):
        raise BitfitError("give texts to classify: --text (repeatable) or --texts-file, one of the two")
    if args.max_len < 1:
        raise BitfitError(f"--max-len must be at least 1, not {args.max_len}")
    check_device(args.device)
    return args


def run(args: argparse.Namespace) -> list[list[dict]]:
    """Each delta's answers, in the order of the deltas given."""
    paths = [str(delta_of(given)) for given in args.delta]
    metadata = [read_delta(path)[1] for path in paths]  # each checked whole before the model loads
    for path, meta in zip(paths, metadata):
        if task_of(meta)[0] == "lm":
            raise BitfitError(f"{path} is a causal LM's delta (--task lm): generate.py uses it; classify takes a "
                              "classifier's or regressor's")
    bases = sorted({args.model or m["base_model"] for m in metadata})
    if len(bases) > 1:
        raise BitfitError(f"the deltas were trained on different bases ({', '.join(map(repr, bases))}): classify with "
                          "deltas of one base, or name the one to use with --model")
    texts, labels, places = read_texts(args)
    for label, place in zip(labels, places):  # a labelled row is marked right or wrong: its label must be a class
        for path, meta in zip(paths, metadata):
            classes = task_of(meta)[1]
            if label is not None and classes and str(check_label({"label": label}, place, "classify")) not in classes:
                raise BitfitError(f"{place}: label {label!r} is not one of {path}'s classes {classes}")
    labels = [str(label) if label is not None else None for label in labels]  # as a class's name is saved
    model, tokenizer = pretrained.load_for(bases[0], *task_of(metadata[0]), pretrained.pick_device(args.device),
                                       torch.float32, args.trust_remote_code, args.trust_pickle_weights)
    said = classify_many(model, tokenizer, [(t, path) for path in paths for t in texts], args.max_len)
    answers = [said[i * len(texts) : (i + 1) * len(texts)] for i in range(len(paths))]

    names = ["TUNED"] if len(paths) == 1 else [chr(ord("A") + i) for i in range(len(paths))]
    for name, path, meta in zip(names, paths, metadata):
        task, classes = task_of(meta)
        print(f"{name} = {path} ({task}" + (f": {', '.join(classes)})" if classes else ")"))
    right = dict.fromkeys(names, 0)
    for number, (text, label, place) in enumerate(zip(texts, labels, places), start=1):
        print(f"\n[{number}] {' | '.join(text)}" + (f"   (expected: {label})" if label is not None else ""))
        for name, answer in zip(names, (a[number - 1] for a in answers)):
            if "value" in answer:
                print(f"  {name:>5}: {answer['value']:.4g}")
                continue
            correct = label is not None and answer["label"] == label
            right[name] += correct
            print(f"  {name:>5}: {answer['label']} (p {answer['probability']:.3f})"
                  + (("  [right]" if correct else "  [wrong]") if label is not None else ""))
    checkable = sum(label is not None for label in labels)
    if checkable and any("label" in a[0] for a in answers):
        print("\ncorrect: " + ", ".join(f"{name} {n}/{checkable}" for name, n in right.items()))
    return answers


@entry_point
def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
