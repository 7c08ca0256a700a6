"""Fine-tune only the biases of a pretrained causal LM (BitFit), with a hand-written loop.

    python train.py                       # offline: SmolLM2-135M-Instruct on the built-in task, ~4 min on a CPU
    python train.py --model bigscience/bloomz-1b1 --data yahma/alpaca-cleaned --split "train[:1000]"
    python train.py --help                # every flag, with its default

Reads top to bottom: config -> device -> model -> biases -> data -> optimizer -> evaluate -> train ->
evaluate -> save. What each step does lives in bitfit/; this file is the order of things.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch

from bitfit import distributed, models
from bitfit.attention import use_per_example_attention
from bitfit.biases import add_missing_biases, count_trainable, describe, select_biases
from bitfit.checkpoint import latest_checkpoint, load_checkpoint
from bitfit.collate import pack_batch, pad_batch, pad_id
from bitfit.config import TrainConfig, from_args
from bitfit.data import encode, load_records
from bitfit.delta import save_delta
from bitfit.errors import BitfitError, Interrupted, NonFiniteError
from bitfit.evaluate import exact_match, heldout_loss
from bitfit.flat import FlatBiases
from bitfit.interrupt import graceful_stop
from bitfit.loop import fit, lr_factor, make_windows, packing_gap, regroup

# Packed and padded losses differ by float rounding: 1e-7 (fp32, SmolLM2 and a tiny Llama), 2e-5 (a tiny Llama
# in bf16). Examples that see each other differ by far more: 0.3 on SmolLM2 with one unbroken position run.
PACKING_TOLERANCE = 1e-3


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto': this process's GPU (its torchrun local rank) if there is CUDA, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BitfitError(f"--device {name}: this machine has no CUDA device")
    return device


def evaluate(model, tokenizer, records, examples, collate, cfg: TrainConfig, device) -> dict:
    """Held-out loss and exact match, timed."""
    start = time.perf_counter()
    loss = heldout_loss(model, examples, collate, device, cfg.bf16)
    result = exact_match(model, tokenizer, records, cfg.template, device, cfg.bf16, cfg.max_new_tokens)
    return {"loss": loss, **result, "seconds": time.perf_counter() - start}


def save_loss_curve(records: list[dict], path: Path) -> bool:
    """A PNG of the loss per optimizer step, when matplotlib is installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records])
    axes.set(xlabel="optimizer step", ylabel="training loss (per label token)", title="bitfit")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def resumed_config(given: TrainConfig) -> TrainConfig:
    """The config an interrupted run was started with, to continue it exactly; says which flags it ignores."""
    run_dir = given.resume
    ignored = [f.name for f in dataclasses.fields(TrainConfig)
               if getattr(given, f.name) != getattr(TrainConfig(resume=run_dir), f.name)]
    if ignored:
        print(f"--resume continues with the run's own config; ignoring {', '.join('--' + n.replace('_', '-') for n in ignored)}")
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise BitfitError(f"--resume {run_dir}: no config.json there, so no bitfit run to resume")
    saved = TrainConfig.from_dict(json.loads(path.read_text()))
    return dataclasses.replace(saved, resume=run_dir, out_dir=run_dir)


