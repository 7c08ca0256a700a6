"""On a GPU: the HF Trainer recipe against bitfit, on a bloomz-1b1-shaped model and on the embedded SmolLM2.

    python benchmarks/gpu.py                 # on CUDA: ~10 min on one H100 (needs accelerate for the recipe)
    python benchmarks/gpu.py --tiny --steps 3   # no GPU: the same script on the CPU with tiny configs (a test runs it)

Two models: one of bloomz-1b1's shape built from its config (random weights: speed and memory do not depend
on them; no download) and the embedded SmolLM2-135M-Instruct (real weights: the losses must agree). On each,
in a process of its own each, on the same Alpaca-length examples (benchmarks/workload.py: 20-370 tokens,
mean ~150, cut at 256), in the same order, for the same steps of 1 x 8 with the same lr and schedule:
    recipe   the HF Trainer recipe's Trainer + DataCollatorForSeq2Seq, batch 1 x accumulation 8, bf16, their
             freezing (`"bias" in name`), fp32 weights under bf16 autocast
    bitfit   `python train.py` with its defaults plus the GPU flags the README gives: --bf16 --bf16-weights
Per contender: tokens/s, label tokens/s, max allocated and max reserved memory, per-step losses side by
side, and BitFit-MFU: the least matmul work of these steps (4 x matmul parameters per token: forward, and
backward to the activations only; the LM head at label positions) against a large bf16 matmul measured
in the same run. Then the optimizer step over bloomz-1b1's 146 bias tensors (flat fused vs per-tensor
foreach and fused) and bloomz-1b1's memory table against the HF Trainer recipe's "under 6 GB".
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, LlamaConfig

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
from workload import alpaca_like_records  # noqa: E402

from bitfit.model import pretrained  # noqa: E402

LR = 1e-3  # the HF Trainer recipe's lr
TINY_BLOOM = dict(vocab_size=49152, hidden_size=64, n_layer=2, n_head=4)  # --tiny: the CPU check of this script


def build_models(folder: Path, tiny: bool) -> dict[str, str]:
    """Model folders: {'bloomz-1b1 shape': ..., 'SmolLM2-135M': ...}, with the embedded tokenizer in each."""
    tokenizer = AutoTokenizer.from_pretrained(pretrained.resolve(pretrained.EMBEDDED))
    folders = {"bloomz-1b1 shape": folder / "bloom"}
    config = BloomConfig(**(TINY_BLOOM if tiny else BLOOMZ_1B1))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folders["bloomz-1b1 shape"])
    if tiny:  # a Llama of SmolLM2's family, small enough for a test
        folders["SmolLM2-135M"] = folder / "llama"
        AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2)).save_pretrained(folders["SmolLM2-135M"])
    else:
        folders["SmolLM2-135M"] = Path(pretrained.resolve(pretrained.EMBEDDED))
    for name, path in folders.items():
        if path != Path(pretrained.resolve(pretrained.EMBEDDED)):
            tokenizer.save_pretrained(path)
    return {name: str(path) for name, path in folders.items()}


def launch(side: str, model_dir: str, jsonl: str, steps: int, work: Path) -> dict:
    out = work / f"{side}-{Path(model_dir).name}.json"
    log = work / f"{side}-{Path(model_dir).name}.log"
    with open(log, "w") as sink:
        done = subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--jsonl", jsonl,
                               "--steps", str(steps), "--out", str(out)], stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{side} on {model_dir} failed:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def report(name: str, model_dir: str, sides: dict[str, dict], peak: float) -> dict:
    a, b = sides["recipe"], sides["bitfit"]
    floor = floor_flops(model_dir, b["tokens"], b["label_tokens"])
    print(f"\n## {name}: {len(b['losses'])} steps of 1 x {ACCUM}; bitfit's layout: {b['layout']}")
    print("| | HF Trainer recipe | bitfit | bitfit / recipe |\n|---|---:|---:|---:|")
    for label, key in (("tokens/s", "tokens"), ("label tokens/s", "label_tokens")):
        x, y = a[key] / a["seconds"], b[key] / b["seconds"]
        print(f"| {label} | {x:,.0f} | {y:,.0f} | **{y / x:.2f}x** |")
    for label, key in (("max allocated", "max_allocated_gb"), ("max reserved", "max_reserved_gb")):
        if a[key] is not None:
            print(f"| {label} | {a[key]:.2f} GiB | {b[key]:.2f} GiB | {b[key] / a[key]:.2f}x |")
    print(f"| BitFit-MFU | {100 * floor / peak / a['seconds']:.1f}% | {100 * floor / peak / b['seconds']:.1f}% | |")
    gaps = [abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"])]
    print(f"per-step losses (largest relative difference {max(gaps):.2e}):")
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"]), start=1):
        print(f"  step {step:>3}: recipe {x:.5f}  bitfit {y:.5f}")
    return {"speed": (b["tokens"] / b["seconds"]) / (a["tokens"] / a["seconds"]), "mfu": floor / peak / b["seconds"],
            "max_allocated_gb": b["max_allocated_gb"], "loss_gap": max(gaps)}


def memory_table() -> None:
    """bloomz-1b1's memory under bitfit's GPU flags, from its shapes (no weights needed)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(BloomConfig(**BLOOMZ_1B1))
    params = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    print(f"\n## bloomz-1b1 memory with --bf16 --bf16-weights ({params:,} parameters, {biases:,} biases)")
    print(f"  frozen weights, bf16:                       {2 * params / 2**30:.2f} GiB")
    print(f"  per bias: value, gradient, AdamW m and v, base copy (fp32): {20 * biases / 2**20:.1f} MiB")
    print("  activations: max allocated above, less the weights (the HF Trainer recipe: 'under 6 GB' in all, fp32 weights)")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=20, help="optimizer steps of each contender on each model")
    cli.add_argument("--tiny", action="store_true", help="tiny configs instead of the real sizes (the CPU check)")
    cli.add_argument("--side", choices=["recipe", "bitfit"], help="internal: one contender in this process")
    cli.add_argument("--model-dir", help="internal")
    cli.add_argument("--jsonl", help="internal")
    cli.add_argument("--out", help="internal")
    args = cli.parse_args()
    if args.side:
        gpu_flags = ["--bf16", "--bf16-weights"] if device().type == "cuda" else []  # the README's GPU flags
        result = (recipe_side(args.model_dir, args.jsonl, args.steps, LR) if args.side == "recipe"
                  else bitfit_side(args.model_dir, args.jsonl, args.steps, LR, gpu_flags))
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bitfit-gpu-"))
    name = torch.cuda.get_device_name() if device().type == "cuda" else "CPU (no GPU: the --tiny check)"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} steps per contender and model")
    jsonl = work / "alpaca.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(pretrained.resolve(pretrained.EMBEDDED))
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in alpaca_like_records(tokenizer, ACCUM * args.steps)))
    folders = build_models(work, args.tiny)
    peak = matmul_peak(256 if args.tiny else 8192, torch.bfloat16 if device().type == "cuda" else torch.float32, repeats=20)
    print(f"matmul peak measured here: {peak / 1e12:.1f} TFLOP/s ({'bf16' if device().type == 'cuda' else 'fp32'})")
    summary = {}
    for model_name, folder in folders.items():
        sides = {side: launch(side, folder, str(jsonl), args.steps, work) for side in ("recipe", "bitfit")}
        summary[model_name] = report(model_name, folder, sides, peak)
    print("\n## optimizer step over bloomz-1b1's biases")
    for label, seconds in optimizer_steps(repeats=100)["seconds_per_step"].items():
        print(f"  {label:<24} {1e6 * seconds:9.1f} us")
    memory_table()
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nall numbers: {work / 'summary.json'}")


if __name__ == "__main__":
    main()
