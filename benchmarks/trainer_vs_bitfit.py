"""bitfit against the HF Trainer recipe, side by side, in one invocation on one machine.

    pip install -r benchmarks/requirements.txt      # the Trainer's extra need (accelerate)
    python benchmarks/trainer_vs_bitfit.py          # both data sets, 20 steps, 2 rounds, bitfit's default flags
    python benchmarks/trainer_vs_bitfit.py --bitfit-args "--layout trainer"    # another bitfit layout

Two data sets: the built-in task's train split (26.5 tokens per example) and Alpaca-length records
generated in code (benchmarks/workload.py: 27-376 tokens, mean ~150, 13% cut at 256). On each, both
sides train the embedded SmolLM2-135M-Instruct with the same 155,520 added zero biases, on the same
examples in the same order, for the same steps of 1 x 8, with the same AdamW, lr and linear schedule:

    the HF Trainer recipe  AutoModelForCausalLM.from_pretrained + the recipe's freezing ("bias" in name) +
                       Trainer + DataCollatorForSeq2Seq, batch 1 x accumulation 8 (seed 001)
    bitfit             train.run() with train.py's DEFAULT flags (plus --bitfit-args, if given)

Each side runs in its own process, so its peak RSS is its own, in rounds of alternating order (recipe,
bitfit, bitfit, recipe, ...), so a machine that speeds up or slows down during the run hits both sides
alike; rates pool all rounds, peak RSS is the highest of any round. Reported per data set: tokens/s and
label tokens/s of the training loop, peak RSS, the per-step losses side by side, and the FLOP floor:
what these steps cost at least (4 x matmul parameters per token: forward, and backward to the
activations only, as frozen weights need no weight gradient; the LM head at label positions only;
attention scores left out), how long that takes at this machine's measured fp32 matmul peak, and so
each side's BitFit-MFU. Then one optimizer step over bloomz-1b1's 146 biases: flat buffer vs per tensor.
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contenders import (  # noqa: E402
    ACCUM,
    bitfit_side,
    floor_flops,
    matmul_peak,
    optimizer_steps,
    recipe_side,
)
from workload import write_data  # noqa: E402

from bitfit.model import pretrained  # noqa: E402

DATA = {"builtin": 5e-3, "alpaca": 1e-3}  # data set -> lr: the built-in task's default, the BitFit paper's


def pooled(runs: list[dict]) -> dict:
    """One side's rounds as one: times, tokens and label tokens summed, the highest peak RSS, the first
    round's losses (every round trains the same steps from the same seed)."""
    return {**runs[0], "seconds": sum(r["seconds"] for r in runs), "tokens": sum(r["tokens"] for r in runs),
            "label_tokens": sum(r["label_tokens"] for r in runs), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "rounds": len(runs)}