def prepare_out_dir(cfg: TrainConfig, write: bool = True) -> Path:
    """The run's folder, refusing to mix two runs in one, with the resolved config saved in it.

    Every rank checks (so all refuse together); only the one that `write`s changes anything."""
    out_dir = Path(cfg.out_dir)
    if (out_dir / "delta.safetensors").exists() and not cfg.overwrite:
        raise BitfitError(f"{out_dir} already holds a finished run; pick another --out-dir or pass --overwrite")
    if not cfg.resume and latest_checkpoint(out_dir) and not cfg.overwrite:
        raise BitfitError(f"{out_dir} holds an interrupted run; continue it with: python train.py --resume {out_dir} "
                          "(or pass --overwrite to start over)")
    if not write:
        return out_dir
    if cfg.overwrite and not cfg.resume:  # nothing of the old run may pass for part of the new one
        for name in ("delta.safetensors", "results.json", "eval_before.json", "metrics.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json() + "\n")
    except OSError as error:
        raise BitfitError(f"cannot write to the output directory {out_dir}: {error.strerror}") from None
    return out_dir


def run(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    rank, world, local_rank = distributed.init()  # (0, 1, 0) unless launched by torchrun
    main_rank = rank == 0
    log = print if main_rank else (lambda *args, **kwargs: None)  # rank 0 speaks for all
    if cfg.resume:
        cfg = resumed_config(cfg)
    cfg = dataclasses.replace(cfg, out_dir=distributed.share(cfg.out_dir or time.strftime("runs/%Y%m%d-%H%M%S")))
    out_dir = prepare_out_dir(cfg, write=main_rank)
    distributed.barrier()
    log("config:", cfg.to_json())

    # --- device, precision, seeds -------------------------------------------------------------------
    device = pick_device(cfg.device, local_rank)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
    weights_dtype = torch.bfloat16 if cfg.bf16_weights else torch.float32
    log(f"device: {device} | frozen weights {weights_dtype} | biases and optimizer state float32 | "
          f"bf16 autocast {'on' if cfg.bf16 else 'off'}")

    # --- model and biases ---------------------------------------------------------------------------
    model, tokenizer = models.load(cfg.model, device, weights_dtype, cfg.trust_remote_code)
    added = add_missing_biases(model) if cfg.add_biases else []
    if added:
        log(f"added {len(added)} zero biases to bias-free linear layers inside the blocks")
    selection = select_biases(model, cfg.biases)
    flat = FlatBiases(model, selection)  # after the model is on its device and in its dtype
    trainable, total = count_trainable(model, selection)
    log(describe(trainable, total))
    if flat.mask is not None and cfg.weight_decay > 0:
        raise BitfitError("--weight-decay would shrink the frozen key/value entries of fused q/k/v biases under "
                          "--biases reduced; use --weight-decay 0 (the BitFit paper's setting)")

    # --- data ---------------------------------------------------------------------------------------
    pad = partial(pad_batch, pad_token_id=pad_id(tokenizer), padding_side=tokenizer.padding_side)
    collate = pack_batch if cfg.pack else pad
    records = load_records(cfg.data, cfg.split)
    if not records:
        raise BitfitError(f"{cfg.data} {cfg.split} holds no records")
    examples, dropped = encode(records, tokenizer, cfg.max_len, cfg.template)
    if not examples:
        raise BitfitError(f"no usable examples in {cfg.data} {cfg.split}: {dropped} dropped because max_len "
                          f"{cfg.max_len} cut away their whole response")
    if cfg.pack:
        if use_per_example_attention(model):
            log("attention: each packed example computed on its own (bitfit.attention), not as a masked square")
        # trust, but verify: a model that lets packed examples see each other would train on garbage
        gap = packing_gap(model, examples[:8], pad)
        if gap > PACKING_TOLERANCE:
            raise BitfitError(f"--pack: this model's attention does not keep packed examples apart (their loss differs "
                              f"from the padded one by {gap:.1e}, relative); leave --pack off")
        log(f"packing checked: {min(8, len(examples))} examples packed in one row and padded give the same loss "
            f"to {gap:.1e} (relative)")
    windows = make_windows(len(examples), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.seed)
    if cfg.max_steps:
        windows = windows[: cfg.max_steps]
    if cfg.pass_size:
        lengths = [len(e["input_ids"]) for e in examples]
        windows = [regroup(window, cfg.pass_size, lengths) for window in windows]  # before sharding: ranks split passes
    if world > 1:  # each rank takes every world-th micro-batch of every window: disjoint shards
        windows = [window[rank::world] for window in windows]
        log(f"data parallel: {world} processes, {cfg.grad_accum} micro-batches per window split between them"
            + (f" (more processes than micro-batches: {world - cfg.grad_accum} idle; raise --grad-accum)"
               if world > cfg.grad_accum else ""))
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    log(f"data: {len(examples)} examples from {cfg.data} {cfg.split}, {dropped} dropped (response cut away by "
          f"max_len {cfg.max_len}), {n_tokens / len(examples):.1f} tokens on average")
    log(f"steps: {len(windows)} optimizer steps of {cfg.grad_accum} micro-batches x {cfg.batch_size} examples "
          f"({cfg.grad_accum * cfg.batch_size} per step), {cfg.epochs} epoch(s)"
          + (f", capped by --max-steps {cfg.max_steps}" if cfg.max_steps else ""))

    eval_source = {"": "builtin" if cfg.data == "builtin" else "", "none": ""}.get(cfg.eval_data, cfg.eval_data)
    eval_records = load_records(eval_source, cfg.eval_split) if eval_source else []
    eval_examples = encode(eval_records, tokenizer, cfg.max_len, cfg.template)[0]

    # --- optimizer: AdamW over ONE tensor, the flat bias buffer -------------------------------------
    optimizer = torch.optim.AdamW([flat.param], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    checkpoint = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise BitfitError(f"--resume {out_dir}: no checkpoint there to continue from")
    start = load_checkpoint(checkpoint, flat, optimizer) if checkpoint else (0, 0, None)
    if world > 1 and start[1] > 0:
        raise BitfitError(f"{checkpoint} stopped mid-window in a single process; resume it in a single process "
                          "(python train.py --resume), or from a --save-every checkpoint")
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    # The schedule is a pure function of the step: a resumed run starts it at its checkpoint's step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=len(windows), warmup=cfg.warmup_steps, schedule=cfg.schedule),
        last_epoch=start[0] - 1)

    # --- evaluate, train, evaluate ------------------------------------------------------------------
    results: dict = {"trainable": trainable, "total": total, "examples": len(examples), "dropped": dropped,
                     "steps": len(windows), "device": str(device)}
    before_path = out_dir / "eval_before.json"  # kept, so a resumed run reports the untrained model
    eval_records = eval_records if main_rank else []
    if eval_records and checkpoint and before_path.is_file():
        results["before"] = json.loads(before_path.read_text())
    elif eval_records:
        results["before"] = evaluate(model, tokenizer, eval_records, eval_examples, collate, cfg, device)
        before_path.write_text(json.dumps(results["before"], indent=2) + "\n")
    if eval_records:
        log(f"before training: held-out loss {results['before']['loss']:.4f}, exact match "
              f"{100 * results['before']['exact_match']:.1f}% ({len(eval_records)} examples of {eval_source} {cfg.eval_split})")

    # metrics.jsonl holds exactly the steps done: all of them for a resumed run's checkpoint, none for a new run.
    metrics_path = out_dir / "metrics.jsonl"
    done = metrics_path.read_text().splitlines()[: start[0]] if checkpoint and metrics_path.is_file() else []
    if main_rank:
        metrics_path.write_text("".join(line + "\n" for line in done))
    if checkpoint:
        log(f"resuming from {checkpoint}: step {start[0]}, micro-batch {start[1]}")
    train_start = time.perf_counter()
    with graceful_stop() as stop_asked:
        records = fit(model, flat, optimizer, scheduler, windows, examples, collate, cfg, device, out_dir,
                      stop_asked, start)
    records = [json.loads(line) for line in done] + records
    results["train_seconds"] = time.perf_counter() - train_start
    flat.check()
    if not main_rank:  # rank 0 evaluates and writes; the others wait for it, so no process group
        distributed.barrier()  # is torn down while a peer still uses it (gloo aborts then)
        return results
    delta_path = out_dir / "delta.safetensors"  # saved first: what training made must not wait on evaluation
    save_delta(str(delta_path), model, flat, base_model=cfg.model, added=added, selection=cfg.biases)

    if eval_records:
        results["after"] = evaluate(model, tokenizer, eval_records, eval_examples, collate, cfg, device)
        gain = 100 * (results["after"]["exact_match"] - results["before"]["exact_match"])
        log(f"after training:  held-out loss {results['after']['loss']:.4f}, exact match "
              f"{100 * results['after']['exact_match']:.1f}% ({gain:+.1f} points)")
        for sample in results["after"]["samples"][:3]:
            log(f"  {sample['prompt']!r} -> {sample['generated'].strip()!r} (expected {sample['expected']!r})")

    # --- save: the delta, and everything needed to read the run -------------------------------------
    results["total_seconds"] = time.perf_counter() - started
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    log(f"saved the bias delta to {delta_path} ({delta_path.stat().st_size / 2**10:,.0f} KiB; "
          f"the full model is {model_mb:,.0f} MiB)")
    if save_loss_curve(records, out_dir / "loss.png"):
        log(f"loss curve: {out_dir / 'loss.png'}")
    log(f"done in {results['total_seconds']:.0f} s ({results['train_seconds']:.0f} s training)")
    distributed.barrier()  # the other ranks wait here for the delta and results to be written
    return results


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a problem with the input, 3 a non-finite loss or gradient, 130 interrupted."""
    try:
        run(from_args(argv))
    except BitfitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"error: non-finite values, run stopped: {error}", file=sys.stderr)
        return 3
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once, without a checkpoint", file=sys.stderr)
        return 130
    finally:
        distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
