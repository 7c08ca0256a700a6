"""bitfit against the seeds' HF Trainer recipe, side by side, in one invocation on one machine.

    pip install -r benchmarks/requirements.txt      # the Trainer's extra need (accelerate)
    python benchmarks/trainer_vs_bitfit.py          # SmolLM2-135M (embedded) with added biases, 20 steps

Both sides train the same model (the embedded SmolLM2-135M-Instruct with zero biases added, the same
155,520 trainable biases), on the same Alpaca JSONL (the built-in task's train split, written out), in
the same example order, for the same optimizer steps, with the same AdamW, lr and linear schedule, at
batch 1 x accumulation 8. Each side runs in its own process so its peak RSS is its own. Reported:
tokens/s and label tokens/s of the training loop, peak memory, the per-step losses side by side, and
bitfit's BitFit-MFU against this device's measured fp32 matmul peak. Then a micro-benchmark of one
optimizer step over a bloomz-1b1's 146 bias tensors: AdamW on the flat buffer vs per-tensor foreach.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bitfit import models  # noqa: E402
from bitfit.biases import add_missing_biases, select_biases  # noqa: E402
from bitfit.data import encode, load_records  # noqa: E402
from bitfit.loop import make_windows  # noqa: E402

LR, SEED, ACCUM = 5e-3, 0, 8


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_model():
    model, tokenizer = models.load(models.EMBEDDED, torch.device("cpu"))
    add_missing_biases(model)
    select_biases(model)  # freeze everything but the biases, as bitfit does
    return model, tokenizer


def ordered_examples(jsonl: str, tokenizer, steps: int) -> list[dict]:
    """The examples in bitfit's training order (seeded windows), cut to `steps` windows: the Trainer
    reads them sequentially, so both sides see the same example in the same micro-batch."""
    examples, _ = encode(load_records(jsonl), tokenizer)
    windows = make_windows(len(examples), 1, ACCUM, 1, SEED)[:steps]
    return [examples[i] for window in windows for micro in window for i in micro]


def side_hf(jsonl: str, steps: int) -> dict:
    """The seeds' recipe: Trainer + DataCollatorForSeq2Seq, batch 1 x accumulation 8."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = load_model()
    rows = [{k: v for k, v in e.items() if k != "row"} for e in ordered_examples(jsonl, tokenizer, steps)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUM,
                                 learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                                 adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                                 max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 train_sampling_strategy="sequential", dataloader_num_workers=0, seed=SEED,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "losses": losses, "peak_rss_gb": peak_rss_gb(), **token_counts(rows)}


def side_bitfit(jsonl: str, steps: int, pass_size: int, pack: bool) -> dict:
    import train
    from bitfit.config import TrainConfig

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=jsonl, eval_data="none", lr=LR, max_steps=steps, seed=SEED, pass_size=pass_size,
                          pack=pack, out_dir=out, log_every=10**6)
        results = train.run(cfg)
        losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(models.EMBEDDED))  # the model itself is not needed again
    rows = ordered_examples(jsonl, tokenizer, steps)
    return {"seconds": results["train_seconds"], "losses": losses, "peak_rss_gb": peak_rss_gb(), **token_counts(rows)}


