"""On a GPU: the HF Trainer recipe against bitfit, on models of bloomz-1b1's and SmolLM2-135M's shapes.

    python benchmarks/gpu.py                                  # on CUDA: a few minutes on one H100/H200
    python benchmarks/gpu.py --tiny --steps 4 --warmup 1      # no GPU: the same script on the CPU, tiny configs (a test runs it)

Both models are built from their configs (random weights: speed and memory do not depend on them), with a
tokenizer trained here (benchmarks/workload.py): no download, no embedded wheel. On each, three sides, each
in a process of its own, on the same Alpaca-length examples (20-370 tokens, mean ~150, cut at 256), in the
same order, for the same steps of 1 x 8 with the same lr and schedule:
    recipe                    the HF Trainer recipe's Trainer + DataCollatorForSeq2Seq, batch 1 x accumulation 8,
                              bf16 autocast, fp32 weights, its freezing (`"bias" in name`)
    bitfit, CPU pass budget   `python train.py --bf16 --max-pass-tokens 256`: the CPU's passes (bf16 weights)
    bitfit, GPU defaults      `python train.py --bf16`: bf16 weights and the GPU's pass budget follow
Every step is timed from the end of the one before to its own end, the device's work done (the recipe's
through a Trainer callback, so its setup is left out); the first --warmup steps are left out. Per side:
tokens/s over the timed steps, the median step time and its spread (10th-90th percentile), max allocated
memory, and BitFit-MFU: the least matmul work of those steps (4 x matmul parameters per token: forward,
and backward to the activations only; the LM head at label positions) against the GPU's spec bf16 peak
and against a large bf16 matmul measured in the same run. The losses of every step, side by side, must
agree. The table is printed and written as JSON (on CUDA under benchmarks/results/, named for the GPU).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contenders import (  # noqa: E402
    ACCUM,
    BLOOMZ_1B1,
    bitfit_side,
    device,
    floor_flops,
    matmul_peak,
    optimizer_steps,
    recipe_side,
)
from workload import alpaca_like_records, word_tokenizer  # noqa: E402

LR = 1e-3  # the HF Trainer recipe's lr
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192)  # its config.json
TINY = {"bloomz-1b1 shape": BloomConfig(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4),
        "SmolLM2-135M shape": LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)}
FULL = {"bloomz-1b1 shape": BloomConfig(**BLOOMZ_1B1), "SmolLM2-135M shape": LlamaConfig(**SMOLLM2_135M)}
SIDES = {"recipe": None, "bitfit, CPU pass budget": ["--max-pass-tokens", "256"], "bitfit, GPU defaults": []}
# Dense bf16 tensor-core peaks from the vendor's data sheets, the most specific name first.
SPEC_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def slug(text: str) -> str:
    """`text` as a file name: letters, digits and dashes."""
    return re.sub(r"\W+", "-", text).strip("-")


def build_models(folder: Path, tiny: bool) -> dict[str, str]:
    """Model folders of both shapes, random weights, each with the benchmark's tokenizer."""
    tokenizer, folders = word_tokenizer(), {}
    for name, config in (TINY if tiny else FULL).items():
        torch.manual_seed(0)
        folders[name] = folder / slug(name)
        AutoModelForCausalLM.from_config(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return {name: str(path) for name, path in folders.items()}


def launch(side: str, model_dir: str, jsonl: str, steps: int, work: Path) -> dict:
    """One side in a process of its own: its imports, allocator and compiled kernels are its own."""
    out, log = (work / f"{slug(side)}-{Path(model_dir).name}.{kind}" for kind in ("json", "log"))
    with open(log, "w") as sink:
        done = subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--jsonl", jsonl,
                               "--steps", str(steps), "--out", str(out)], stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{side} on {model_dir} failed:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def timing(side: dict, warmup: int, model_dir: str, peaks: dict[str, float | None]) -> dict:
    """A side's measures over its timed steps (step_seconds starts at step 2, step_tokens at step 1)."""
    seconds = side["step_seconds"][max(0, warmup - 1):]
    tokens = side["step_tokens"][1:][max(0, warmup - 1):]
    label_tokens = side["label_tokens"] * sum(tokens) / side["tokens"]  # the timed steps' share
    work = floor_flops(model_dir, sum(tokens), label_tokens)
    quantiles = statistics.quantiles(seconds, n=10) if len(seconds) > 1 else [seconds[0]] * 9
    return {"timed_steps": len(seconds), "tokens_per_s": sum(tokens) / sum(seconds),
            "median_step_s": statistics.median(seconds), "p10_step_s": quantiles[0], "p90_step_s": quantiles[-1],
            "max_allocated_gb": side["max_allocated_gb"], "layout": side.get("layout"),
            "max_pass_tokens": side.get("max_pass_tokens"),
            **{f"mfu_{name}": work / sum(seconds) / peak if peak else None for name, peak in peaks.items()}}


