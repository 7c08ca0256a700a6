"""On a GPU: the seeds' recipe against bitfit, on a bloomz-1b1-shaped model and on the embedded SmolLM2.

    python benchmarks/gpu.py                 # on CUDA: ~10 min on one H100 (needs accelerate for the recipe)
    python benchmarks/gpu.py --tiny --steps 3   # no GPU: the same script on the CPU with tiny configs (a test runs it)

Two models: one of bloomz-1b1's shape built from its config (random weights: speed and memory do not depend
on them; no download) and the embedded SmolLM2-135M-Instruct (real weights: the losses must agree). On each,
in a process of its own each, on the same Alpaca-length examples (benchmarks/workload.py: 20-370 tokens,
mean ~150, cut at 256), in the same order, for the same steps of 1 x 8 with the same lr and schedule:
    recipe   the seeds' HF Trainer + DataCollatorForSeq2Seq, batch 1 x accumulation 8, bf16, their
             freezing (`"bias" in name`), fp32 weights under bf16 autocast
    bitfit   `python train.py` with its defaults plus the GPU flags the README gives: --bf16 --bf16-weights
Per contender: tokens/s, label tokens/s, max allocated and max reserved memory, per-step losses side by
side, and BitFit-MFU: the least matmul work of these steps (4 x matmul parameters per token: forward, and
backward to the activations only; the LM head at label positions) against a large bf16 matmul measured
in the same run. Then the optimizer step over bloomz-1b1's 146 bias tensors (flat fused vs per-tensor
foreach and fused) and bloomz-1b1's memory table against the seeds' "under 6 GB".
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BloomConfig, LlamaConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bitfit import models  # noqa: E402
from bitfit.biases import add_missing_biases  # noqa: E402
from bitfit.data import encode, token_fields  # noqa: E402
from bitfit.layout import draw_steps  # noqa: E402
from workload import alpaca_like_records  # noqa: E402

ACCUM, SEED, LR, MAX_LEN = 8, 0, 1e-3, 256
BLOOMZ_1B1 = dict(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16)  # bigscience/bloomz-1b1's config.json
TINY_BLOOM = dict(vocab_size=49152, hidden_size=64, n_layer=2, n_head=4)  # --tiny: the CPU check of this script


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_models(folder: Path, tiny: bool) -> dict[str, str]:
    """Model folders: {'bloomz-1b1 shape': ..., 'SmolLM2-135M': ...}, with the embedded tokenizer in each."""
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(models.EMBEDDED))
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
        folders["SmolLM2-135M"] = Path(models.resolve(models.EMBEDDED))
    for name, path in folders.items():
        if path != Path(models.resolve(models.EMBEDDED)):
            tokenizer.save_pretrained(path)
    return {name: str(path) for name, path in folders.items()}


def ordered_rows(jsonl: str, tokenizer, steps: int) -> list[dict]:
    """The examples of the first `steps` steps, in the order bitfit draws them: the recipe gets exactly these."""
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    examples, _ = encode(records, tokenizer, MAX_LEN)
    order = [i for step in draw_steps(len(examples), ACCUM, 1, SEED, steps) for i in step]
    return [token_fields(examples[i]) for i in order]


def memory() -> dict:
    if device().type != "cuda":
        return {"max_allocated_gb": None, "max_reserved_gb": None}
    return {"max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def recipe(model_dir: str, jsonl: str, steps: int) -> dict:
    """The seeds' recipe: Trainer + DataCollatorForSeq2Seq, 1 x 8, bf16 on a GPU, their freezing."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    add_missing_biases(model)  # SmolLM2 has none: the same zero biases bitfit adds (BLOOM has its own)
    for name, param in model.named_parameters():
        param.requires_grad = "bias" in name
    rows = ordered_rows(jsonl, tokenizer, steps)
    cuda = device().type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUM,
                                 learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                                 max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], bf16=cuda,
                                 use_cpu=not cuda, train_sampling_strategy="sequential", dataloader_num_workers=0,
                                 seed=SEED, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "losses": losses, **counts(rows), **memory()}


