"""How a run starts: a new run, an --overwrite of an earlier one, or a --resume of an interrupted one.

    open_run   the run's folder claimed and checked (two runs never mix in one), its config saved
    resume     an interrupted run's checkpoint restored, and its metrics.jsonl cut back to the steps it holds
A resumed run continues with the config it was started with, exactly where it stopped: the data order and
the layout are pure functions of the seed (bitfit.data.layout), the lr of the step (core.step.lr_schedule),
and the checkpoint holds the rest (bitfit.run.checkpoint).
"""

import dataclasses
import json
from pathlib import Path

import torch

from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.files import finite_number, parse_json, write_atomically, write_error
from bitfit.run import ranks, run_folder
from bitfit.run.checkpoint import latest_checkpoint, load_checkpoint
from bitfit.run.config import TrainConfig


def resumed_config(given: TrainConfig, run_dir: Path, log) -> TrainConfig:
    """The config an interrupted run was started with, to continue it exactly; says which flags it ignores."""
    if not (run_dir / "config.json").is_file():
        raise BitfitError(f"--resume {run_dir}: not a bitfit run folder (no config.json there)")
    ignored = [f.name for f in dataclasses.fields(TrainConfig)
               if getattr(given, f.name) != getattr(TrainConfig(resume=given.resume), f.name)]
    if ignored:
        log(f"--resume continues with the run's own config; ignoring {', '.join('--' + n.replace('_', '-') for n in ignored)}")
    try:
        saved = TrainConfig.from_dict(parse_json((run_dir / "config.json").read_text()))
    except (OSError, ValueError, BitfitError) as error:  # ValueError: not JSON, not UTF-8
        raise BitfitError(f"--resume {run_dir}: its config.json, the config the run started with, is broken ({error}); "
                          "restore it, or start a new run") from None
    # A resume continues a run and never starts one: --overwrite, which the run may have started with, is not its.
    return dataclasses.replace(saved, resume=given.resume, out_dir=given.resume, overwrite=False)


def check_run_dir(cfg: TrainConfig, out_dir: Path, log) -> None:
    """Refuse to mix two runs in one folder: a finished run is neither resumed nor replaced without
    --overwrite, an interrupted one is resumed or overwritten, and a folder where an --overwrite run has
    not finished yet (the run it replaces set aside) is touched by --resume or --overwrite only.
    --overwrite sets the earlier run aside (bitfit.run.run_folder), kept until this run finishes."""
    delta, checkpoint = (out_dir / run_folder.DELTA).exists(), latest_checkpoint(out_dir)
    unfinished = run_folder.replaced(out_dir) and not cfg.overwrite and not cfg.resume
    if delta and (cfg.resume or not cfg.overwrite):
        unreported = "" if run_folder.finished(out_dir) else f" (its {run_folder.RESULTS} was never written)"
        if cfg.resume:
            raise BitfitError(f"{out_dir} is a finished run{unreported}, nothing to resume (its delta is "
                              f"{out_dir / run_folder.DELTA}); to train again, start a new run without --resume")
        raise BitfitError(f"{out_dir} already holds a finished run{unreported}; pick another --out-dir or pass --overwrite")
    if unfinished or (checkpoint and not cfg.resume and not cfg.overwrite):
        kept = (f", started with --overwrite: the run it replaces is kept in {out_dir / run_folder.REPLACED} until it "
                "finishes" if run_folder.replaced(out_dir) else "")
        go_on = f"continue it with: python train.py --resume {out_dir} (or" if checkpoint else "(it has no checkpoint to resume:"
        raise BitfitError(f"{out_dir} holds an interrupted run{kept}; {go_on} pass --overwrite to start over)")
    if cfg.overwrite:  # nothing of the old run may pass for part of the new one
        foreign, discarded = run_folder.set_aside(out_dir)
        log("--overwrite: the earlier run is set aside in " + str(out_dir / run_folder.REPLACED) + ", deleted when this "
            "run finishes, put back if it fails before its first step"
            + (f"; discarded {discarded}" if discarded else "")
            + (f"; kept {len(foreign)} that bitfit did not write: " + ", ".join(str(path) for path in foreign[:5])
               + (" ..." if len(foreign) > 5 else "") if foreign else ""))


