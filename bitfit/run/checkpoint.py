"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

A run stops only between optimizer steps, so a checkpoint is a folder `checkpoints/step-000050/` (after
optimizer step 50) holding two files, neither of them pickle:
    state.safetensors  the flat biases, torch's RNG states, and every tensor the optimizer holds, as its
                       state_dict() gives them ("optimizer.0.exp_avg", "optimizer.0.step"... for AdamW,
                       "optimizer.0.momentum_buffer" for SGD with momentum)
    state.json         the step, the bitfit version, the optimizer's class and any state that is no tensor
Whatever torch.optim optimizer bitfit.core.step.make_optimizer builds, a resumed run continues it exactly.
The gradient is zero between steps, so it is not saved. The data position is the step: the order of
examples and the layout are pure functions of the seed. So is the LR schedule.
"""

import json
import re
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file

from bitfit import __version__
from bitfit.core.errors import BitfitError, NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.files import write_folder

STATE = "state.safetensors"
FILES = (STATE, "state.json")  # all a checkpoint folder holds: what deleting one may delete
NAME = re.compile(r"^step-(\d+)$")
STAGING = re.compile(r"^\.step-\d+\.writing-")  # files.write_folder's hidden folder: a checkpoint being written


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints (folders step-N holding every file of one), oldest first (ordered by
    step number, not by name)."""
    found = [(int(match[1]), path) for path in (run_dir / "checkpoints").glob("step-*")
             if (match := NAME.match(path.name)) and is_own(path) and all((path / name).is_file() for name in FILES)]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, flat: FlatBiases, optimizer: torch.optim.Optimizer, keep: int) -> Path:
    """Write the checkpoint after optimizer step `step` and keep only the newest `keep`. Returns its folder.

    Written whole or not at all (files.write_folder): a crash or a full disk mid-write leaves the earlier
    checkpoints and no folder that looks like a checkpoint. Older ones go file by file (remove): a file
    someone else put in a checkpoint folder stays.
    """
    if not bool(torch.isfinite(flat.values).all()):  # the loop stops before this; a checkpoint must never hold one
        raise NonFiniteError(f"refusing to write checkpoint {step}: the biases hold NaN or inf after step {step} (is --lr "
                             "or --weight-decay too large?)")
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    held, other = optimizer_state(optimizer)
    tensors = {"values": flat.values, "rng_cpu": torch.get_rng_state(), **held}
    if torch.cuda.is_available():
        tensors |= {f"rng_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    state = safetensors.torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    about = {"step": step, "bitfit": __version__, "optimizer": type(optimizer).__name__, "optimizer_other": other,
             "optimizer_state": sorted([*held, *(OPTIMIZER + name for name in other)])}  # a file missing one is refused

    def fill(folder: Path) -> None:
        (folder / STATE).write_bytes(state)
        (folder / "state.json").write_text(json.dumps(about) + "\n")

    remove(final)  # an earlier run's step of the same number, if bitfit's (run_folder.claim refused any other)
    write_folder(final, fill)
    for old in checkpoints(run_dir)[:-keep]:
        remove(old)
    return final


def is_own(path: Path) -> bool:
    """Whether `path` is a checkpoint folder (or one being written) that holds nothing but what bitfit
    writes into one: a real folder, not a link, of regular files named in FILES."""
    return (path.is_dir() and not path.is_symlink() and bool(NAME.match(path.name) or STAGING.match(path.name))
            and all(entry.name in FILES and entry.is_file() and not entry.is_symlink() for entry in path.iterdir()))


def remove(path: Path) -> None:
    """Delete a checkpoint folder bitfit wrote (is_own): its files, then the folder. Anything else is
    left alone (a link is never followed)."""
    if is_own(path):
        for name in FILES:
            (path / name).unlink(missing_ok=True)
        path.rmdir()