def report(name: str, recipe: dict, bitfit: dict, peak: float) -> dict:
    """Print one data set's comparison; return its summary numbers."""
    tokens, steps = bitfit["tokens"], len(bitfit["losses"]) * bitfit["rounds"]
    print(f"\n## {name}: {len(bitfit['losses'])} steps of 1 x {ACCUM}, {bitfit['rounds']} round(s) per side, "
          f"{tokens / steps / ACCUM:.0f} tokens per example; bitfit's layout: {bitfit['layout']}")
    print("| | HF Trainer recipe | bitfit | bitfit / recipe |\n| --- | --- | --- | --- |")
    for label, key in (("tokens/s", "tokens"), ("label tokens/s", "label_tokens")):
        a, b = recipe[key] / recipe["seconds"], bitfit[key] / bitfit["seconds"]
        print(f"| {label} | {a:,.0f} | {b:,.0f} | **{b / a:.2f}x** |")
    rss = bitfit["peak_rss_gb"] / recipe["peak_rss_gb"]
    print(f"| peak RSS | {recipe['peak_rss_gb']:.2f} GiB | {bitfit['peak_rss_gb']:.2f} GiB | **{rss:.2f}x** |")
    print(f"| training time | {recipe['seconds']:.1f} s | {bitfit['seconds']:.1f} s | |")
    floor = floor_flops(pretrained.resolve(pretrained.EMBEDDED), tokens, bitfit["label_tokens"])
    ideal = floor / peak
    print(f"| BitFit-MFU | {100 * ideal / recipe['seconds']:.1f}% | {100 * ideal / bitfit['seconds']:.1f}% | |")
    print(f"FLOP floor: {floor / 1e12:.2f} TFLOP for the {steps} steps ({tokens:,} tokens, {bitfit['label_tokens']:,} of them "
          f"labels) = {ideal:.1f} s at the measured peak of {peak / 1e9:.0f} GFLOP/s: an ideal run would be "
          f"{recipe['seconds'] / ideal:.2f}x the recipe's speed")
    gaps = [abs(a - b) / abs(a) for a, b in zip(recipe["losses"], bitfit["losses"])]
    print(f"per-step losses: largest relative difference {max(gaps):.2e}")
    for step, (a, b) in enumerate(zip(recipe["losses"], bitfit["losses"]), start=1):
        print(f"  step {step:>3}: recipe {a:.6f}  bitfit {b:.6f}")
    return {"speed": bitfit["tokens"] / bitfit["seconds"] / (recipe["tokens"] / recipe["seconds"]), "rss": rss,
            "mfu": ideal / bitfit["seconds"], "mfu_recipe": ideal / recipe["seconds"], "loss_gap": max(gaps)}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=20, help="optimizer steps each side trains, per data set and round")
    cli.add_argument("--rounds", type=int, default=2, help="runs of each side per data set, in alternating order")
    cli.add_argument("--data", choices=["both", *DATA], default="both", help="which data set(s)")
    cli.add_argument("--bitfit-args", default="", help="extra train.py flags for bitfit's side, e.g. '--layout trainer'")
    cli.add_argument("--side", choices=["recipe", "bitfit"], help="internal: run one side in this process")
    cli.add_argument("--jsonl", help="internal: the data file")
    cli.add_argument("--lr", type=float, help="internal: the learning rate")
    cli.add_argument("--out", help="internal: where one side writes its result")
    args = cli.parse_args()

    if args.side:  # one side, in its own process
        model_dir = pretrained.resolve(pretrained.EMBEDDED)
        result = (recipe_side(model_dir, args.jsonl, args.steps, args.lr) if args.side == "recipe"
                  else bitfit_side(model_dir, args.jsonl, args.steps, args.lr, shlex.split(args.bitfit_args)))
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bitfit-bench-"))
    pretrained.resolve(pretrained.EMBEDDED)  # build the cached model once, outside the timings
    paths = write_data(work)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bitfit flags: train.py defaults"
          + (f" + {args.bitfit_args}" if args.bitfit_args else ""))
    results, summary = {}, {}
    for name in DATA if args.data == "both" else [args.data]:
        runs: dict[str, list[dict]] = {"recipe": [], "bitfit": []}
        for round_ in range(args.rounds):
            for side in ("recipe", "bitfit") if round_ % 2 == 0 else ("bitfit", "recipe"):
                out = work / f"{name}-{side}-{round_}.json"
                log = work / f"{name}-{side}-{round_}.log"  # each side's own output, shown if it fails
                with open(log, "w") as sink:
                    done = subprocess.run([sys.executable, __file__, "--side", side, "--jsonl", str(paths[name]),
                                           "--lr", str(DATA[name]), "--steps", str(args.steps),
                                           f"--bitfit-args={args.bitfit_args}", "--out", str(out)], stdout=sink, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    sys.exit(f"the {side} side failed on {name}:\n{log.read_text()[-3000:]}")
                runs[side].append(json.loads(out.read_text()))
        for side, sides in runs.items():
            results[f"{name}/{side}"] = pooled(sides)
        recipe, bitfit = results[f"{name}/recipe"], results[f"{name}/bitfit"]
        assert recipe["trainable"] == bitfit["trainable"], "both sides must train the same biases"
        summary[name] = report(name, recipe, bitfit, matmul_peak(2048, torch.float32, repeats=5))

    bench = optimizer_steps()
    print(f"\noptimizer step over bloomz-1b1's {bench['tensors']} bias tensors ({bench['values']:,} values):")
    base = bench["seconds_per_step"]["146 tensors, foreach AdamW"]
    for name, seconds in bench["seconds_per_step"].items():
        print(f"  {name:<28} {1e6 * seconds:8.0f} us  ({base / seconds:.1f}x the per-tensor step)")
    (work / "results.json").write_text(json.dumps({"sides": results, "summary": summary, "optimizer": bench}, indent=2))
    print(f"\nall numbers: {work / 'results.json'}")


if __name__ == "__main__":
    main()
