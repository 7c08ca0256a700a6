"""How things fail: a diverged model, a full disk, out of memory, a file broken on the disk. Never a
traceback, never a file named like a result that is not one, never a user's file deleted."""

import json
import re

import pytest
import torch
from test_reliability import interrupted_run
from test_train import saved

import bitfit.core.step
import generate
import train
from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.export import adapter, merge
from bitfit.model import pretrained
from bitfit.model.delta import read_delta, save_delta
from bitfit.run import evaluate, report
from tiny import tiny_llama

# 40 examples = 5 optimizer steps of 8; evaluation on 2 held-out questions
ARGS = ["--split", "train[:40]", "--eval-split", "heldout[:2]", "--max-new-tokens", "2", "--lr", "1e-2"]
HUGE = 3e38  # a finite float32 bias that overflows any activation it reaches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved(tiny_llama, tmp_path_factory.mktemp("model") / "llama")


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --- a diverged model is never a result -------------------------------------------------------------

def huge_biases_after_the_last_step(monkeypatch, steps: int = 5) -> None:
    """The last optimizer step leaves every bias huge but finite: the biases pass every finiteness check,
    the model's logits are NaN."""
    real, calls = bitfit.core.step.train_step, []

    def train_step(model, flat, *args, **kwargs):
        record = real(model, flat, *args, **kwargs)
        calls.append(1)
        if len(calls) == steps:
            with torch.no_grad():
                flat.values.fill_(HUGE)
        return record

    monkeypatch.setattr(train, "train_step", train_step)


@pytest.mark.slow
def test_a_run_whose_outputs_diverged_exits_3_and_leaves_no_file_named_like_a_result(model_dir, tmp_path, monkeypatch, capsys):
    huge_biases_after_the_last_step(monkeypatch)
    run = tmp_path / "runs" / "run"
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(run)]) == 3
    assert re.search(r"after step 5, its logits hold NaN or inf .*: the biases diverged and no delta was written",
                     last_error(capsys))
    assert not (run / "delta.safetensors").exists() and not (run / "results.json").exists()
    with pytest.raises(BitfitError, match="no finished run"):  # a plain `python generate.py` finds nothing to use
        generate.latest_delta(tmp_path / "runs")


@pytest.mark.slow
def test_a_non_finite_held_out_loss_after_training_deletes_the_delta_written_before_it(model_dir, tmp_path, monkeypatch, capsys):
    real, calls = evaluate.heldout_loss, []

    def nan_after_training(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 2 else real(*args, **kwargs)  # 1: before training, 2: after

    monkeypatch.setattr(evaluate, "heldout_loss", nan_after_training)
    run = tmp_path / "run"
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(run)]) == 3
    assert "the tuned model is broken on the held-out data, so its delta was deleted" in last_error(capsys)
    assert not (run / "delta.safetensors").exists() and not (run / "results.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5  # the record of what happened stays


@pytest.fixture(scope="module")
def broken_delta(model_dir, tmp_path_factory) -> str:
    """A delta of finite but huge values on `model_dir`: every check of the file passes, the tuned model's
    logits are NaN."""
    model, _ = pretrained.load(model_dir)
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model))
    with torch.no_grad():
        flat.values.fill_(HUGE)
    path = tmp_path_factory.mktemp("broken") / "delta.safetensors"
    save_delta(str(path), model, flat, base_model=model_dir, added=added)
    return str(path)


@pytest.mark.parametrize("tool", ["generate one", "generate side by side", "merge", "adapter"])
def test_every_tool_refuses_a_delta_whose_tuned_model_gives_non_finite_outputs(tool, broken_delta, tmp_path, capsys):
    read_delta(broken_delta)  # a well-formed file: only running the model shows it is broken
    out = tmp_path / "out"
    code = {"generate one": lambda: generate.main(["--delta", broken_delta, "--prompt", "Hi", "--max-new-tokens", "2"]),
            "generate side by side": lambda: generate.main(["--delta", broken_delta, "--delta", broken_delta, "-n", "2",
                                                            "--max-new-tokens", "2"]),
            "merge": lambda: merge.main(["--delta", broken_delta, "--out", str(out)]),
            "adapter": lambda: adapter.main(["--delta", broken_delta, "--out", str(out)])}[tool]()
    assert code == 2
    assert re.search(r"is broken: its logits hold NaN or inf on \d+ of \d+ probe inputs", last_error(capsys))
    assert not out.exists()