def own_and_foreign(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(bitfit's checkpoint folders, everything else) in a run's checkpoints/. A folder named like a
    checkpoint that holds anything else is refused: a run could not write that checkpoint, and its files
    are not bitfit's to move."""
    root = run_dir / "checkpoints"
    entries = sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []
    mixed = [path for path in entries if NAME.match(path.name) and not is_own(path)]
    if mixed:
        what = ("is a link" if mixed[0].is_symlink() else "is no folder" if not mixed[0].is_dir() else
                f"holds files bitfit did not write ({', '.join(sorted(e.name for e in mixed[0].iterdir())[:3])})")
        raise BitfitError(f"{mixed[0]} is named like a checkpoint but {what}: move it out, or pick another --out-dir")
    return [path for path in entries if is_own(path)], [path for path in entries if not is_own(path)]


OPTIMIZER = "optimizer."  # how the name of each tensor of the optimizer's state starts: optimizer.<param>.<key>
LEGACY = {"exp_avg": "optimizer.0.exp_avg", "exp_avg_sq": "optimizer.0.exp_avg_sq", "adam_step": "optimizer.0.step"}


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """What the optimizer holds (its state_dict()'s state, per parameter), as named tensors and, for any
    value that is no tensor, JSON: {"optimizer.0.exp_avg": ...}, {"0.some_count": 3}."""
    tensors, other = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER}{index}.{key}"] = value  # in its own shape, a 0-d count as one
            else:
                other[f"{index}.{key}"] = value
    return tensors, other


def read_checkpoint(path: Path, flat: FlatBiases) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(step, tensors, state.json) of a checkpoint, every tensor checked against `flat`; a BitfitError naming
    what is wrong. A checkpoint of an earlier bitfit (AdamW's exp_avg, exp_avg_sq, adam_step) reads as
    the same state under today's names."""
    def broken(why: str) -> BitfitError:
        return BitfitError(f"checkpoint {path} {why}; delete it to resume from the one before (if any)")

    try:  # a truncated or random file fails inside safetensors or json, each with its own error type
        about = json.loads((path / "state.json").read_text())
        step, tensors = about["step"], load_file(str(path / STATE))
    except Exception as error:  # noqa: BLE001: whatever the reader says, the file is unreadable
        raise broken(f"cannot be read ({type(error).__name__}: {str(error).strip()[:120]})") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or (NAME.match(path.name) and
                                                                           step != int(NAME.match(path.name)[1])):
        raise broken(f"names step {str(step)[:40]}, not the step of its folder's name")
    if LEGACY.keys() & tensors.keys():  # AdamW's state, as an earlier bitfit named it: all of it, or none
        if missing := LEGACY.keys() - tensors.keys():
            raise broken(f"lacks {', '.join(sorted(missing))}")
        tensors = {LEGACY.get(name, name): tensor.reshape(()) if name == "adam_step" else tensor
                   for name, tensor in tensors.items()}
        about = {**about, "optimizer": "AdamW"}
    listed = about.get("optimizer_state", [name for name in tensors if name.startswith(OPTIMIZER)])
    other = {OPTIMIZER + name for name in about.get("optimizer_other") or {}}
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise broken("names its optimizer's state in no list of names")
    if missing := ({"values", "rng_cpu", *listed} - set(tensors) - other):
        raise broken(f"lacks {', '.join(sorted(missing))}")
    if extra := {name for name in tensors if name.startswith(OPTIMIZER)} - set(listed):
        raise broken(f"holds {', '.join(sorted(extra))}, which its state.json does not list")
    # An optimizer's step count (AdamW's, every torch optimizer's that keeps one) is the run's step.
    counts = [name for name in tensors if name.startswith(OPTIMIZER) and name.endswith(".step")]
    if any(tensors[name].shape != () or tensors[name].dtype != torch.float32 or tensors[name].item() != step
           for name in counts):
        raise broken(f"holds an optimizer step count that is not {step}, its step, as one float32")
    # The biases, and the optimizer's state of them: fp32 as the flat buffer is, in its shape where as large.
    for name in ("values", *(name for name in tensors if name.startswith(OPTIMIZER))):
        tensor = tensors[name]
        if tensor.dtype != torch.float32 or ((name == "values" or tensor.numel() == flat.values.numel())
                                             and tensor.shape != flat.values.shape):
            raise broken(f"holds {name} of shape {tuple(tensor.shape)} {tensor.dtype}; this model trains "
                         f"{flat.values.numel()} float32 biases")
        if not bool(torch.isfinite(tensor).all()):
            raise broken(f"holds NaN or inf in {name}")
    try:  # the generator's own check: a state of the right shape can still be no mt19937 state
        torch.Generator().set_state(tensors["rng_cpu"])
    except (RuntimeError, TypeError):
        raise broken("holds no valid random generator state") from None
    return step, tensors, about


def load_checkpoint(path: Path, flat: FlatBiases, optimizer: torch.optim.Optimizer) -> int:
    """Restore the biases, the optimizer's state and the RNG from a checkpoint (checked whole first);
    return its step. The optimizer takes its state through its own load_state_dict, which puts each
    tensor where and how it wants it (its dtype, its device)."""
    step, tensors, about = read_checkpoint(path, flat)
    held = {name: tensor for name, tensor in tensors.items() if name.startswith(OPTIMIZER)}
    saved_by = about.get("optimizer", type(optimizer).__name__)
    if (held or about.get("optimizer_other")) and saved_by != type(optimizer).__name__:
        raise BitfitError(f"checkpoint {path} holds the state of {saved_by}, and this run's optimizer is "
                          f"{type(optimizer).__name__} (bitfit.core.step.make_optimizer): resume with the optimizer "
                          "the run started with, or start a new run")
    state: dict[int, dict] = {}
    for name, tensor in held.items():
        index, key = name.removeprefix(OPTIMIZER).split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in (about.get("optimizer_other") or {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    with torch.no_grad():
        flat.values.copy_(tensors["values"])
    flat.zero_grad()
    try:
        optimizer.load_state_dict({**optimizer.state_dict(), "state": state})
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # its own check of what it is given
        raise BitfitError(f"checkpoint {path}: the optimizer refuses its state ({str(error)[:160]}); start a new run") from None
    torch.set_rng_state(tensors["rng_cpu"])
    cuda_states = [tensors[name] for name in sorted(tensors) if name.startswith("rng_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return step
