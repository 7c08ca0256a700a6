"""Checkpoints, exact resume, interrupts and non-finite values (issue: reliability)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import saved

import bitfit.core.step
import bitfit.files
import bitfit.run.checkpoint
import bitfit.run.config
import train
from bitfit.core.errors import BitfitError
from bitfit.model import pretrained
from bitfit.model.delta import read_delta
from bitfit.run.checkpoint import latest_checkpoint
from bitfit.run.config import TrainConfig, parser
from tiny import tiny_llama

# 40 examples = 5 optimizer steps of 8; evaluation on 2 held-out questions
ARGS = ["--split", "train[:40]", "--eval-split", "heldout[:2]", "--max-new-tokens", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved(tiny_llama, tmp_path_factory.mktemp("model") / "llama")


def signal_in_step(monkeypatch, step: int, signals: list[int]) -> None:
    """Send `signals` to this process as optimizer step `step` begins: a real Ctrl-C / SIGTERM mid-step."""
    real, calls = bitfit.core.step.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", train_step)


def outcome(run_dir: Path) -> tuple[dict, list[dict]]:
    """The delta, and every metrics.jsonl field but when a step ran and how fast (they differ run to run)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return read_delta(str(run_dir / "delta.safetensors"))[0], [
        {k: v for k, v in line.items() if k not in ("time", "tokens_per_s")} for line in lines]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_and_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(signum, model_dir, tmp_path, monkeypatch, capsys):
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "straight")]) == 0

    signal_in_step(monkeypatch, 3, [signum])
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "stopped")]) == 130
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: finishing step 3, then writing a checkpoint" in err  # said at once
    assert f"stopped after step 3; checkpoint {tmp_path / 'stopped' / 'checkpoints' / 'step-000003'}" in err
    assert f"resume with: python train.py --resume {tmp_path / 'stopped'}" in err
    assert len((tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()) == 3  # the step was finished
    assert not (tmp_path / "stopped" / "delta.safetensors").exists()

    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "stopped")]) == 0
    (straight, straight_log), (resumed, resumed_log) = outcome(tmp_path / "straight"), outcome(tmp_path / "stopped")
    assert resumed_log == straight_log and len(straight_log) == 5
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


# A fork's one edit: another torch.optim optimizer built in bitfit.core.step.make_optimizer.
OPTIMIZERS = {"AdamW": (None, {"exp_avg", "exp_avg_sq", "step"}),
              "SGD with momentum": (lambda param, lr, betas, eps, weight_decay: torch.optim.SGD([param], lr=lr, momentum=0.9),
                                    {"momentum_buffer"})}
QUICK = ["--split", "train[:40]", "--eval-data", "none", "--lr", "1e-2"]


