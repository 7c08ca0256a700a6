"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

A checkpoint is a folder `checkpoints/step-000050-03/` (optimizer step 50, 3 micro-batches into the next
window) holding two files, neither of them pickle:
    state.safetensors  the flat biases, the flat gradient (non-zero mid-window), AdamW's exp_avg,
                       exp_avg_sq and step, the loss accumulated in the window, torch's RNG states
    state.json         the step, the micro-batch, the bitfit version
The data position is the step and micro-batch: the order of examples is a pure function of the seed.
The LR schedule position is the step: the schedule is a pure function of it.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import BitfitError
from .flat import FlatBiases

STATE = "state.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, micro: int, flat: FlatBiases, optimizer: torch.optim.Optimizer,
                    window_loss: torch.Tensor, keep: int) -> Path:
    """Write a checkpoint and keep only the newest `keep`. Returns its folder.

    Written into a hidden temporary folder, flushed to disk, then renamed: a crash mid-write leaves a
    temporary folder that is never read, never a checkpoint that looks whole but is not.
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}-{micro:02d}"
    staging = root / f".writing-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    adam = optimizer.state.get(flat.param, {})
    tensors = {"values": flat.values, "grads": flat.grads, "window_loss": window_loss.reshape(1),
               "rng_cpu": torch.get_rng_state()}
    if adam:
        tensors |= {"exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"], "adam_step": adam["step"].reshape(1)}
    if torch.cuda.is_available():
        tensors |= {f"rng_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(staging / STATE))
    (staging / "state.json").write_text(json.dumps({"step": step, "micro": micro, "bitfit": __version__}) + "\n")
    for file in staging.iterdir():
        _fsync(file)

    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    _fsync(root)  # the rename itself reaches the disk
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, flat: FlatBiases, optimizer: torch.optim.Optimizer) -> tuple[int, int, torch.Tensor]:
    """Restore the biases, gradient, AdamW state and RNG from a checkpoint; return (step, micro, window loss)."""
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
        flat.grads.copy_(tensors["grads"])
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
    return meta["step"], meta["micro"], tensors["window_loss"].reshape(()).to(device)