def test_the_best_step_is_the_untrained_base_when_no_trained_step_beats_it():
    assert report.best_step([{"step": 0, "loss": 1.0}, {"step": 5, "loss": 1.2}, {"step": 10, "loss": 1.1}])["step"] == 0
    assert report.best_step([{"step": 0, "loss": 1.0}, {"step": 5, "loss": 1.0}])["step"] == 5  # a tie: trained
    assert report.best_step([{"step": 0, "loss": 1.0}]) is None  # nothing trained to choose


# --- a full disk ------------------------------------------------------------------------------------

# Pages left, and the write that fails here (tmpfs, 2026): the folder's marker, config.json, inputs.json,
# eval_before.json, metrics.jsonl, checkpoints 2 and 4, the delta, loss.png; and none.
@pytest.mark.slow
@pytest.mark.parametrize("pages", [0, 1, 2, 3, 4, 5, 10, 13, 16, 24])
def test_a_full_disk_at_any_write_of_a_run_is_one_error_line_and_leaves_no_half_written_file(pages, model_dir, small_disk, capsys):
    """The disk fills with `pages` 4 KiB pages left: each value makes another write of the run fail. A
    delta written whole before the failure stays: training succeeded, and it passed every check."""
    small_disk.fill(leave=pages * 4096)
    run = small_disk.path / "run"
    code = train.main(["--model", model_dir, *ARGS, "--save-every", "2", "--out-dir", str(run)])
    if code == 0:  # it all fit
        assert (run / "results.json").is_file()
        return
    assert code == 2
    said = re.fullmatch(rf"error: cannot write {small_disk.path}/.+: the disk is full \(\d+ B free there\)"
                        rf"(; the trained delta is whole in {run}/delta.safetensors, its report is not written)?",
                        last_error(capsys))
    assert said
    assert bool(said[1]) == (run / "delta.safetensors").exists()  # said exactly when it is there
    if not run.exists():  # it failed before a step was recorded: the folder is given back
        return
    hidden = [p.name for p in run.rglob(".*") if p.name != ".bitfit-run"]
    assert hidden == [], "a temporary file or folder was left behind"
    for path in run.glob("*.json"):
        json.loads(path.read_text())  # whole, or not there
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # whole lines only
    if (run / "delta.safetensors").exists():
        read_delta(str(run / "delta.safetensors"))
    assert not (run / "results.json").exists()  # the last thing written: no run that failed says it finished


