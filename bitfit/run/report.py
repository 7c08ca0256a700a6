"""What a run reports: each step's record, sent to every sink; beside the delta, where it ran, its best
step, its loss curve and its measures as pictures, and results.json (write_results, the last file).

Every step's record goes through ONE function (`sinks` gives it): to the console, to metrics.jsonl and to
the sink --report-to names. A sink is a function of the record, made by a function here; a new one is
that function and its name in OPTIONAL_SINKS.
"""

import contextlib
import io
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from bitfit import __version__
from bitfit.core.errors import BitfitError, NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.files import append, cannot_write, write_atomically, write_json
from bitfit.model.pretrained import local_weight_bytes
from bitfit.run import ranks
from bitfit.run.run_folder import DELTA, EVENTS, RESULTS, TENSORBOARD

Sink = Callable[[dict], None]


@contextlib.contextmanager
def sinks(run_dir: Path, steps: int, first_step: int, log_every: int, report_to: str,
          device: torch.device) -> Iterator[Sink]:
    """The function that sends a step's record to every sink, open while the steps run: metrics.jsonl,
    the console (a progress bar; a line every `log_every` steps and at each held-out measure), and
    the optional sink `report_to` names (TensorBoard). Under torchrun rank 0 alone reports: the others send nowhere."""
    if not ranks.is_main():
        yield lambda record: None
        return
    with contextlib.ExitStack() as stack:
        chosen = [metrics_file(run_dir / "metrics.jsonl", stack), console(steps, first_step, log_every, device, stack)]
        if report_to:
            chosen.append(OPTIONAL_SINKS[report_to](run_dir, first_step, stack))

        def send(record: dict) -> None:
            record = as_numbers(flattened(record))  # every sink sees every number, however deep a fork nested it
            for sink in chosen:
                sink(record)

        yield send


