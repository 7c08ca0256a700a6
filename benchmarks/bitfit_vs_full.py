"""BitFit against full fine-tuning, measured: what each trains, costs, learns and forgets.

    python benchmarks/bitfit_vs_full.py              # the embedded model, the built-in task: ~15 min on 2 CPU cores
    python benchmarks/bitfit_vs_full.py --steps 20 --full-lrs 3e-5

Four methods, each in a process of its own (so each one's peak memory is its own), on the same data,
order, steps, layout and lr schedule as `python train.py` (its defaults: the built-in task, 8 examples a
step, linear decay, gradient clipping at 1.0):
    frozen        no training: the base model, evaluated
    bitfit        `python train.py` as it is: every bias trains (zero biases added to SmolLM2's linear layers)
    reduced       `python train.py --biases reduced`: the query and first-MLP biases only (the paper's variant)
    full          every weight trains with AdamW (no biases added), at the best of --full-lrs (the lr that
                  suits all weights is far below the one that suits biases)
Per method: trainable parameters, peak memory (the process's peak RSS), seconds per optimizer step,
held-out exact match and loss on the built-in task (heldout[:100]), the size of what must be saved to
keep the result, and FORGETTING: on a task that is not in the training mix and that the base knows
(the capitals of 40 countries, asked in the model's own chat template, not the trained one), the share
of answers that name the right city and the loss of the city's name, before and after training.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitfit.core.loss import label_tokens, loss_sum  # noqa: E402
from bitfit.core.step import lr_factor  # noqa: E402
from bitfit.data import layout, packing  # noqa: E402
from bitfit.data.collate import pad_batch, pad_id  # noqa: E402
from bitfit.data.examples import encode, load_examples, questions  # noqa: E402
from bitfit.model import pretrained
from bitfit.model.delta import apply_delta  # noqa: E402
from bitfit.run.config import TrainConfig, from_args  # noqa: E402
from bitfit.run.evaluate import answers, exact_match, heldout_loss  # noqa: E402
from bitfit.run.report import peak_memory_gb

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Thailand": "Bangkok", "South Korea": "Seoul", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City", "Cuba": "Havana",
    "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi", "Iran": "Tehran", "Iraq": "Baghdad",
    "Turkey": "Ankara", "Ukraine": "Kyiv", "Czech Republic": "Prague", "Switzerland": "Bern",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
}
FORGETTING = [{"instruction": "What is the capital city of this country? Answer with the city's name only.",
               "input": country, "output": city} for country, city in CAPITALS.items()]
METHODS = ("frozen", "bitfit", "reduced", "full")


def evaluate(model, tokenizer, cfg: TrainConfig) -> dict:
    """Held-out exact match and loss on the built-in task; and what the model still knows of the task it
    must not forget, asked in the model's own chat template (in which the base answers "The capital city
    of Japan is Tokyo."): the share of answers whose first line names the right city, and the loss of
    the bare city name as the answer."""
    pad = partial(pad_batch, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)
    device = torch.device("cpu")
    records, examples, _ = load_examples("builtin", "heldout[:100]", tokenizer, cfg.max_len, cfg.template)
    heldout = {"exact_match": exact_match(model, tokenizer, records, cfg.template, device, False, 16)["exact_match"],
               "loss": heldout_loss(model, examples, pad, device, False)}
    asked = questions(FORGETTING, tokenizer, "chat")
    said = answers(model, tokenizer, [ids for ids, _, _ in asked], device, False, 16)
    knows = [row["output"].lower() in (text.strip().splitlines() or [""])[0].lower() for row, text in zip(FORGETTING, said)]
    forget_examples, _ = encode(FORGETTING, tokenizer, cfg.max_len, "chat")
    return {"heldout": heldout, "forgetting": {"knows": sum(knows) / len(knows),
                                               "loss": heldout_loss(model, forget_examples, pad, device, False),
                                               "samples": said[:3]}}


def run_frozen(cfg: TrainConfig) -> dict:
    model, tokenizer = pretrained.load(cfg.model, torch.device("cpu"))
    return {"trainable": 0, "steps": 0, "seconds_per_step": None, "saved_bytes": 0,
            "after": evaluate(model, tokenizer, cfg), "peak_rss_gb": peak_memory_gb(torch.device("cpu"))}


def run_bitfit(cfg_args: list[str], steps: int) -> dict:
    """`python train.py` itself (in this process), then its delta applied to a fresh base for the evaluations."""
    import train

    with tempfile.TemporaryDirectory() as out:
        cfg = from_args([*cfg_args, "--eval-data", "none", "--out-dir", out, "--log-every", str(10**6),
                         *(["--max-steps", str(steps)] if steps else [])])
        results = train.run(cfg)
        peak = peak_memory_gb(torch.device("cpu"))  # training's peak, before a second model is loaded
        model, tokenizer = pretrained.load(cfg.model, torch.device("cpu"))
        apply_delta(model, str(Path(out) / "delta.safetensors"))
        saved = (Path(out) / "delta.safetensors").stat().st_size
    return {"trainable": results["trainable"], "steps": results["steps"],
            "seconds_per_step": results["train_seconds"] / results["steps"], "saved_bytes": saved,
            "after": evaluate(model, tokenizer, cfg), "peak_rss_gb": peak}


def run_full(cfg: TrainConfig, lr: float, steps: int) -> dict:
    """Every weight trains: the same data, order, layout, loss and schedule as train.py, AdamW over all."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = pretrained.load(cfg.model, torch.device("cpu"))
    _, examples, _ = load_examples(cfg.data, cfg.split, tokenizer, cfg.max_len, cfg.template)
    pad = partial(pad_batch, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)
    packed = packing.enable(model, examples, pad, cfg.max_pass_tokens) is None
    kind, collate = ("packed", packing.pack_batch) if packed else ("padded", pad)
    lengths = [len(e["input_ids"]) for e in examples]
    drawn = layout.draw_steps(len(examples), cfg.batch_size * cfg.grad_accum, cfg.epochs, cfg.seed, steps)
    plan = layout.plan(drawn, lengths, kind, cfg.max_pass_tokens, cfg.batch_size)

    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=len(plan), warmup=cfg.warmup_steps,
                                                                     schedule=cfg.schedule))
    model.train()
    losses, start = [], time.perf_counter()
    for passes in plan:  # the step of train.py's train_step, over every weight instead of the flat biases
        batches = [collate([examples[i] for i in indices]) for indices in passes]
        summed = 0.0
        for batch in batches:
            loss = loss_sum(model, batch)
            loss.backward()
            summed += loss.item()
        n_labels = sum(label_tokens(batch) for batch in batches)
        for param in params:
            param.grad.div_(n_labels)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # kept allocated, as a training loop that reuses them does
        scheduler.step()
        losses.append(summed / n_labels)
    seconds = time.perf_counter() - start
    if not all(math.isfinite(loss) for loss in losses):
        raise SystemExit(f"full fine-tuning at lr {lr:g} diverged: losses {losses[:5]}...")
    peak = peak_memory_gb(torch.device("cpu"))
    return {"trainable": sum(p.numel() for p in params), "steps": len(plan), "seconds_per_step": seconds / len(plan),
            "saved_bytes": sum(p.numel() * p.element_size() for p in params), "lr": lr,
            "after": evaluate(model, tokenizer, cfg), "peak_rss_gb": peak}


