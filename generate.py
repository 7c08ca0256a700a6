"""See what BitFit changed: the base model's and the tuned models' answers, side by side.

    python generate.py                                  # latest run's delta, held-out built-in prompts
    python generate.py --prompt "Add these two numbers.
    12 30"                                              # one prompt and one delta: streamed as it is generated
    python generate.py --delta runs/<run>/delta.safetensors --prompts-file questions.txt --sample
    python generate.py --delta runs/<a> --delta runs/<b>   # the base and two runs, in ONE batched generation

The base is the model the deltas name (or --model); each tuned model is that base plus its delta. All
see the prompt template the (first) run trained with (its config.json), so the comparison is fair.
The base and every delta answer in one batch: each row adds its own delta (bitfit.infer.mixed).
"""

# First of all: while the rest loads (seconds), Ctrl-C is one line, not a traceback (bitfit.run.interrupt).
import bitfit  # noqa: F401  # isort: skip

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from bitfit.cli import ArgumentParser, add_trust_flags, check_device, entry_point
from bitfit.core.errors import BitfitError
from bitfit.data.collate import pad_batch, pad_id
from bitfit.data.examples import TEMPLATES, asks, questions
from bitfit.data.sources import load_records, read_lines
from bitfit.data.tasks import is_correct
from bitfit.files import parse_json
from bitfit.infer.mixed import DeltaTable, generate_many
from bitfit.model import pretrained
from bitfit.model.delta import apply_delta, read_delta, task_of
from bitfit.run.evaluate import answers
from bitfit.run.finite import refuse_broken
from bitfit.run.run_folder import DELTA, delta_of, is_run_folder


def latest_delta(runs: Path = Path("runs")) -> Path:
    """The delta of the most recent `python train.py` run under `runs/`."""
    deltas = sorted(runs.glob(f"*/{DELTA}"), key=lambda path: path.stat().st_mtime)
    if not deltas:
        raise BitfitError(f"no finished run under {runs}/: run `python train.py` first, or pass --delta")
    return deltas[-1]