def report(name: str, sides: dict[str, dict], measures: dict[str, dict], steps: int) -> dict:
    """The model's table, printed; and the losses of every bitfit side against the recipe's."""
    print(f"\n## {name}: {steps} steps of 1 x {ACCUM}, {measures['recipe']['timed_steps']} timed")
    print("| | " + " | ".join(sides) + " |\n|---|" + "---:|" * len(sides))
    rows = [("tokens/s", lambda m: f"{m['tokens_per_s']:,.0f}"),
            ("x the recipe", lambda m: f"**{m['tokens_per_s'] / measures['recipe']['tokens_per_s']:.2f}x**"),
            ("step time, median (p10-p90)", lambda m: f"{1e3 * m['median_step_s']:.0f} ms ({1e3 * m['p10_step_s']:.0f}-"
                                                       f"{1e3 * m['p90_step_s']:.0f})"),
            ("max allocated", lambda m: f"{m['max_allocated_gb']:.2f} GiB" if m["max_allocated_gb"] is not None else "-"),
            ("BitFit-MFU, of the spec peak", lambda m: f"{100 * m['mfu_spec']:.1f}%" if m["mfu_spec"] else "-"),
            ("BitFit-MFU, of the measured matmul", lambda m: f"{100 * m['mfu_measured']:.1f}%"),
            ("passes", lambda m: f"{m['layout']}, <= {m['max_pass_tokens']} tokens" if m["layout"] else "1 x 8, padded")]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(measures[side]) for side in sides) + " |")
    recipe = sides["recipe"]["losses"]
    gaps = {side: max(abs(x - y) / abs(x) for x, y in zip(recipe, sides[side]["losses"])) for side in sides if side != "recipe"}
    for side, gap in gaps.items():
        print(f"{side}: per-step losses against the recipe's, largest relative difference {gap:.2e}")
    return {side: {**measures[side], **({"loss_gap": gaps[side]} if side in gaps else {})} for side in sides}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=60, help="optimizer steps of each side on each model")
    cli.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    cli.add_argument("--tiny", action="store_true", help="tiny configs instead of the real sizes (the CPU check)")
    cli.add_argument("--out", default="", help="the JSON's path; '' = benchmarks/results/gpu-<GPU name>.json on CUDA, "
                                               "the run's temporary folder on the CPU")
    cli.add_argument("--side", choices=list(SIDES), help="internal: one side in this process")
    cli.add_argument("--model-dir", help="internal")
    cli.add_argument("--jsonl", help="internal")
    args = cli.parse_args()
    cuda = device().type == "cuda"
    if args.side:
        extra = SIDES[args.side]
        result = (recipe_side(args.model_dir, args.jsonl, args.steps, LR) if extra is None
                  else bitfit_side(args.model_dir, args.jsonl, args.steps, LR, (["--bf16"] if cuda else []) + extra))
        Path(args.out).write_text(json.dumps(result))
        return
    if args.steps <= args.warmup + 1:
        cli.error(f"--steps must be more than --warmup + 1 ({args.warmup + 1}): the first step is never timed")

    work = Path(tempfile.mkdtemp(prefix="bitfit-gpu-"))
    name = torch.cuda.get_device_name() if cuda else "CPU (no GPU: the --tiny check)"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} steps per side and model, the first "
          f"{args.warmup} not timed")
    jsonl = work / "alpaca.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in alpaca_like_records(word_tokenizer(), ACCUM * args.steps)))
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = next((peak for gpu, peak in SPEC_PEAK_BF16.items() if re.search(rf"\b{gpu}\b", name)), None)
    peaks = {"spec": spec if cuda else None,
             "measured": matmul_peak(256 if args.tiny else 8192, dtype, repeats=20)}
    spec_said = f"{peaks['spec'] / 1e12:.0f} TFLOP/s" if peaks["spec"] else "unknown"
    print(f"matmul peak measured here: {peaks['measured'] / 1e12:.1f} TFLOP/s ({str(dtype).removeprefix('torch.')}); "
          f"the GPU's spec bf16 peak: {spec_said}")
    table = {}
    for model_name, folder in build_models(work, args.tiny).items():
        sides = {side: launch(side, folder, str(jsonl), args.steps, work) for side in SIDES}
        measures = {side: timing(result, args.warmup, folder, peaks) for side, result in sides.items()}
        table[model_name] = report(model_name, sides, measures, args.steps)
    print("\n## optimizer step over bloomz-1b1's biases")
    for label, seconds in optimizer_steps(repeats=100)["seconds_per_step"].items():
        print(f"  {label:<24} {1e6 * seconds:9.1f} us")
    out = Path(args.out) if args.out else (REPO / "benchmarks" / "results" / f"gpu-{slug(name)}.json" if cuda
                                           else work / "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": name, "date": datetime.now().astimezone().isoformat(timespec="seconds"),
                               "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
                               "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny,
                               "peaks_tflops": {k: v / 1e12 if v else None for k, v in peaks.items()},
                               "models": table}, indent=2) + "\n")
    print(f"\nthe table as JSON: {out}")


if __name__ == "__main__":
    main()