def open_run(cfg: TrainConfig, log) -> tuple[TrainConfig, Path]:
    """The resolved config and the run's folder, with the config saved in it. Process 0 claims the folder
    (settling what a killed run left there before anything is read from it), and tells the others the
    config and the folder's name, or the error that every process then stops with."""
    if cfg.resume and not run_folder.is_run_folder(Path(cfg.resume)):
        raise BitfitError(f"--resume {cfg.resume}: not a bitfit run folder (no {run_folder.MARKER} there)")

    def claim_and_save() -> str:
        try:
            out_dir = run_folder.claim(cfg.resume or cfg.out_dir)
            resolved = resumed_config(cfg, out_dir, log) if cfg.resume else cfg
            check_run_dir(resolved, out_dir, log)
        except OSError as failure:  # a full disk, a folder that cannot be listed or moved in
            raise write_error(Path(cfg.resume or cfg.out_dir or "runs"), failure) from None
        resolved = dataclasses.replace(resolved, out_dir=str(out_dir))
        write_atomically(out_dir / "config.json", (resolved.to_json() + "\n").encode())
        return resolved.to_json()

    resolved = TrainConfig.from_dict(json.loads(ranks.broadcast(ranks.on_main(claim_and_save))))  # the folder's name holds
    return resolved, Path(resolved.out_dir)  # a timestamp: process 0's, for all


def resume(cfg: TrainConfig, flat: FlatBiases, optimizer: torch.optim.Optimizer, out_dir: Path, n_steps: int, log) -> int:
    """The step to start after: 0 for a new run; for a resumed one, the step of its newest checkpoint,
    whose biases and optimizer state are restored, and whose metrics.jsonl is cut back to the steps it holds."""
    first_step = 0
    if cfg.resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise BitfitError(f"--resume {out_dir}: no checkpoint there to continue from")
        first_step = load_checkpoint(checkpoint, flat, optimizer)
        if first_step > n_steps:
            raise BitfitError(f"checkpoint {checkpoint} is after step {first_step}, and this run has {n_steps} steps: it is "
                              "not this run's")
        log(f"resuming from {checkpoint}: after step {first_step}")
    metrics = out_dir / "metrics.jsonl"  # it holds exactly the steps done: none, or the checkpoint's
    done = ranks.on_main(lambda: recorded_steps(metrics, first_step) if first_step else [])
    if ranks.is_main():
        write_atomically(metrics, "".join(line + "\n" for line in done).encode())
    return first_step


def recorded_steps(path: Path, steps: int) -> list[str]:
    """The lines of the first `steps` steps of a resumed run's metrics.jsonl, each checked to be the record
    of its step (the loss curve and the best step are drawn from them); none if the file is gone."""
    try:
        lines = path.read_text().splitlines()[:steps]
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:  # ValueError: not UTF-8
        raise BitfitError(f"--resume: {path} cannot be read ({error})") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = parse_json(line)
        except ValueError:
            record = None
        loss = record.get("loss") if isinstance(record, dict) else None
        fields_ok = isinstance(record, dict) and all(finite_number(record[key]) for key in record
                                                     if key in ("loss", "eval_loss", "eval_exact_match", "grad_norm"))
        if not fields_ok or record.get("step") != number or not finite_number(loss):
            raise BitfitError(f"--resume: {path} line {number} is not the record of step {number} that bitfit wrote; "
                              f"restore it, or delete {path.name} to resume without the records of steps 1-{steps}")
    if 0 < len(lines) < steps:  # the next step's line would follow a gap
        raise BitfitError(f"--resume: {path} holds {len(lines)} steps and the checkpoint {steps}; restore it, or "
                          f"delete {path.name} to resume without the records of steps 1-{steps}")
    return lines