@pytest.mark.slow
@pytest.mark.parametrize("tool", [merge, adapter])
def test_a_full_disk_while_merging_or_exporting_is_one_error_line_and_leaves_nothing(tool, model_dir, small_disk, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--model", model_dir, *ARGS, "--eval-data", "none", "--out-dir", str(run)]) == 0
    small_disk.fill()
    out = small_disk.path / "out"
    assert tool.main(["--delta", str(run / "delta.safetensors"), "--out", str(out)]) == 2
    assert re.fullmatch(rf"error: cannot write {out}: the disk is full \(\d+ B free there\)", last_error(capsys))
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["filler"]


# --- out of memory ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("memory", ["host", "gpu"])
def test_running_out_of_memory_is_one_error_line_naming_the_flags_that_lower_it(memory, model_dir, tmp_path, monkeypatch, capsys):
    def allocate_too_much(model, batch):
        if memory == "host":
            torch.empty(2**42, dtype=torch.uint8)  # 4 TiB: torch's CPU allocator refuses it, as it does at a real limit
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")  # what torch raises on a GPU

    monkeypatch.setattr(bitfit.core.step, "loss_sum", allocate_too_much)
    assert train.main(["--model", model_dir, *ARGS, "--out-dir", str(tmp_path / "run")]) == 2
    last = last_error(capsys)
    assert last.startswith("error: out of memory (")
    assert "--max-pass-tokens 256 here, and halving it about halves them" in last and "--max-len 256" in last
    assert not (tmp_path / "run").exists()  # failed before a step was recorded: the folder is given back


# --- files read back --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("content", ["", "{", "[]", '{"lr": "fast"}', '{"colour": "blue"}', '{"epochs": 1.5}'])
def test_resuming_with_a_broken_config_json_is_one_error_line(content, model_dir, tmp_path, monkeypatch, capsys):
    run = interrupted_run(model_dir, tmp_path, monkeypatch)
    (run / "config.json").write_text(content)
    assert train.main(["--resume", str(run)]) == 2
    assert last_error(capsys).startswith(f"error: --resume {run}: its config.json, the config the run started with, is broken (")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "content", "message"), [
    ("inputs.json", "", "inputs.json cannot be read"),
    ("inputs.json", '{"model": 3}', "inputs.json does not hold the model and training data hashes"),
    ("metrics.jsonl", '{"step": 1, "loss": 1.0}\n{"step": 7, "loss": 1.0}\n{"step": 3, "loss": NaN}\n',
     "metrics.jsonl line 2 is not the record of step 2 that bitfit wrote"),
    ("metrics.jsonl", "\n", "metrics.jsonl line 1 is not the record of step 1"),
    ("metrics.jsonl", '{"step": 1, "loss": 1.0, "eval_loss": "oops"}\n', "metrics.jsonl line 1 is not the record of step 1"),
    ("metrics.jsonl", '{"step": 1, "loss": 1' + "0" * 400 + '}\n', "metrics.jsonl line 1 is not the record of step 1"),
    ("metrics.jsonl", "[" * 100000 + "]" * 100000, "metrics.jsonl line 1 is not the record of step 1"),
    ("config.json", '{"lr": 1' + "0" * 400 + "}", "its config.json, the config the run started with, is broken"),
    ("config.json", "[" * 100000 + "]" * 100000, "its config.json, the config the run started with, is broken"),
    ("inputs.json", None, "its inputs.json is gone"),
    ("metrics.jsonl", '{"step": 1, "loss": 1.0}\n', "metrics.jsonl holds 1 steps and the checkpoint 3"),
])
def test_resuming_with_a_broken_or_missing_file_of_the_run_is_one_error_line(name, content, message, model_dir, tmp_path, monkeypatch, capsys):
    run = interrupted_run(model_dir, tmp_path, monkeypatch)
    (run / name).unlink() if content is None else (run / name).write_text(content)
    assert train.main(["--resume", str(run)]) == 2
    assert message in last_error(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [
    lambda entry: "",
    lambda entry: "{",
    lambda entry: json.dumps({**entry, "loss": "NaN"}),
    lambda entry: json.dumps(entry).replace(str(entry["loss"]), "NaN"),
    lambda entry: json.dumps({key: value for key, value in entry.items() if key != "samples"}),
    lambda entry: json.dumps({**entry, "exact_match": 7}),
    lambda entry: json.dumps({**entry, "note": float("nan")}),
    lambda entry: json.dumps({**entry, "loss": 10**400}),
    lambda entry: "[" * 100000 + "]" * 100000,
], ids=["empty", "truncated", "string loss", "NaN loss", "no samples", "share above 1", "NaN elsewhere", "huge int",
        "too deep"])
def test_a_broken_cached_evaluation_is_measured_again_and_the_log_says_why(damage, model_dir, tmp_path, capsys):
    def before(run: str) -> dict:
        assert train.main(["--model", model_dir, *ARGS, "--max-steps", "1", "--out-dir", str(tmp_path / run)]) == 0
        measured = json.loads((tmp_path / run / "results.json").read_text())["before"]
        return {key: value for key, value in measured.items() if key != "seconds"}

    first = before("first")
    [entry] = (tmp_path / "base-evals").iterdir()  # conftest: this test's own cache
    entry.write_text(damage(json.loads(entry.read_text())))
    capsys.readouterr()
    assert before("second") == first
    out = capsys.readouterr().out
    assert f"ignoring the stored evaluation {entry}: " in out and "; measured)" in out
    assert evaluate.stored_evaluation_problem(json.loads(entry.read_text())) is None  # written anew, valid