def token_counts(rows: list[dict]) -> dict:
    return {"tokens": sum(len(r["input_ids"]) for r in rows),
            "label_tokens": sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)}


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """This device's fp32 matmul throughput, measured: the denominator of MFU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def bitfit_flops(tokens: int, label_tokens: int) -> float:
    """4 x matmul params x tokens: forward (2) + backward to the activations (2); frozen weights need no
    weight gradient. The LM head counts only at the label positions, where bitfit computes it."""
    config = AutoConfig.from_pretrained(models.resolve(models.EMBEDDED))
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    block_params = layers * (h * h * 2 + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    return 4 * (block_params * tokens + h * config.vocab_size * label_tokens)


def optimizer_step_benchmark(repeats: int = 200) -> dict:
    """One AdamW step over bloomz-1b1's 146 bias tensors (408,576 values): flat vs per-tensor foreach."""
    from transformers import AutoModelForCausalLM, BloomConfig

    with torch.device("meta"):
        shapes = [p.shape for n, p in AutoModelForCausalLM.from_config(
            BloomConfig(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16)).named_parameters() if n.endswith(".bias")]
    tensors = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    for t in tensors:
        t.grad = torch.randn(t.shape)
    flat = torch.nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]))
    flat.grad = torch.randn(flat.shape)
    timings = {}
    for name, params, kwargs in (("flat buffer, fused AdamW", [flat], {"fused": True}),
                                 ("flat buffer, foreach AdamW", [flat], {"foreach": True}),
                                 ("146 tensors, foreach AdamW", tensors, {"foreach": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
        for _ in range(10):
            optimizer.step()
        start = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        timings[name] = (time.perf_counter() - start) / repeats
    return {"tensors": len(tensors), "values": flat.numel(), "seconds_per_step": timings}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=20, help="optimizer steps each side trains")
    cli.add_argument("--pass-size", type=int, default=8, help="bitfit's examples per forward pass (0 = 1, the seeds')")
    cli.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                     help="bitfit lays each pass's examples end to end in one row (--no-pack: padded rows)")
    cli.add_argument("--side", choices=["hf", "bitfit"], help="internal: run one side in this process")
    cli.add_argument("--jsonl", help="internal: the shared data file")
    cli.add_argument("--out", help="internal: where one side writes its result")
    args = cli.parse_args()

    if args.side:  # one side, in its own process
        result = side_hf(args.jsonl, args.steps) if args.side == "hf" else side_bitfit(args.jsonl, args.steps, args.pass_size, args.pack)
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bitfit-bench-"))
    jsonl = work / "alpaca.jsonl"
    records = load_records("builtin", "train")
    jsonl.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in records))
    models.resolve(models.EMBEDDED)  # build the cached model once, outside the timings

    results = {}
    for side in ("hf", "bitfit"):
        out = work / f"{side}.json"
        subprocess.run([sys.executable, __file__, "--side", side, "--jsonl", str(jsonl), "--steps", str(args.steps),
                        "--pass-size", str(args.pass_size), "--pack" if args.pack else "--no-pack", "--out", str(out)], check=True)
        results[side] = json.loads(out.read_text())

    peak = matmul_peak_flops()
    hf, bf = results["hf"], results["bitfit"]
    mfu = bitfit_flops(bf["tokens"], bf["label_tokens"]) / bf["seconds"] / peak
    print(f"\nmachine: {torch.get_num_threads()} torch threads, torch {torch.__version__}; {args.steps} steps of "
          f"1 x {ACCUM}; bitfit: passes of {args.pass_size or 1}, {'packed' if args.pack else 'padded'}")
    print("| | HF Trainer recipe | bitfit | bitfit / Trainer |\n| --- | --- | --- | --- |")
    for label, key, fmt in (("tokens/s", "tokens", "{:,.0f}"), ("label tokens/s", "label_tokens", "{:,.0f}")):
        a, b = hf[key] / hf["seconds"], bf[key] / bf["seconds"]
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |")
    print(f"| peak RSS | {hf['peak_rss_gb']:.2f} GiB | {bf['peak_rss_gb']:.2f} GiB | {bf['peak_rss_gb'] / hf['peak_rss_gb']:.2f}x |")
    print(f"| training time | {hf['seconds']:.1f} s | {bf['seconds']:.1f} s | |")
    print(f"\nBitFit-MFU of bitfit: {100 * mfu:.1f}% of a measured fp32 matmul peak of {peak / 1e9:.0f} GFLOP/s")
    worst = max(abs(a - b) / abs(a) for a, b in zip(hf["losses"], bf["losses"]))
    print(f"per-step losses (largest relative difference {worst:.2e}):")
    for step, (a, b) in enumerate(zip(hf["losses"], bf["losses"]), start=1):
        print(f"  step {step:>3}: Trainer {a:.6f}  bitfit {b:.6f}")
    bench = optimizer_step_benchmark()
    print(f"\noptimizer step over bloomz-1b1's {bench['tensors']} bias tensors ({bench['values']:,} values):")
    base = bench["seconds_per_step"]["146 tensors, foreach AdamW"]
    for name, seconds in bench["seconds_per_step"].items():
        print(f"  {name:<28} {1e6 * seconds:8.0f} us  ({base / seconds:.1f}x the per-tensor step)")
    (work / "results.json").write_text(json.dumps({**results, "matmul_peak_flops": peak, "mfu": mfu,
                                                   "optimizer": bench}, indent=2))
    print(f"\nall numbers: {work / 'results.json'}")


if __name__ == "__main__":
    main()