def one_method(method: str, lr: float | None, steps: int) -> dict:
    cfg = TrainConfig()  # train.py's defaults: one source of truth for data, layout and schedule
    if method == "frozen":
        return run_frozen(cfg)
    if method == "full":
        return run_full(cfg, lr, steps)
    return run_bitfit(["--biases", "all" if method == "bitfit" else "reduced"], steps)


def launch(method: str, lr: float | None, steps: int, work: Path) -> dict:
    out = work / f"{method}-{lr}.json"
    command = [sys.executable, __file__, "--method", method, "--steps", str(steps), "--out", str(out)]
    done = subprocess.run(command + (["--lr", str(lr)] if lr else []), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def table(results: dict[str, dict], before: dict) -> str:
    b = before["forgetting"]
    lines = [
        "| method | trainable parameters | peak RSS | s / step | held-out exact match | held-out loss | "
        f"capitals known (base {100 * b['knows']:.0f}%) | capitals loss (base {b['loss']:.3f}) | saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        name = f"full (lr {r['lr']:g})" if method == "full" else method
        step = "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
        saved = "nothing" if not r["saved_bytes"] else (f"{r['saved_bytes'] / 2**20:,.0f} MiB" if r["saved_bytes"] > 2**20
                                                         else f"{r['saved_bytes'] / 2**10:,.0f} KiB")
        h, f = r["after"]["heldout"], r["after"]["forgetting"]
        lines.append(f"| {name} | {r['trainable']:,} | {r['peak_rss_gb']:.2f} GiB | {step} | {100 * h['exact_match']:.0f}% | "
                     f"{h['loss']:.3f} | {100 * f['knows']:.0f}% | {f['loss']:.3f} | {saved} |")
    return "\n".join(lines)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=0, help="optimizer steps of each method (0 = train.py's default run)")
    cli.add_argument("--full-lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4],
                     help="the lrs full fine-tuning tries; the table shows the best by held-out exact match, then loss")
    cli.add_argument("--method", choices=METHODS, help="internal: run one method in this process")
    cli.add_argument("--lr", type=float, help="internal: full fine-tuning's lr")
    cli.add_argument("--out", help="internal: where one method writes its result")
    args = cli.parse_args()
    if args.method:
        Path(args.out).write_text(json.dumps(one_method(args.method, args.lr, args.steps)))
        return

    pretrained.resolve(pretrained.EMBEDDED)  # build the cached model once, outside every measurement
    work = Path(tempfile.mkdtemp(prefix="bitfit-vs-full-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; steps: "
          f"{args.steps or 'train.py default'}; each method in its own process", flush=True)
    results = {"frozen": launch("frozen", None, args.steps, work)}
    for method in ("bitfit", "reduced"):
        results[method] = launch(method, None, args.steps, work)
        print(f"{method}: {results[method]['after']}", flush=True)
    tried = [launch("full", lr, args.steps, work) for lr in args.full_lrs]
    for r in tried:
        print(f"full at lr {r['lr']:g}: {r['after']}", flush=True)
    results["full"] = max(tried, key=lambda r: (r["after"]["heldout"]["exact_match"], -r["after"]["heldout"]["loss"]))
    print()
    print(table(results, results["frozen"]["after"]))
    (work / "results.json").write_text(json.dumps({"methods": results, "full_tried": tried}, indent=2))
    print(f"\nall numbers: {work / 'results.json'}")


if __name__ == "__main__":
    main()