def swap_optimizer(monkeypatch, make) -> None:
    """The fork's edit of bitfit.core.step.make_optimizer, as train.py and the config's checks both see it."""
    monkeypatch.setattr(bitfit.core.step, "make_optimizer", make)
    monkeypatch.setattr(train, "make_optimizer", make)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_stopped_and_resumed_run_ends_bitwise_as_the_uninterrupted_one_whatever_the_optimizer(optimizer, model_dir, tmp_path, monkeypatch, capsys):
    make, state = OPTIMIZERS[optimizer]
    if make:
        swap_optimizer(monkeypatch, make)
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "straight")]) == 0
    assert f"optimizer: {optimizer.split()[0]} over " in capsys.readouterr().out  # the log says which one runs
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["optimizer"] == optimizer.split()[0]
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "stopped")]) == 130
    monkeypatch.setattr(train, "train_step", bitfit.core.step.train_step)  # no more signals
    checkpoint = load_file(str(tmp_path / "stopped" / "checkpoints" / "step-000003" / "state.safetensors"))
    assert {name.removeprefix("optimizer.0.") for name in checkpoint if name.startswith("optimizer.")} == state
    assert train.main(["--resume", str(tmp_path / "stopped")]) == 0
    (straight, straight_log), (resumed, resumed_log) = outcome(tmp_path / "straight"), outcome(tmp_path / "stopped")
    assert resumed_log == straight_log and len(straight_log) == 5
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_a_run_of_one_optimizer_is_not_resumed_by_another(model_dir, tmp_path, monkeypatch, capsys):
    swap_optimizer(monkeypatch, OPTIMIZERS["SGD with momentum"][0])
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "run")]) == 130
    monkeypatch.undo()  # the run resumed with AdamW, the default
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "started with the optimizer 'SGD', and bitfit.core.step.make_optimizer now builds AdamW" in last
    # A config that does not say (an earlier bitfit's): the checkpoint's own record refuses it.
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["optimizer"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds the state of SGD, and this run's optimizer is AdamW" in last and not (tmp_path / "run" / "delta.safetensors").exists()


def test_the_optimizer_flags_follow_the_optimizer_in_use(monkeypatch):
    """Adam's bounds hold for Adam's family alone, and a flag the optimizer takes no value for is refused."""
    with pytest.raises(BitfitError, match="--lr 0.5 is above 0.1: AdamW moves every bias"):
        TrainConfig(lr=0.5)
    swap_optimizer(monkeypatch, OPTIMIZERS["SGD with momentum"][0])
    assert TrainConfig(lr=0.5, grad_clip=1e-6).lr == 0.5  # SGD's step is lr x the gradient: no such bound
    for flag, value in (("beta1", 0.8), ("eps", 1e-6)):
        with pytest.raises(BitfitError, match=f"--{flag}: SGD, the optimizer in use .* takes no (betas|eps)"):
            TrainConfig(**{flag: value})
    said = " ".join(parser().format_help().split())  # --help, its lines joined
    assert "--lr LR peak learning rate of SGD;" in said and "AdamW" not in said.replace("with AdamW on each", "")
    assert re.search(r"--beta1 BETA1 beta1 of SGD: .*\(SGD takes none: any other value is refused\) \(default", said)
    assert not re.search(r"--weight-decay WEIGHT_DECAY [^(]*\(SGD takes none", said)  # SGD has a weight decay


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    signal_in_step(monkeypatch, 3, [signal.SIGINT, signal.SIGINT])
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 130
    assert "interrupted twice" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run") is None


@pytest.mark.slow
def test_the_old_signal_handlers_are_back_after_a_run(model_dir, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_save_every_keeps_the_newest_k_checkpoints_with_fp32_optimizer_state(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(["--model", model_dir, *ARGS, "--save-every", "1", "--keep-checkpoints", "2",
                       "--bf16", "--out-dir", str(run_dir)]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    state = load_file(str(run_dir / "checkpoints" / "step-000005" / "state.safetensors"))
    # bf16 autocast, yet AdamW's state is fp32: eps 1e-8 cannot underflow to 0 as it does in fp16/bf16
    assert state["optimizer.0.exp_avg"].dtype == state["optimizer.0.exp_avg_sq"].dtype == state["values"].dtype == torch.float32
    assert torch.isfinite(state["values"]).all()


def test_a_crash_while_writing_a_checkpoint_leaves_no_checkpoint_that_looks_whole(model_dir, tmp_path, monkeypatch):
    real = bitfit.files.fsync

    def killed_while_flushing(path):  # as if the process died here, its files half on the disk: nothing cleans up
        real(path)
        if ".step-" in str(path):
            raise SystemExit("killed")

    monkeypatch.setattr(bitfit.files, "fsync", killed_while_flushing)
    monkeypatch.setattr(bitfit.files.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(SystemExit):
        train.main(["--model", model_dir, *ARGS, "--save-every", "2", "--out-dir", str(tmp_path / "run")])
    assert latest_checkpoint(tmp_path / "run") is None
    [left] = (tmp_path / "run" / "checkpoints").iterdir()
    assert left.name.startswith(".step-000002.writing-")  # hidden: never read as a checkpoint


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_is_one_error_line_and_keeps_the_previous_checkpoint(model_dir, small_disk, monkeypatch, capsys):
    real, calls = bitfit.run.checkpoint.write_folder, []

    def disk_full_at_the_second(out, fill):
        calls.append(out)
        if len(calls) == 2:
            small_disk.fill()
        real(out, fill)

    monkeypatch.setattr(bitfit.run.checkpoint, "write_folder", disk_full_at_the_second)
    run = small_disk.path / "run"
    assert train.main(["--model", model_dir, *ARGS, "--save-every", "2", "--out-dir", str(run)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write {run}/checkpoints/step-000004: the disk is full \(\d+ B free there\)", last)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # no half file beside it


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_where_its_examples_are_and_the_last_good_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    real, calls = bitfit.core.step.loss_sum, []

    def nan_in_step_3(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 2 * 8 + 1 else loss

    monkeypatch.setattr(bitfit.core.step, "loss_sum", nan_in_step_3)
    run_dir = tmp_path / "run"  # the HF Trainer recipe's layout: one pass per example, 8 per step
    assert train.main(["--model", model_dir, *ARGS, "--layout", "trainer", "--save-every", "2", "--out-dir", str(run_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite values, run stopped: step 3: loss nan")
    held = err.split("; step 3 held the training examples of ")[1].split(";")[0].split(", ")
    assert len(held) == 8 and all(re.fullmatch(r".+ row \d+", place) for place in held), held  # where each one is
    assert f"last good checkpoint: {run_dir / 'checkpoints' / 'step-000002'}" in err
    assert not (run_dir / "delta.safetensors").exists()  # nothing after the NaN is saved as if it were good
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]


@pytest.mark.slow
def test_resume_needs_a_checkpoint_and_a_fresh_run_will_not_reuse_an_interrupted_folder(model_dir, tmp_path, monkeypatch, capsys):
    assert train.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "not a bitfit run folder" in capsys.readouterr().err

    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 130
    monkeypatch.undo()
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 2
    assert f"continue it with: python train.py --resume {tmp_path / 'run'}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_keeps_its_config_and_reports_the_evaluation_of_the_untrained_model(model_dir, tmp_path, monkeypatch, capsys):
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 130
    before = json.loads((tmp_path / "run" / "eval_before.json").read_text())
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "run"), "--lr", "0.05"]) == 0
    assert "ignoring --lr" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["before"] == before


def test_the_newest_checkpoint_is_found_by_step_number_not_by_name(tmp_path):
    for name in ("step-999999", "step-1000000", ".step-1000001.writing-x", "step-000005-03", "step-1000002"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if name != "step-1000002":  # a folder of that name, without a checkpoint's files
            for file in bitfit.run.checkpoint.FILES:
                (tmp_path / "checkpoints" / name / file).touch()
    assert latest_checkpoint(tmp_path).name == "step-1000000"  # unfinished, empty and foreign folders are not checkpoints


def interrupted_run(model_dir, tmp_path, monkeypatch, *extra) -> Path:
    """A run stopped by Ctrl-C after step 3, with a checkpoint to resume from."""
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run"), *extra]) == 130
    monkeypatch.undo()
    return tmp_path / "run"


def test_resuming_after_the_training_data_changed_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = interrupted_run(model_dir, tmp_path, monkeypatch, "--data", str(data), "--eval-data", "none", "--split", "train")
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert train.main(["--resume", str(run)]) == 2
    assert "the training data changed since the run started" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: (ckpt / "state.safetensors").write_bytes((ckpt / "state.safetensors").read_bytes()[:100]), "cannot be read"),
    (lambda ckpt: (ckpt / "state.safetensors").write_bytes(os.urandom(4096)), "cannot be read"),
    (lambda ckpt: (ckpt / "state.json").write_text("{}"), "cannot be read"),
    (lambda ckpt: save_file({k: v for k, v in load_file(ckpt / "state.safetensors").items() if k != "optimizer.0.exp_avg"},
                                              str(ckpt / "state.safetensors")), "lacks optimizer.0.exp_avg"),
    (lambda ckpt: save_file({**load_file(ckpt / "state.safetensors"), "values": torch.zeros(3)},
                                              str(ckpt / "state.safetensors")), "holds values of shape"),
    (lambda ckpt: (ckpt / "state.json").write_text('{"step": 1000000000}'), "names step 1000000000, not the step of its"),
    (lambda ckpt: (ckpt / "state.json").write_text('{"step": true}'), "names step True"),
    (lambda ckpt: (ckpt / "state.json").write_text("[" * 100000 + "]" * 100000), "cannot be read"),
    (lambda ckpt: save_file({**load_file(ckpt / "state.safetensors"), "optimizer.0.step": torch.tensor([3.0, 3.0])},
                            str(ckpt / "state.safetensors")), "holds an optimizer step count that is not 3, its step, as one float32"),
    (lambda ckpt: save_file({**load_file(ckpt / "state.safetensors"), "optimizer.0.step": torch.tensor(3)},
                            str(ckpt / "state.safetensors")), "holds an optimizer step count that is not 3, its step, as one float32"),
    (lambda ckpt: save_file({**load_file(ckpt / "state.safetensors"), "optimizer.0.step": torch.tensor(float("nan"))},
                            str(ckpt / "state.safetensors")), "holds an optimizer step count that is not 3, its step, as one float32"),
    (lambda ckpt: save_file({**load_file(ckpt / "state.safetensors"),
                             "rng_cpu": torch.randint(0, 255, torch.get_rng_state().shape, dtype=torch.uint8)},
                            str(ckpt / "state.safetensors")), "holds no valid random generator state"),
])
def test_a_damaged_checkpoint_is_one_error_line_and_nothing_is_resumed(model_dir, tmp_path, monkeypatch, capsys, damage, message):
    run = interrupted_run(model_dir, tmp_path, monkeypatch)
    damage(latest_checkpoint(run))
    assert train.main(["--resume", str(run)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {latest_checkpoint(run)}") and message in last


@pytest.mark.slow
@pytest.mark.parametrize("saving", [["--save-every", "1"], []], ids=["checkpoint after each step", "no checkpoint"])
def test_biases_driven_to_inf_by_a_huge_lr_stop_the_run_and_nothing_non_finite_is_saved(saving, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bitfit.run.config, "MAX_LR", math.inf)  # the bound on --lr lifted, as a fork might
    run = tmp_path / "run"
    assert train.main(["--model", model_dir, *ARGS[:-2], "--lr", "1e308", *saving, "--out-dir", str(run)]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    said = {"checkpoint after each step": "refusing to write checkpoint 1: the biases hold NaN or inf after step 1",
            "no checkpoint": "step 2: the biases hold NaN or inf: the update of the step before made them so (is --lr or "
                             "--weight-decay too large?); step 1 held the training examples of "}  # the culprit's
    assert said["checkpoint after each step" if saving else "no checkpoint"] in last
    assert "(is --lr or --weight-decay too large?)" in last
    assert not (run / "delta.safetensors").exists()
    for checkpoint in bitfit.run.checkpoint.checkpoints(run):
        assert torch.isfinite(load_file(checkpoint / "state.safetensors")["values"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_model_loads_ends_at_once_saying_nothing_was_lost(model_dir, tmp_path, monkeypatch, capsys, signum):
    real = pretrained.load

    def load_then_signal(*args, **kwargs):
        loaded = real(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return loaded

    monkeypatch.setattr(pretrained, "load", load_then_signal)
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"interrupted: {signal.Signals(signum).name} before any step ran; nothing was lost (a resumed run's "
                    "checkpoint is as it was): run the same command again")
    monkeypatch.undo()
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 0  # the folder takes the rerun


@pytest.mark.slow
def test_a_stop_while_the_delta_is_written_lets_it_finish_then_skips_the_evaluation(model_dir, tmp_path, monkeypatch, capsys):
    real = train.save_delta

    def signal_then_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        real(*args, **kwargs)

    monkeypatch.setattr(train, "save_delta", signal_then_save)
    run = tmp_path / "run"
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(run)]) == 130
    assert "interrupted: after the delta was saved to" in capsys.readouterr().err
    assert read_delta(str(run / "delta.safetensors"))[0] and not (run / "results.json").exists()


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("command", [["train.py"], ["-m", "bitfit.infer.classify"]], ids=["a script", "a module"])
def test_ctrl_c_while_a_command_starts_is_one_line_and_exit_130(command):
    """Ctrl-C while torch and transformers import (seconds): at any moment, one line and 130, or the command ran."""
    interrupted = 0
    for delay in (0.3, 2.0):
        started = subprocess.Popen([sys.executable, *command, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        started.send_signal(signal.SIGINT)
        out, err = started.communicate(timeout=120)
        if started.returncode == 130:
            assert err == "interrupted\n" and not out
            interrupted += 1
        else:  # done before the signal came: the help, and nothing else (killed as Python exits: -SIGINT)
            assert started.returncode in (0, -signal.SIGINT) and "usage:" in out and "Traceback" not in err
    assert interrupted  # 0.3 s is inside the imports on any machine


@pytest.mark.parametrize(("argv", "orig_argv", "command"), [
    (["train.py"], None, True), (["generate.py"], None, True), (["/venv/bin/bitfit-train"], None, True),
    (["-m"], ["python", "-m", "bitfit.infer.classify", "--text", "a"], True),
    (["my_script.py"], None, False), (["-c"], ["python", "-c", "import bitfit"], False), ([""], None, False),
    (["-m"], ["python", "-m", "pytest", "-q"], False), (["/elsewhere/train.py"], None, False),
    (["-m"], ["python", "-X", "dev", "-mbitfit.export.merge"], True),
    (["my_script.py"], ["python", "my_script.py", "-m", "bitfit.x"], False),  # the script's own arguments
])
def test_only_bitfits_own_commands_change_what_ctrl_c_does_while_they_start(argv, orig_argv, command, monkeypatch):
    from bitfit.run import interrupt

    monkeypatch.chdir(REPO)  # python train.py is run in the checkout; a train.py elsewhere is someone else's
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv or ["python", *argv])
    assert interrupt.started_as_command() is command


@pytest.mark.slow
def test_resume_after_the_held_out_data_changed_is_refused_naming_it(model_dir, tmp_path, monkeypatch, capsys):
    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text(json.dumps({"instruction": "Add 1 and 2.", "output": "3"}) + "\n")
    run = tmp_path / "run"
    args = ["--model", model_dir, "--split", "train[:40]", "--eval-data", str(held_out), "--max-new-tokens", "2",
            "--lr", "1e-2", "--out-dir", str(run)]
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(args) == 130
    monkeypatch.undo()
    held_out.write_text(json.dumps({"instruction": "Add 1 and 2.", "output": "4"}) + "\n")  # its "before" is no longer of it
    capsys.readouterr()
    assert train.main(["--resume", str(run)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume {run}: the held-out data changed since the run started") and "restore them" in last
    assert not (run / "delta.safetensors").exists()


def test_a_checkpoint_an_earlier_bitfit_wrote_with_adamws_own_names_still_resumes_bitwise(model_dir, tmp_path, monkeypatch):
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "straight")]) == 0
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "stopped")]) == 130
    monkeypatch.undo()
    checkpoint = latest_checkpoint(tmp_path / "stopped")
    old_names = {"optimizer.0.exp_avg": "exp_avg", "optimizer.0.exp_avg_sq": "exp_avg_sq", "optimizer.0.step": "adam_step"}
    save_file({old_names.get(name, name): tensor.reshape(1) if name == "optimizer.0.step" else tensor  # then (1,)
               for name, tensor in load_file(checkpoint / "state.safetensors").items()}, str(checkpoint / "state.safetensors"))
    (checkpoint / "state.json").write_text(json.dumps({"step": 3, "bitfit": "0.1.0"}) + "\n")  # as it then was
    assert train.main(["--resume", str(tmp_path / "stopped")]) == 0
    (straight, _), (resumed, _) = outcome(tmp_path / "straight"), outcome(tmp_path / "stopped")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_a_signal_that_lands_in_a_finalizer_is_told_apart_so_it_can_be_delivered_again():
    import inspect

    from bitfit.run.interrupt import in_finalizer

    seen = []

    class Finalized:
        def __del__(self):
            seen.append(in_finalizer(inspect.currentframe()))

    Finalized()  # dropped at once: its __del__ runs here
    assert seen == [True] and not in_finalizer(inspect.currentframe())
