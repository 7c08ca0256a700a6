"""Several fine-tunes in one batch (bitfit.infer.mixed) against serving them one after another.

    python benchmarks/mixed_batch.py          # the embedded SmolLM2-135M, 4 deltas, 8 rows: ~2 min on 2 CPU cores

Four deltas on the embedded model (random biases of the size training gives them: speed does not depend
on their values), eight requests, two per delta, each generating --new-tokens tokens greedily:
    mixed       ONE batch of 8 rows, each row adding its own delta (bitfit.infer.mixed.generate_many)
    one by one  for each delta: apply it, a batch of its 2 rows, take it off (what serving one
                fine-tune at a time costs; applying and removing a delta takes microseconds)
Reported: new tokens per second of each, best of --repeats, and that both give the same answers.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitfit.core.biases import add_missing_biases, select_biases  # noqa: E402
from bitfit.core.flat import FlatBiases  # noqa: E402
from bitfit.data.examples import questions
from bitfit.data.sources import load_records  # noqa: E402
from bitfit.infer.mixed import generate_many  # noqa: E402
from bitfit.model import pretrained  # noqa: E402
from bitfit.model.delta import apply_delta, read_delta, save_delta  # noqa: E402
from bitfit.run.evaluate import answers  # noqa: E402


def make_deltas(folder: Path, n: int) -> list[str]:
    """`n` deltas on the embedded model, each its biases moved by a different random 0.03 per entry."""
    paths = []
    for seed in range(n):
        model, _ = pretrained.load(pretrained.EMBEDDED)
        added = add_missing_biases(model)
        flat = FlatBiases(model, select_biases(model))
        flat.values.add_(0.03 * torch.randn(flat.values.shape, generator=torch.Generator().manual_seed(seed)))
        paths.append(str(folder / f"delta-{seed}.safetensors"))
        save_delta(paths[-1], model, flat, base_model=pretrained.EMBEDDED, added=added)
    return paths


def every_token(n: int) -> dict:
    """Greedy, and no row stops early at eos: the same work for every row, so speed compares."""
    return {"do_sample": False, "min_new_tokens": n}


def one_by_one(model, tokenizer, requests, new_tokens: int) -> list[str]:
    """Each delta in turn: applied, its rows generated as one batch, taken off again."""
    texts = {}
    for path in dict.fromkeys(path for _, path in requests):
        rows = [i for i, (_, p) in enumerate(requests) if p == path]
        apply_delta(model, path)
        said = answers(model, tokenizer, [requests[i][0] for i in rows], torch.device("cpu"), False, new_tokens,
                       generation=every_token(new_tokens))
        with torch.no_grad():
            for name, tensor in read_delta(path)[0].items():
                model.get_parameter(name).sub_(tensor)
        for i, text in zip(rows, said):
            texts[i] = text
    return [texts[i] for i in range(len(requests))]


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--deltas", type=int, default=4)
    cli.add_argument("--rows-per-delta", type=int, default=2)
    cli.add_argument("--new-tokens", type=int, default=32)
    cli.add_argument("--repeats", type=int, default=3)
    args = cli.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_deltas(Path(tmp), args.deltas)
        model, tokenizer = pretrained.load(pretrained.EMBEDDED)
        model.eval()
        records, places = load_records("builtin", f"heldout[:{args.deltas * args.rows_per_delta}]")
        prompts = [ids for ids, _, _ in questions(records, tokenizer, "alpaca", places)]
        requests = [(ids, paths[i % args.deltas]) for i, ids in enumerate(prompts)]
        timings = {"mixed": [], "one by one": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, run in (("mixed", lambda: generate_many(model, tokenizer, requests, args.new_tokens,
                                                                 generation=every_token(args.new_tokens))),
                              ("one by one", lambda: one_by_one(model, tokenizer, requests, args.new_tokens))):
                start = time.perf_counter()
                outputs[name] = run()
                timings[name].append(time.perf_counter() - start)
    new_tokens = len(requests) * args.new_tokens
    print(f"{len(requests)} requests over {args.deltas} deltas, {args.new_tokens} new tokens each, greedy; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}")
    for name, seconds in timings.items():
        print(f"  {name:<11} {min(seconds):6.2f} s   {new_tokens / min(seconds):7.1f} new tokens/s")
    print(f"  mixed / one by one: {min(timings['one by one']) / min(timings['mixed']):.2f}x the tokens/s; "
          f"same answers: {outputs['mixed'] == outputs['one by one']}")


if __name__ == "__main__":
    main()
