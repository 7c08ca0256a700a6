"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

A run stops only between optimizer steps, so a checkpoint is a folder `checkpoints/step-000050/` (after
optimizer step 50) holding two files, neither of them pickle:
    state.safetensors  the flat biases, AdamW's exp_avg, exp_avg_sq and step, torch's RNG states
    state.json         the step, the bitfit version
The gradient is zero between steps, so it is not saved. The data position is the step: the order of
examples and the layout are pure functions of the seed. So is the LR schedule.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import BitfitError
from .flat import FlatBiases

STATE = "state.safetensors"
NAME = re.compile(r"^step-(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    staging = root / f".writing-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    adam = optimizer.state.get(flat.param, {})
    tensors = {"values": flat.values, "rng_cpu": torch.get_rng_state()}
    if adam:
        tensors |= {"exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"], "adam_step": adam["step"].reshape(1)}
    if torch.cuda.is_available():
        tensors |= {f"rng_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(staging / STATE))
    (staging / "state.json").write_text(json.dumps({"step": step, "bitfit": __version__}) + "\n")
    for file in staging.iterdir():
        _fsync(file)

    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    _fsync(root)  # the rename itself reaches the disk
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, flat: FlatBiases, optimizer: torch.optim.Optimizer) -> int:
    """Restore the biases, AdamW state and RNG from a checkpoint; return its optimizer step."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / STATE))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise BitfitError(f"checkpoint {path} cannot be read ({error}); delete it to resume from the one before") from None
    if tensors["values"].shape != flat.values.shape:
        raise BitfitError(f"checkpoint {path} holds {tensors['values'].numel()} biases, this model trains {flat.values.numel()}")
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
    return meta["step"]
