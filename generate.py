"""See what BitFit changed: the base model's and the tuned model's answers, side by side.

    python generate.py                                  # latest run's delta, held-out built-in prompts
    python generate.py --prompt "Add these two numbers.
    12 30"                                              # one prompt, streamed as it is generated
    python generate.py --delta runs/<run>/delta.safetensors --prompts-file questions.txt --sample

The base is the model the delta names (or --model); the tuned model is that base plus the delta. Both
see the prompt template the run trained with (its config.json), so the comparison is fair.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from bitfit import models
from bitfit.data import check_record, load_records, prompt_text
from bitfit.delta import apply_delta, read_delta
from bitfit.errors import BitfitError
from bitfit.evaluate import answers
from bitfit.tasks import is_correct


def latest_delta(runs: Path = Path("runs")) -> Path:
    """The delta of the most recent `python train.py` run under `runs/`."""
    deltas = sorted(runs.glob("*/delta.safetensors"), key=lambda path: path.stat().st_mtime)
    if not deltas:
        raise BitfitError(f"no finished run under {runs}/: run `python train.py` first, or pass --delta")
    return deltas[-1]


def read_prompts(args: argparse.Namespace) -> list[dict]:
    """Records to ask about: --prompt texts, a --prompts-file, or else held-out built-in questions.

    A prompts file is one prompt per line (.txt) or Alpaca records (.json/.jsonl); records that carry
    an `output` get their answers marked right or wrong.
    """
    if args.prompt:
        return [{"instruction": text} for text in args.prompt]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.suffix in (".json", ".jsonl"):
            return load_records(str(path))
        if not path.is_file():
            raise BitfitError(f"prompts file not found: {path}")
        return [{"instruction": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return load_records("builtin", f"heldout[:{args.n}]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(description="Compare the base model's and the BitFit-tuned model's answers.",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("--delta", default="", help="a delta.safetensors; '' means the latest run under runs/")
    cli.add_argument("--model", default="", help="the base model; '' means the one the delta was trained on")
    cli.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); one prompt is streamed")
    cli.add_argument("--prompts-file", default="", help="prompts, one per line, or a .json/.jsonl of Alpaca records")
    cli.add_argument("-n", type=int, default=5, help="held-out built-in questions to ask when no prompt is given")
    cli.add_argument("--template", default="", help="'alpaca' or 'chat'; '' means the template the run trained with")
    cli.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer at most")
    cli.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cli.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    cli.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (with --sample)")
    cli.add_argument("--seed", type=int, default=0, help="seed for sampling; base and tuned get the same")
    cli.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    cli.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")
    return cli.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    delta = Path(args.delta) if args.delta else latest_delta()
    metadata = read_delta(str(delta))[1]
    run_config = delta.parent / "config.json"
    template = args.template or (json.loads(run_config.read_text())["template"] if run_config.is_file() else "alpaca")
    device = models.pick_device(args.device)
    model, tokenizer = models.load(args.model or metadata["base_model"], device, torch.float32, args.trust_remote_code)

    records = read_prompts(args)
    fields = [check_record(i, {"input": "", "output": "", **row}) for i, row in enumerate(records)]
    prompts = [prompt_text(tokenizer, template, instruction, input) for instruction, input, _ in fields]
    generation = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {"do_sample": False}
    stream = len(prompts) == 1
    print(f"delta {delta} (trained on {metadata['base_model']!r}), template {template!r}, "
          f"{'sampling' if args.sample else 'greedy'}")

    said = {}
    for side in ("BASE", "TUNED"):
        if side == "TUNED":
            apply_delta(model, str(delta))  # refuses, naming the delta's base, if this is not that base
        torch.manual_seed(args.seed)  # the same draws for both sides
        if stream:
            print(f"{side:>5}: ", end="", flush=True)
            generation["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        said[side] = answers(model, tokenizer, prompts, template, device, False, args.max_new_tokens, generation=generation)

    correct = {"BASE": 0, "TUNED": 0}
    for number, (row, (instruction, input, expected)) in enumerate(zip(records, fields), start=1):
        checkable = bool(row.get("output"))
        if not stream:
            question = "\n".join([instruction, input]).strip().replace("\n", " | ")
            print(f"\n[{number}] {question}" + (f"   (expected: {expected})" if checkable else ""))
        for side in ("BASE", "TUNED"):
            right = checkable and is_correct(said[side][number - 1], expected)
            correct[side] += right
            mark = ("  [right]" if right else "  [wrong]") if checkable else ""
            if not stream:
                print(f"  {side:>5}: {said[side][number - 1].strip()!r}{mark}")
    checkable = sum(bool(row.get("output")) for row in records)
    if checkable:
        print(f"\ncorrect: base {correct['BASE']}/{checkable}, tuned {correct['TUNED']}/{checkable}")
    return {"answers": said, "correct": correct, "checkable": checkable}


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except BitfitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