def flattened(record: dict, prefix: str = "") -> dict:
    """The record with nested dicts spread into group/name keys: {"bias": {"norm": 2.0}} -> {"bias/norm": 2.0}."""
    spread = {}
    for key, value in record.items():
        spread.update(flattened(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return spread


def as_numbers(record: dict) -> dict:
    """A flattened record with one-value tensors (a measure a fork computed on the device) as numbers; a
    non-finite number is a NonFiniteError naming it (metrics.jsonl is strict JSON, and a NaN measure is news)."""
    record = {key: value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
              for key, value in record.items()}
    for key, value in numbers(record).items():
        if not math.isfinite(value):
            raise NonFiniteError(f"step {record.get('step')}: the record's {key} is {value}")
    return record


def numbers(record: dict) -> dict[str, float]:
    """The measures of a (flattened) record: every number in it but its step."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def metrics_file(path: Path, stack: contextlib.ExitStack) -> Sink:
    """metrics.jsonl: one strict-JSON line per step (no NaN), appended whole. Unbuffered, so each line
    reaches the file whole or not at all (files.append), and closing it has nothing left to write: a full
    disk is one error, said once."""
    file = stack.enter_context(open(path, "ab", buffering=0))
    return lambda record: append(file, path, (json.dumps(record, allow_nan=False) + "\n").encode())


# What the console's step line shows in words of its own; every other number of a record follows it as
# `name value`, so a measure a fork adds to the record is on the console with no other edit.
CONSOLE_OWN = {"loss", "lr", "grad_norm", "tokens", "label_tokens", "tokens_per_s"}
HELD_OUT_WORDS = {"eval_loss": ("held-out loss", "{:.4f}"), "eval_exact_match": ("exact match", "{:.1%}")}


def console(steps: int, first_step: int, log_every: int, device: torch.device, stack: contextlib.ExitStack) -> Sink:
    """A progress bar over the steps, and a line every `log_every` steps (and at the last) with the loss,
    lr, gradient norm, tokens/s, the peak memory and every other number of the record; a line at each
    held-out measure (every eval_ number). Its tokens/s is the wall clock's since the last line, held-out
    measures and checkpoints included; a record's own `tokens_per_s` is its step's alone."""
    bar = stack.enter_context(tqdm(total=steps, initial=first_step, desc="training", unit="step", dynamic_ncols=True))
    since, tokens = time.perf_counter(), 0

    def words(key: str, value: float) -> str:
        name, form = HELD_OUT_WORDS.get(key, (key.removeprefix("eval_"), "{:.4g}"))
        return f"{name} {form.format(value)}"

    def show(record: dict) -> None:
        nonlocal since, tokens
        step, measures = record["step"], numbers(record)
        held_out = {key: value for key, value in measures.items() if key.startswith("eval")}
        if held_out:
            bar.write(f"step {step:>5}/{steps} | " + " | ".join(words(key, value) for key, value in held_out.items()))
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        tokens += record["tokens"]
        if step % log_every == 0 or step == steps:
            elapsed, since = time.perf_counter() - since, time.perf_counter()
            others = [words(key, value) for key, value in measures.items() if key not in CONSOLE_OWN and key not in held_out]
            bar.write(" | ".join([f"step {step:>5}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                                  f"grad norm {record['grad_norm']:.3f} | {tokens / elapsed:,.0f} tok/s | "
                                  f"peak mem {peak_memory_gb(device):.2f} GB", *others]))
            tokens = 0

    return show


def tensorboard_protos():
    """TensorBoard's Event and Summary messages and its record framing (event_pb2, summary_pb2, RecordWriter),
    or one error line saying how to install it (an optional dependency)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as error:
        raise BitfitError(f"--report-to tensorboard needs TensorBoard, which cannot be imported ({error}): "
                          "pip install tensorboard") from None
    return event_pb2, summary_pb2, RecordWriter


def tensorboard(run_dir: Path, first_step: int, stack: contextlib.ExitStack) -> Sink:
    """TensorBoard event files in the run's tensorboard/ folder (`tensorboard --logdir runs`): each number
    of a record as a scalar at its step, named as the HF Trainer names them (train/loss, eval/loss...).

    Written here, not by TensorBoard's SummaryWriter, whose thread reports a full disk as a traceback: each
    event is framed as TensorBoard reads it (its RecordWriter) and appended whole, unbuffered, by this
    process (files.append), so a killed run keeps what it logged and a full disk is one error line naming
    the file. The file opens at the first record, so a run that fails before its first step leaves none; a
    resumed run's file starts by purging what the interrupted one logged after its checkpoint (TensorBoard's
    SessionLog START at the first new step, as SummaryWriter's purge_step writes it)."""
    event_pb2, summary_pb2, RecordWriter = tensorboard_protos()
    events = None

    def framed(event) -> bytes:
        buffer = io.BytesIO()
        RecordWriter(buffer).write(event.SerializeToString())
        return buffer.getvalue()

    def write(record: dict) -> None:
        nonlocal events
        if events is None:
            path = run_dir / TENSORBOARD / f"{EVENTS}{int(time.time())}.{socket.gethostname()}.{os.getpid()}.bitfit"
            try:
                path.parent.mkdir(exist_ok=True)
                file = stack.enter_context(open(path, "ab", buffering=0))
            except OSError as error:
                raise cannot_write(path, error) from None
            events = (file, path)
            start = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
            if first_step:
                start.append(event_pb2.Event(wall_time=time.time(), step=first_step + 1,
                                             session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            append(*events, b"".join(framed(event) for event in start))
        values = []
        for key, value in numbers(record).items():
            key = HF_NAMES.get(key, key)
            tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            values.append(summary_pb2.Summary.Value(tag=tag, simple_value=value))
        append(*events, framed(event_pb2.Event(wall_time=time.time(), step=record["step"],
                                               summary=summary_pb2.Summary(value=values))))

    return write


HF_NAMES = {"lr": "learning_rate"}  # a record's names that the HF Trainer's TensorBoard logs call otherwise
OPTIONAL_SINKS = {"tensorboard": tensorboard}  # what --report-to may name


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on CUDA, the process's resident set (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: this process's own peak. ru_maxrss is not: on Linux it carries over from the process
        # that started this one (a parent that peaked at 1.7 GB makes every child "peak" at 1.7 GB).
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        return int(line.split()[1]) / 2**20  # KiB
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes there


# ----------------------------------------------------------------------------------------------------
# Beside the delta: where the run ran, its best step, its loss curve
# ----------------------------------------------------------------------------------------------------


def memory_per_process(model: torch.nn.Module, flat: FlatBiases) -> dict[str, list[int]]:
    """Bytes of frozen weights and of the flat bias buffer on each process, in rank order (a collective
    under torchrun): with --shard-weights the weights are split, the biases never are."""
    return {"weight_bytes_per_process": ranks.gather(local_weight_bytes(model)),
            "bias_buffer_bytes_per_process": ranks.gather(flat.values.nbytes)}


def environment(device: torch.device) -> dict:
    """The software and machine a run's numbers came from, and bitfit's git commit when it is a checkout."""
    return {
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "bitfit": __version__},
        "machine": {"cpu": cpu_name(), "cpu_cores": _cores(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),  # the checkout around bitfit/run/
    }


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:  # not Linux
        return os.cpu_count() or 0


def git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout bitfit runs from ('+dirty' when it has uncommitted changes), or None."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)

    if not (folder / ".git").exists():  # an installed copy: a repository around it would not be bitfit's
        return None
    try:
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git installed
        return None


def held_out_points(records: list[dict], before: dict | None, after: dict | None, steps: int) -> list[dict]:
    """The held-out measures by step: the untrained model at step 0, every --eval-every, the trained at the end."""
    points = [{"step": 0, "loss": before["loss"], "exact_match": before.get("exact_match")}] if before else []
    points += [{"step": r["step"], "loss": r["eval_loss"], "exact_match": r.get("eval_exact_match")}
               for r in records if "eval_loss" in r]
    if after:
        points.append({"step": steps, "loss": after["loss"], "exact_match": after.get("exact_match")})
    return points


def best_step(points: list[dict]) -> dict | None:
    """The point with the lowest held-out loss, the untrained base (step 0) included: when no trained step
    beats it, the best is the base, and saying a trained step was best would be false. None without a
    trained point (there is nothing to choose between)."""
    if not any(point["step"] > 0 for point in points):
        return None
    return min(points, key=lambda point: (point["loss"], point["step"] == 0))  # a tie goes to the first trained step


def save_measures(records: list[dict], path: Path) -> None:
    """One figure of every number the steps' (flattened) records hold but the loss (loss.png's): one small panel per
    measure against the step (the lr, the gradient norm, tokens/s, held-out measures where taken, and
    whatever a fork adds to the record), so a new measure is drawn with no other edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:  # metrics.jsonl's lines, flattened as every sink's records are
        for key, value in numbers(record).items():
            if key != "loss":
                series.setdefault(key, []).append((record["step"], value))
    columns = 3
    rows = max(1, -(-len(series) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(9.6, 2.2 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items()):
        ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", ms=3, lw=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    figure.supxlabel("optimizer step", fontsize=9)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_atomically(path, png.getvalue())


def save_loss_curve(records: list[dict], points: list[dict], path: Path) -> None:
    """One figure: the training loss per step and the held-out loss where it was measured.

    A log scale when the losses span more than a factor of 10 (they usually fall that far on a task a
    model learns), so the late steps are not a flat line at the bottom."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2, label="training (per step)")
    if points:  # joined by lines only where they sample a curve: two points joined would draw a straight decline
        style = "o-" if len(points) > 2 else "o"
        axes.plot([p["step"] for p in points], [p["loss"] for p in points], style, ms=5, lw=1.2, label="held-out")
    losses = [r["loss"] for r in records] + [p["loss"] for p in points]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        axes.set_yscale("log")
    axes.set(xlabel="optimizer step", ylabel="loss per label token (a classifier's: per example)")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_atomically(path, png.getvalue())


def said(measured: dict, task: str) -> str:
    """'held-out loss 0.6931, accuracy 50.0%, F1 0.667, MCC 0.000' and the like, for the log."""
    parts = [f"held-out loss {measured['loss']:.4f}"]
    if task == "lm":
        if "exact_match" in measured:  # none on plain text, which asks no question
            parts.append(f"exact match {100 * measured['exact_match']:.1f}%")
    elif task == "classify":
        parts += [f"accuracy {100 * measured['accuracy']:.1f}%", *([f"F1 {measured['f1']:.3f}"] if "f1" in measured else []),
                  f"MCC {measured['mcc']:.3f}"]
    else:
        parts += [f"Pearson {measured['pearson']:.3f}", f"Spearman {measured['spearman']:.3f}"]
    return ", ".join(parts)


def gain(before: dict, after: dict, task: str) -> str:
    """' (+45.0 points)': the change of the headline measure."""
    if task == "regress":
        return f" (Pearson {after['pearson'] - before['pearson']:+.3f})"
    key = "exact_match" if task == "lm" else "accuracy"
    if key not in before or key not in after:  # plain text held out: the loss is the measure
        return f" (loss {after['loss'] - before['loss']:+.4f})"
    return f" ({100 * (after[key] - before[key]):+.1f} points)"


def write_results(model: torch.nn.Module, out_dir: Path, results: dict, started: float, log) -> None:
    """After the delta is saved (what training made must not wait on evaluation) and evaluated: the
    measures after training in the log, the pictures, and results.json, the last file a run writes (rank 0)."""
    delta_path = out_dir / DELTA
    if "after" in results:
        before, after, task = results.get("before"), results["after"], results["task"]  # before: None if a resume lost it
        log(f"after training:  {said(after, task)}" + (gain(before, after, task) if before else ""))
        for sample in after.get("samples", [])[:3]:
            log(f"  {sample['prompt']!r} -> {sample['generated'].strip()!r} (expected {sample['expected']!r})")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    points = held_out_points(records, results.get("before"), results.get("after"), results["steps"])
    if best := best_step(points):
        results["best"] = best
        log(f"best held-out loss: {best['loss']:.4f} after step {best['step']}" if best["step"] else
            f"best held-out loss: {best['loss']:.4f}, the untrained base's: no trained step beat it (try another --lr)")
    save_loss_curve(records, points, out_dir / "loss.png")
    save_measures(records, out_dir / "measures.png")
    results["total_seconds"] = time.perf_counter() - started
    write_json(out_dir / RESULTS, results)  # the last file written: a run that says it finished, did
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    log(f"saved the bias delta to {delta_path} ({delta_path.stat().st_size / 2**10:,.0f} KiB; "
        f"the full model is {model_mb:,.0f} MiB)")
    log(f"loss curve: {out_dir / 'loss.png'}; every other measure by step: {out_dir / 'measures.png'}")
    log(f"done in {results['total_seconds']:.0f} s ({results['train_seconds']:.0f} s training)")