def bitfit(model_dir: str, jsonl: str, steps: int) -> dict:
    """`python train.py` in this process: its defaults, plus --bf16 --bf16-weights on a GPU."""
    import train
    from bitfit.config import from_args

    gpu_flags = ["--bf16", "--bf16-weights"] if device().type == "cuda" else []
    with tempfile.TemporaryDirectory() as out:
        cfg = from_args(["--model", model_dir, "--data", jsonl, "--eval-data", "none", "--lr", str(LR), "--max-steps",
                         str(steps), "--seed", str(SEED), "--out-dir", out, "--log-every", str(10**6), *gpu_flags])
        results = train.run(cfg)
        losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = ordered_rows(jsonl, AutoTokenizer.from_pretrained(model_dir), steps)
    return {"seconds": results["train_seconds"], "losses": losses, "layout": results["layout"], **counts(rows), **memory()}


def counts(rows: list[dict]) -> dict:
    return {"tokens": sum(len(r["input_ids"]) for r in rows),
            "label_tokens": sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)}


def matmul_peak(size: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """This device's matmul FLOP/s at `dtype`, best of 5: the denominator of BitFit-MFU."""
    a, b = (torch.randn(size, size, device=device(), dtype=dtype) for _ in range(2))
    best = 0.0
    for _ in range(6):
        if device().type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device().type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def floor_flops(model_dir: str, tokens: int, label_tokens: int) -> float:
    """4 x the matmul parameters of the blocks per token, and the LM head at label positions only."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    blocks = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embeddings and p is not head)
    return 4 * (blocks * tokens + head.numel() * label_tokens)


def optimizer_step(repeats: int = 100) -> dict[str, float]:
    """Seconds per AdamW step over bloomz-1b1's 146 biases: one flat buffer vs the separate tensors."""
    with torch.device("meta"):
        shapes = [p.shape for n, p in AutoModelForCausalLM.from_config(BloomConfig(**BLOOMZ_1B1)).named_parameters()
                  if n.endswith(".bias")]
    tensors = [torch.nn.Parameter(torch.randn(shape, device=device())) for shape in shapes]
    for t in tensors:
        t.grad = torch.randn_like(t)
    flat = torch.nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]))
    flat.grad = torch.randn_like(flat)
    timings = {}
    for name, params, kwargs in (("flat buffer, fused", [flat], {"fused": True}),
                                 (f"{len(tensors)} tensors, foreach", tensors, {"foreach": True}),
                                 (f"{len(tensors)} tensors, fused", tensors, {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
        for _ in range(5):
            optimizer.step()
        if device().type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        if device().type == "cuda":
            torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) / repeats
    return timings


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
    print("| | seeds' recipe (HF Trainer) | bitfit | bitfit / recipe |\n|---|---:|---:|---:|")
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
    print("  activations: max allocated above, less the weights (the seeds: 'under 6 GB' in all, fp32 weights)")


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
        result = (recipe if args.side == "recipe" else bitfit)(args.model_dir, args.jsonl, args.steps)
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bitfit-gpu-"))
    name = torch.cuda.get_device_name() if device().type == "cuda" else "CPU (no GPU: the --tiny check)"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} steps per contender and model")
    jsonl = work / "alpaca.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(models.EMBEDDED))
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in alpaca_like_records(tokenizer, ACCUM * args.steps)))
    folders = build_models(work, args.tiny)
    peak = matmul_peak(256 if args.tiny else 8192, torch.bfloat16 if device().type == "cuda" else torch.float32)
    print(f"matmul peak measured here: {peak / 1e12:.1f} TFLOP/s ({'bf16' if device().type == 'cuda' else 'fp32'})")
    summary = {}
    for model_name, folder in folders.items():
        sides = {side: launch(side, folder, str(jsonl), args.steps, work) for side in ("recipe", "bitfit")}
        summary[model_name] = report(model_name, folder, sides, peak)
    print("\n## optimizer step over bloomz-1b1's biases")
    for label, seconds in optimizer_step().items():
        print(f"  {label:<24} {1e6 * seconds:9.1f} us")
    memory_table()
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nall numbers: {work / 'summary.json'}")


if __name__ == "__main__":
    main()
