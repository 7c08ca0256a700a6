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
        raise NonFiniteError(f"refusing to write checkpoint {step}: the biases hold NaN or inf")
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    adam = optimizer.state.get(flat.param, {})
    tensors = {"values": flat.values, "rng_cpu": torch.get_rng_state()}
    if adam:
        tensors |= {"exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"], "adam_step": adam["step"].reshape(1)}
    if torch.cuda.is_available():
        tensors |= {f"rng_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    state = safetensors.torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})

    def fill(folder: Path) -> None:
        (folder / STATE).write_bytes(state)
        (folder / "state.json").write_text(json.dumps({"step": step, "bitfit": __version__}) + "\n")

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
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or (NAME.match(path.name) and
                                                                           step != int(NAME.match(path.name)[1])):
        raise broken(f"names step {str(step)[:40]}, not the step of its folder's name")
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
    if "adam_step" in tensors and (tensors["adam_step"].shape != (1,) or tensors["adam_step"].dtype != torch.float32
                                   or tensors["adam_step"].item() != step):
        raise broken(f"holds an AdamW step count that is not {step}, its step, as one float32")
    try:  # the generator's own check: a state of the right shape can still be no mt19937 state
        torch.Generator().set_state(tensors["rng_cpu"])
    except (RuntimeError, TypeError):
        raise broken("holds no valid random generator state") from None
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
