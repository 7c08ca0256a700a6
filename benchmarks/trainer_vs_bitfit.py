"""bitfit against the seeds' HF Trainer recipe, side by side, in one invocation on one machine.

    pip install -r benchmarks/requirements.txt      # the Trainer's extra need (accelerate)
    python benchmarks/trainer_vs_bitfit.py          # both data sets, 20 steps, 2 rounds, bitfit's default flags
    python benchmarks/trainer_vs_bitfit.py --bitfit-args "--layout seeds"    # another bitfit layout

Two data sets: the built-in task's train split (26.5 tokens per example) and Alpaca-length records
generated in code (benchmarks/workload.py: 27-376 tokens, mean ~150, 13% cut at 256). On each, both
sides train the embedded SmolLM2-135M-Instruct with the same 155,520 added zero biases, on the same
examples in the same order, for the same steps of 1 x 8, with the same AdamW, lr and linear schedule:

    the seeds' recipe  AutoModelForCausalLM.from_pretrained + the seeds' freezing ("bias" in name) +
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
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bitfit import models  # noqa: E402
from bitfit.loop import peak_memory_gb  # noqa: E402  (this process's own peak RSS)
from bitfit.data import encode, load_records, token_fields  # noqa: E402
from bitfit.layout import draw_steps  # noqa: E402
from workload import write_data  # noqa: E402

SEED, ACCUM = 0, 8
DATA = {"builtin": 5e-3, "alpaca": 1e-3}  # data set -> lr: the built-in task's default, the BitFit paper's


def ordered_examples(jsonl: str, tokenizer, steps: int) -> list[dict]:
    """The examples of bitfit's first `steps` steps, in its order: the Trainer reads them sequentially,
    so both sides see the same 8 examples in each optimizer step."""
    records, places = load_records(jsonl)
    examples, _ = encode(records, tokenizer, places=places)
    return [examples[i] for step in draw_steps(len(examples), ACCUM, 1, SEED)[:steps] for i in step]


def token_counts(rows: list[dict]) -> dict:
    return {"tokens": sum(len(r["input_ids"]) for r in rows),
            "label_tokens": sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)}


def side_seeds(jsonl: str, steps: int, lr: float) -> dict:
    """The seeds' recipe: from_pretrained, freeze all but biases, Trainer + DataCollatorForSeq2Seq, 1 x 8."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bitfit.biases import add_missing_biases

    folder = models.resolve(models.EMBEDDED)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, low_cpu_mem_usage=True)  # as seed 001 loads it
    add_missing_biases(model)  # SmolLM2 has no biases: the same zero biases bitfit adds
    for name, param in model.named_parameters():
        param.requires_grad = "bias" in name  # the seeds' BitFit freezing
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [token_fields(e) for e in ordered_examples(jsonl, tokenizer, steps)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUM,
                                 learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
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
    return {"seconds": seconds, "losses": losses, "peak_rss_gb": peak_memory_gb(torch.device("cpu")), "trainable": trainable,
            **token_counts(rows)}


def side_bitfit(jsonl: str, steps: int, lr: float, extra: str) -> dict:
    """`python train.py` with its default flags (plus `extra`), on the same data, steps and lr."""
    import train
    from bitfit.config import from_args

    with tempfile.TemporaryDirectory() as out:
        cfg = from_args(["--data", jsonl, "--eval-data", "none", "--lr", str(lr), "--max-steps", str(steps),
                         "--seed", str(SEED), "--out-dir", out, "--log-every", str(10**6), *shlex.split(extra)])
        results = train.run(cfg)
        losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = ordered_examples(jsonl, AutoTokenizer.from_pretrained(models.resolve(models.EMBEDDED)), steps)
    return {"seconds": results["train_seconds"], "losses": losses, "peak_rss_gb": peak_memory_gb(torch.device("cpu")),
            "trainable": results["trainable"], "layout": results["layout"], **token_counts(rows)}


def matmul_peak_flops(size: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """This machine's fp32 matmul throughput, the best of `trials`: the denominator of MFU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def floor_flops(tokens: int, label_tokens: int) -> float:
    """The least matmul work of BitFit on these tokens: 4 x matmul params x tokens (forward 2, backward to
    the activations 2; frozen weights need no weight gradient), the LM head at label positions only."""
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


def pooled(runs: list[dict]) -> dict:
    """One side's rounds as one: times, tokens and label tokens summed, the highest peak RSS, the first
    round's losses (every round trains the same steps from the same seed)."""
    return {**runs[0], "seconds": sum(r["seconds"] for r in runs), "tokens": sum(r["tokens"] for r in runs),
            "label_tokens": sum(r["label_tokens"] for r in runs), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "rounds": len(runs)}


def report(name: str, seeds: dict, bitfit: dict, peak: float) -> dict:
    """Print one data set's comparison; return its summary numbers."""
    tokens, steps = bitfit["tokens"], len(bitfit["losses"]) * bitfit["rounds"]
    print(f"\n## {name}: {len(bitfit['losses'])} steps of 1 x {ACCUM}, {bitfit['rounds']} round(s) per side, "
          f"{tokens / steps / ACCUM:.0f} tokens per example; bitfit's layout: {bitfit['layout']}")
    print("| | seeds' recipe (HF Trainer) | bitfit | bitfit / recipe |\n| --- | --- | --- | --- |")
    for label, key in (("tokens/s", "tokens"), ("label tokens/s", "label_tokens")):
        a, b = seeds[key] / seeds["seconds"], bitfit[key] / bitfit["seconds"]
        print(f"| {label} | {a:,.0f} | {b:,.0f} | **{b / a:.2f}x** |")
    rss = bitfit["peak_rss_gb"] / seeds["peak_rss_gb"]
    print(f"| peak RSS | {seeds['peak_rss_gb']:.2f} GiB | {bitfit['peak_rss_gb']:.2f} GiB | **{rss:.2f}x** |")
    print(f"| training time | {seeds['seconds']:.1f} s | {bitfit['seconds']:.1f} s | |")
    floor = floor_flops(tokens, bitfit["label_tokens"])
    ideal = floor / peak
    print(f"| BitFit-MFU | {100 * ideal / seeds['seconds']:.1f}% | {100 * ideal / bitfit['seconds']:.1f}% | |")
    print(f"FLOP floor: {floor / 1e12:.2f} TFLOP for the {steps} steps ({tokens:,} tokens, {bitfit['label_tokens']:,} of them "
          f"labels) = {ideal:.1f} s at the measured peak of {peak / 1e9:.0f} GFLOP/s: an ideal run would be "
          f"{seeds['seconds'] / ideal:.2f}x the recipe's speed")
    gaps = [abs(a - b) / abs(a) for a, b in zip(seeds["losses"], bitfit["losses"])]
    print(f"per-step losses: largest relative difference {max(gaps):.2e}")
    for step, (a, b) in enumerate(zip(seeds["losses"], bitfit["losses"]), start=1):
        print(f"  step {step:>3}: recipe {a:.6f}  bitfit {b:.6f}")
    return {"speed": bitfit["tokens"] / bitfit["seconds"] / (seeds["tokens"] / seeds["seconds"]), "rss": rss,
            "mfu": ideal / bitfit["seconds"], "mfu_recipe": ideal / seeds["seconds"], "loss_gap": max(gaps)}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=20, help="optimizer steps each side trains, per data set and round")
    cli.add_argument("--rounds", type=int, default=2, help="runs of each side per data set, in alternating order")
    cli.add_argument("--data", choices=["both", *DATA], default="both", help="which data set(s)")
    cli.add_argument("--bitfit-args", default="", help="extra train.py flags for bitfit's side, e.g. '--layout seeds'")
    cli.add_argument("--side", choices=["seeds", "bitfit"], help="internal: run one side in this process")
    cli.add_argument("--jsonl", help="internal: the data file")
    cli.add_argument("--lr", type=float, help="internal: the learning rate")
    cli.add_argument("--out", help="internal: where one side writes its result")
    args = cli.parse_args()

    if args.side:  # one side, in its own process
        result = (side_seeds(args.jsonl, args.steps, args.lr) if args.side == "seeds"
                  else side_bitfit(args.jsonl, args.steps, args.lr, args.bitfit_args))
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bitfit-bench-"))
    models.resolve(models.EMBEDDED)  # build the cached model once, outside the timings
    paths = write_data(work)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bitfit flags: train.py defaults"
          + (f" + {args.bitfit_args}" if args.bitfit_args else ""))
    results, summary = {}, {}
    for name in DATA if args.data == "both" else [args.data]:
        runs: dict[str, list[dict]] = {"seeds": [], "bitfit": []}
        for round_ in range(args.rounds):
            for side in ("seeds", "bitfit") if round_ % 2 == 0 else ("bitfit", "seeds"):
                out = work / f"{name}-{side}-{round_}.json"
                log = work / f"{name}-{side}-{round_}.log"  # each side's own output, shown if it fails
                with open(log, "w") as sink:
                    done = subprocess.run([sys.executable, __file__, "--side", side, "--jsonl", str(paths[name]),
                                           "--lr", str(DATA[name]), "--steps", str(args.steps), "--bitfit-args",
                                           args.bitfit_args, "--out", str(out)], stdout=sink, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    sys.exit(f"the {side} side failed on {name}:\n{log.read_text()[-3000:]}")
                runs[side].append(json.loads(out.read_text()))
        for side, sides in runs.items():
            results[f"{name}/{side}"] = pooled(sides)
        seeds, bitfit = results[f"{name}/seeds"], results[f"{name}/bitfit"]
        assert seeds["trainable"] == bitfit["trainable"], "both sides must train the same biases"
        summary[name] = report(name, seeds, bitfit, matmul_peak_flops())

    bench = optimizer_step_benchmark()
    print(f"\noptimizer step over bloomz-1b1's {bench['tensors']} bias tensors ({bench['values']:,} values):")
    base = bench["seconds_per_step"]["146 tensors, foreach AdamW"]
    for name, seconds in bench["seconds_per_step"].items():
        print(f"  {name:<28} {1e6 * seconds:8.0f} us  ({base / seconds:.1f}x the per-tensor step)")
    (work / "results.json").write_text(json.dumps({"sides": results, "summary": summary, "optimizer": bench}, indent=2))
    print(f"\nall numbers: {work / 'results.json'}")


if __name__ == "__main__":
    main()
