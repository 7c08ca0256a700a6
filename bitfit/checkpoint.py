"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

A run stops only between optimizer steps, so a checkpoint is a folder `checkpoints/step-000050/` (after
optimizer step 50) holding two files, neither of them pickle:
    state.safetensors  the flat biases, AdamW's exp_avg, exp_avg_sq and step, torch's RNG states
    state.json         the step, the bitfit version
The gradient is zero between steps, so it is not saved. The data position is the step: the order of
examples and the layout are pure functions of the seed. So is the LR schedule.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import BitfitError, NonFiniteError
from .files import cannot_write, file_mode, fsync
from .flat import FlatBiases

STATE = "state.safetensors"
NAME = re.compile(r"^step-(\d+)$")


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (ordered by step number, not by name)."""
    found = [(int(match[1]), path) for path in (run_dir / "checkpoints").glob("step-*") if (match := NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, flat: FlatBiases, optimizer: torch.optim.Optimizer, keep: int) -> Path:
    """Write the checkpoint after optimizer step `step` and keep only the newest `keep`. Returns its folder.

    Written into a hidden temporary folder, flushed to disk, then renamed: a crash mid-write leaves a
    temporary folder that is never read, never a checkpoint that looks whole but is not.
    """
    if not bool(torch.isfinite(flat.values).all()):  # the loop stops before this; a checkpoint must never hold one
        raise NonFiniteError(f"refusing to write checkpoint {step}: the biases hold NaN or inf")
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    staging = root / f".writing-{final.name}"
    adam = optimizer.state.get(flat.param, {})
    tensors = {"values": flat.values, "rng_cpu": torch.get_rng_state()}
    if adam:
        tensors |= {"exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"], "adam_step": adam["step"].reshape(1)}
    if torch.cuda.is_available():
        tensors |= {f"rng_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(staging / STATE))
        (staging / "state.json").write_text(json.dumps({"step": step, "bitfit": __version__}) + "\n")
        for file in staging.iterdir():
            file.chmod(file_mode())  # safetensors writes 0600
            fsync(file)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        fsync(root)  # the rename itself reaches the disk
    except OSError as error:  # a full disk, say: the earlier checkpoints stay, the half-written one goes
        shutil.rmtree(staging, ignore_errors=True)
        raise cannot_write(final, error) from None
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint(path: Path, flat: FlatBiases) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, tensors) of a checkpoint, every one checked against `flat`; a BitfitError naming what is wrong."""
    def broken(why: str) -> BitfitError:
        return BitfitError(f"checkpoint {path} {why}; delete it to resume from the one before (if any)")

    try:  # a truncated or random file fails inside safetensors or json, each with its own error type
        step = json.loads((path / "state.json").read_text())["step"]
        tensors = load_file(str(path / STATE))
    except Exception as error:  # noqa: BLE001: whatever the reader says, the file is unreadable
        raise broken(f"cannot be read ({type(error).__name__}: {str(error).strip()[:120]})") from None
    moments = {"exp_avg", "exp_avg_sq", "adam_step"}
    if not isinstance(step, int) or step < 0:
        raise broken(f"names step {step!r}, not a step number")
    missing = {"values", "rng_cpu"} - set(tensors)
    if moments & set(tensors):  # AdamW's state: all of it, or none (a checkpoint before the first step)
        missing |= moments - set(tensors)
    if missing:
        raise broken(f"lacks {', '.join(sorted(missing))}")
    for name in ("values", *sorted(moments & set(tensors) - {"adam_step"})):
        if tensors[name].shape != flat.values.shape or tensors[name].dtype != torch.float32:
            raise broken(f"holds {name} of shape {tuple(tensors[name].shape)} {tensors[name].dtype}; this model trains "
                         f"{flat.values.numel()} float32 biases")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise broken(f"holds NaN or inf in {name}")
    if tensors["rng_cpu"].dtype != torch.uint8 or tensors["rng_cpu"].shape != torch.get_rng_state().shape:
        raise broken("holds no valid random generator state")
    return step, tensors


def load_checkpoint(path: Path, flat: FlatBiases, optimizer: torch.optim.Optimizer) -> int:
    """Restore the biases, AdamW state and RNG from a checkpoint (checked whole first); return its step."""
    step, tensors = read_checkpoint(path, flat)
    device = flat.values.device
    with torch.no_grad():
        flat.values.copy_(tensors["values"])
    flat.zero_grad()
    if "exp_avg" in tensors:
        optimizer.state[flat.param] = {
            "step": tensors["adam_step"].reshape(()).to(device),
            "exp_avg": tensors["exp_avg"].to(device),
            "exp_avg_sq": tensors["exp_avg_sq"].to(device),
        }
    torch.set_rng_state(tensors["rng_cpu"])
    cuda_states = [tensors[name] for name in sorted(tensors) if name.startswith("rng_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return step
