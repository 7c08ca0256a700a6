"""What a run reports beside its delta: where it ran, its best step, and its loss curve as a picture."""

import io
import os
import platform
import subprocess
from pathlib import Path

import torch
import transformers

from . import __version__
from .files import write_atomically


def environment(device: torch.device) -> dict:
    """The software and machine a run's numbers came from, and bitfit's git commit when it is a checkout."""
    return {
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "bitfit": __version__},
        "machine": {"cpu": cpu_name(), "cpu_cores": _cores(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "git_commit": git_commit(Path(__file__).resolve().parent.parent),
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