def read_prompts(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Records to ask about, and the place of each for error messages: --prompt texts, a --prompts-file,
    or else held-out built-in questions.

    A prompts file is one prompt per line (UTF-8 text) or records (.json/.jsonl/.csv/.parquet, any shape
    train.py reads that asks a question: not plain text), each checked before the model loads; records
    that carry an answer get the model's answers marked right or wrong.
    """
    if args.prompt:
        return [{"instruction": text} for text in args.prompt], [f"--prompt {n}" for n in range(1, len(args.prompt) + 1)]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"):
            records, places = load_records(str(path))
        else:
            lines = [(number, line) for number, line in read_lines(path) if line.strip()]
            records, places = [{"instruction": line} for _, line in lines], [f"{path} line {number}" for number, _ in lines]
        if not records:
            raise BitfitError(f"--prompts-file {path} holds no prompts (no records, or only empty lines)")
        for row, place in zip(records, places):  # every row checked now, before the model loads
            if not asks(row):  # check_record's refusals first: a malformed row says what is wrong with it
                raise BitfitError(f"{place}: a plain-text row (text) asks no question: give prompts as instruction, "
                                  "prompt or messages rows")
        return records, places
    return load_records("builtin", f"heldout[:{args.n}]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cli = ArgumentParser(description="Compare the base model's and the BitFit-tuned model's answers.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("--delta", action="append", default=[],
                     help="a delta.safetensors, a run folder or a PEFT BEFT adapter folder (repeatable: compared side "
                          "by side); none means the latest run under runs/")
    cli.add_argument("--model", default="", help="the base model; '' means the one the deltas were trained on")
    cli.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); one prompt is streamed")
    cli.add_argument("--prompts-file", default="", help="prompts, one per line, or a .json/.jsonl of Alpaca records")
    cli.add_argument("-n", type=int, default=5, help="held-out built-in questions to ask when no prompt is given")
    cli.add_argument("--template", default="", help="'alpaca' or 'chat'; '' means the template the run trained with")
    cli.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer at most")
    cli.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cli.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    cli.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (with --sample)")
    cli.add_argument("--seed", type=int, default=0, help="seed for sampling: the same seed gives the same answers")
    cli.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    add_trust_flags(cli)
    return check_args(cli.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` if every value means something; else a BitfitError naming the flag, before any model is loaded."""
    if args.max_new_tokens < 1:
        raise BitfitError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.n < 1:
        raise BitfitError(f"-n must be at least 1, not {args.n}")
    if args.template not in ("", *TEMPLATES):
        raise BitfitError(f"--template must be 'alpaca', 'chat' or '' (the run's template), not {args.template!r}")
    # Greedy decoding ignores the temperature, and a temperature of 0 commonly means greedy: checked with --sample.
    if args.sample and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise BitfitError(f"--temperature must be a finite number above 0 with --sample, not {args.temperature}")
    if args.sample and args.temperature < 1e-6:  # logits divided by less can overflow to inf, and the draw fails
        raise BitfitError(f"--temperature {args.temperature:g} is too small to sample with (below 1e-6 the scaled "
                          "logits can overflow); for the most likely answer, drop --sample")
    if not 0 <= args.seed < 2**63:
        raise BitfitError(f"--seed must be in [0, 2**63), not {args.seed}")
    if not 0 < args.top_p <= 1:  # also refuses nan, which compares False with everything
        raise BitfitError(f"--top-p must be above 0 and at most 1, not {args.top_p}")
    check_device(args.device)
    return args



def run(args: argparse.Namespace) -> dict:
    deltas = [delta_of(given) for given in args.delta] or [latest_delta()]
    metadata = [read_delta(str(delta))[1] for delta in deltas]
    for delta, meta in zip(deltas, metadata):
        if task_of(meta)[0] != "lm":
            raise BitfitError(f"{delta} is a {task_of(meta)[0]} delta (a classifier's or regressor's): classify text "
                              f"with it by python -m bitfit.infer.classify --delta {delta} --text ...")
    bases = sorted({args.model or m["base_model"] for m in metadata})
    if len(bases) > 1:
        raise BitfitError(f"the deltas were trained on different bases ({', '.join(map(repr, bases))}): compare deltas "
                          "of one base, or name the one to use with --model")
    if not bases[0]:
        raise BitfitError(f"{deltas[0]} does not name its base model: pass --model")
    trained = trained_template(deltas[0]) if not args.template else None
    template = args.template or trained or "alpaca"
    records, places = read_prompts(args)  # read and checked before the model loads
    device = pretrained.pick_device(args.device)
    model, tokenizer = pretrained.load(bases[0], device, torch.float32, args.trust_remote_code, args.trust_pickle_weights)

    asked = questions(records, tokenizer, template, places)  # (prompt ids, question, expected answer or '')
    prompts = [ids for ids, _, _ in asked]
    most = pretrained.new_tokens_within_context(model, max(map(len, prompts)), args.max_new_tokens)
    if most < args.max_new_tokens:
        print(f"note: --max-new-tokens {args.max_new_tokens} is past the model's context of "
              f"{pretrained.context_length(model) or pretrained.NO_CONTEXT} tokens: at most {most} new tokens after the longest prompt")
    generation = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {"do_sample": False}
    labels = ["TUNED"] if len(deltas) == 1 else [chr(ord("A") + i) for i in range(len(deltas))]
    for label, delta, trained_on in zip(labels, deltas, metadata):
        print(f"{label} = {delta} (trained on {trained_on['base_model']!r})")
    print(f"template {template!r}, {'sampling' if args.sample else 'greedy'}")
    sides = {"BASE": None, **{label: str(delta) for label, delta in zip(labels, deltas)}}

    # Every delta checked against this base, and its outputs finite, before anything is generated.
    probe = pad_batch([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompts[:4]], pad_id(tokenizer))
    table = DeltaTable(model, [str(delta) for delta in deltas])  # refuses, naming the delta's base, if not this base
    try:
        for number, delta in enumerate(deltas, start=1):
            with table.use([number] * len(probe["input_ids"])):
                refuse_broken(model, probe, str(delta))
    finally:
        table.remove()

    torch.manual_seed(args.seed)  # the same seed, the same draws
    streamed = len(prompts) == 1 and len(deltas) == 1  # one answer per model: watch it appear, base then tuned
    if streamed:
        said = {}
        for side, delta in sides.items():
            if delta:
                apply_delta(model, delta)
            print(f"{side:>5}: ", end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            said[side] = answers(model, tokenizer, prompts, device, False, args.max_new_tokens,
                                 generation={**generation, "streamer": streamer})
    else:  # every side's answers in one batched generation: each row adds its own delta
        texts = generate_many(model, tokenizer, [(ids, delta) for delta in sides.values() for ids in prompts],
                              args.max_new_tokens, generation=generation)
        said = {side: texts[i * len(prompts) : (i + 1) * len(prompts)] for i, side in enumerate(sides)}
    correct, checkable = mark(asked, said, shown=not streamed)
    return {"answers": said, "correct": correct, "checkable": checkable}


def trained_template(delta: Path) -> str | None:
    """The template a run trained with (its config.json), where the delta is a run's; None otherwise."""
    if not is_run_folder(delta.parent):
        return None
    try:
        template = parse_json((delta.parent / "config.json").read_text()).get("template")
    except (OSError, ValueError, AttributeError) as error:  # gone, not JSON, not an object
        raise BitfitError(f"{delta.parent / 'config.json'} cannot be read ({error}); pass --template to say which "
                          "template the run trained with") from None
    if template not in TEMPLATES:
        raise BitfitError(f"{delta.parent / 'config.json'} names template {template!r}, not 'alpaca' or 'chat'; "
                          "pass --template")
    return template


def mark(asked: list, said: dict[str, list[str]], shown: bool) -> tuple[dict[str, int], int]:
    """(right answers per side, checkable questions); `shown`: print every question and each side's answer
    (a streamed answer was printed as it came)."""
    correct = dict.fromkeys(said, 0)
    for number, (_, question, expected) in enumerate(asked, start=1):
        if shown:
            one_line = question.strip().replace("\n", " | ")
            print(f"\n[{number}] {one_line}" + (f"   (expected: {expected})" if expected else ""))
        for side, texts in said.items():
            right = bool(expected) and is_correct(texts[number - 1], expected)
            correct[side] += right
            if shown:
                print(f"  {side:>5}: {texts[number - 1].strip()!r}" + (("  [right]" if right else "  [wrong]") if expected else ""))
    checkable = sum(bool(expected) for _, _, expected in asked)
    if checkable:
        print("\ncorrect: " + ", ".join(f"{side.lower() if side in ('BASE', 'TUNED') else side} {n}/{checkable}"
                                       for side, n in correct.items()))
    return correct, checkable


@entry_point
def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
