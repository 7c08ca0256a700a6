"""What a run shows besides its delta: held-out loss while it trains, the best step, the cached evaluation
of the untrained base, the loss curve and where the numbers came from."""

import json
import platform
import struct
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
import transformers
from test_train import saved

import bitfit.core.step
import train
from bitfit.run import evaluate
from tiny import tiny_llama

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--split", "train[:48]", "--eval-split", "heldout[:4]", "--max-new-tokens", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved(tiny_llama, tmp_path_factory.mktemp("model") / "llama")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
def test_eval_every_puts_the_held_out_loss_in_metrics_every_n_steps_and_results_name_the_best(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--eval-every", "2", "--eval-every-exact-match",
                       "--out-dir", str(out)]) == 0
    lines = metrics(out)
    # Steps 2 and 4 measured during training; step 6, the last, is the evaluation after training.
    assert [line["step"] for line in lines if "eval_loss" in line] == [2, 4]
    assert all(0 <= line["eval_exact_match"] <= 1 for line in lines if "eval_loss" in line)
    results = json.loads((out / "results.json").read_text())
    trained = [(line["step"], line["eval_loss"]) for line in lines if "eval_loss" in line] + [(6, results["after"]["loss"])]
    assert (results["best"]["step"], results["best"]["loss"]) == min(trained, key=lambda point: point[1])


@pytest.mark.slow
def test_every_metrics_line_has_its_time_and_tokens_per_second(model_dir, tmp_path):
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "3", "--out-dir", str(tmp_path / "run")]) == 0
    lines = metrics(tmp_path / "run")
    times = [datetime.fromisoformat(line["time"]) for line in lines]
    assert len(lines) == 3 and times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert all(line["tokens_per_s"] > 0 for line in lines)


@pytest.mark.slow
def test_a_second_run_on_the_same_base_and_held_out_data_reuses_the_cached_base_evaluation(model_dir, tmp_path, capsys):
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "1", "--out-dir", str(tmp_path / "first")]) == 0
    assert "; measured)" in capsys.readouterr().out
    [cached] = (tmp_path / "base-evals").iterdir()  # BITFIT_EVAL_CACHE (tests/conftest.py)
    # Mark the cached numbers, so the second run's can only have come from the cache.
    marked = {**json.loads(cached.read_text()), "exact_match": 0.125}
    cached.write_text(json.dumps(marked))
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "1", "--out-dir", str(tmp_path / "second")]) == 0
    assert f"cached in {cached}" in capsys.readouterr().out
    assert json.loads((tmp_path / "second" / "eval_before.json").read_text()) == marked


@pytest.mark.slow
@pytest.mark.parametrize("change", [["--eval-split", "heldout[4:8]"], ["--max-new-tokens", "3"], ["--seed", "1"]],
                         ids=["other held-out data", "other generation length", "other seed (same base)"])
def test_the_cached_base_evaluation_is_used_exactly_when_base_data_and_settings_match(model_dir, tmp_path, capsys, change):
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "1", "--out-dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert train.main(["--model", model_dir, *QUICK, *change, "--max-steps", "1", "--out-dir", str(tmp_path / "b")]) == 0
    same = change[0] == "--seed"  # the seed orders the training data; it does not change the untrained model
    assert ("cached in" in capsys.readouterr().out) == same


@pytest.mark.slow
def test_every_run_writes_a_loss_curve_png_and_records_where_it_ran(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--eval-every", "2", "--out-dir", str(out)]) == 0
    assert png_size(out / "loss.png") == (640, 360)
    results = json.loads((out / "results.json").read_text())
    assert results["software"] == {"python": platform.python_version(), "torch": torch.__version__,
                                   "transformers": transformers.__version__, "bitfit": "0.1.0"}
    on_gpu = results["device"].startswith("cuda")  # the run's own device: the suite passes on a CUDA machine too
    assert results["machine"]["gpu"] == (torch.cuda.get_device_name(torch.device(results["device"])) if on_gpu else None)
    assert results["machine"]["cpu"] and results["machine"]["cpu_cores"] >= 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:  # a git checkout (CI's clean clone is one)
        assert results["git_commit"].removesuffix("+dirty") == head


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["--eval-every", "2", "--eval-data", "none"], "--eval-every needs evaluation data"),
    (["--eval-every-exact-match"], "--eval-every-exact-match needs --eval-every N"),
    (["--eval-every", "-1"], "--eval-every must not be negative"),
])
def test_eval_every_without_something_to_measure_is_a_one_line_error(model_dir, tmp_path, capsys, args, message):
    assert train.main(["--model", model_dir, *QUICK, *args, "--out-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_non_finite_held_out_loss_stops_the_run_with_exit_3_and_is_never_saved(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "heldout_loss", lambda *args, **kwargs: float("nan"))
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 3
    assert "the held-out loss is nan" in capsys.readouterr().err
    assert not any("NaN" in path.read_text() for path in out.glob("*.json*"))


@pytest.mark.slow
def test_a_resumed_run_that_lost_its_untrained_evaluation_does_not_measure_the_trained_model_as_untrained(
        model_dir, tmp_path, monkeypatch, capsys):
    real, calls = bitfit.core.step.train_step, []

    def stop_after_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a crash in step 3: the checkpoint of step 2 stays
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(train, "train_step", stop_after_step_2)
    assert train.main(["--model", model_dir, *QUICK, "--save-every", "2", "--out-dir", str(out)]) == 130
    monkeypatch.undo()
    (out / "eval_before.json").unlink()
    for cached in (tmp_path / "base-evals").iterdir():
        cached.unlink()
    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 0
    assert "before training: not reported" in capsys.readouterr().out
    assert "before" not in json.loads((out / "results.json").read_text())
    assert not list((tmp_path / "base-evals").iterdir())  # nothing measured on trained biases entered the cache


@pytest.mark.slow
def test_a_hub_dataset_as_eval_data_needs_an_eval_split(model_dir, tmp_path, capsys):
    assert train.main(["--model", model_dir, "--eval-data", "someone/some-dataset", "--out-dir", str(tmp_path / "r")]) == 2
    assert "give --eval-split for a hub dataset" in capsys.readouterr().err


def tensorboard_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar, as TensorBoard itself reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


@pytest.mark.slow
def test_report_to_tensorboard_logs_each_step_as_metrics_jsonl_holds_it(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--eval-every", "2", "--report-to", "tensorboard",
                       "--out-dir", str(out)]) == 0
    lines = metrics(out)
    for tag, key in [("train/loss", "loss"), ("train/learning_rate", "lr"), ("train/grad_norm", "grad_norm"), ("eval/loss", "eval_loss")]:
        steps, values = tensorboard_scalars(out, tag)
        assert steps == [line["step"] for line in lines if key in line]
        assert values == pytest.approx([line[key] for line in lines if key in line], rel=1e-6)  # stored as float32


@pytest.mark.slow
def test_report_to_tensorboard_without_tensorboard_is_one_error_line_before_anything_loads(
        model_dir, tmp_path, monkeypatch, capsys):
    for name in ("tensorboard", "tensorboard.compat.proto", "tensorboard.summary.writer.record_writer"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed (imported or not)
    assert train.main(["--model", model_dir, *QUICK, "--report-to", "tensorboard", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report-to tensorboard needs TensorBoard") and "pip install tensorboard" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_to_tensorboard_once_with_the_values_it_kept(model_dir, tmp_path, monkeypatch):
    real, calls = bitfit.core.step.train_step, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # after step 3 was logged; the checkpoint is step 2's
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(train, "train_step", crash_in_step_4)
    assert train.main(["--model", model_dir, *QUICK, "--report-to", "tensorboard", "--save-every", "2",
                       "--out-dir", str(out)]) == 130
    monkeypatch.undo()
    assert train.main(["--resume", str(out)]) == 0
    lines = metrics(out)
    steps, values = tensorboard_scalars(out, "train/loss")
    assert steps == [line["step"] for line in lines] == list(range(1, 7))
    assert values == pytest.approx([line["loss"] for line in lines], rel=1e-6)


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_runs_tensorboard_events_with_the_new_ones(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--report-to", "tensorboard", "--max-steps", "2",
                       "--out-dir", str(out)]) == 0
    assert train.main(["--model", model_dir, *QUICK, "--report-to", "tensorboard", "--max-steps", "3", "--lr", "2e-2",
                       "--overwrite", "--out-dir", str(out)]) == 0
    steps, values = tensorboard_scalars(out, "train/loss")
    assert steps == [1, 2, 3] and values == pytest.approx([line["loss"] for line in metrics(out)], rel=1e-6)
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_tensorboard_on_a_full_disk_is_one_error_line_with_the_path_and_leaves_whole_events(small_disk, tmp_path):
    import contextlib

    from bitfit.core.errors import BitfitError
    from bitfit.run.report import tensorboard

    run = small_disk.path / "run"
    run.mkdir()
    with contextlib.ExitStack() as stack:
        write = tensorboard(run, 0, stack)
        write({"step": 1, "loss": 2.5, "lr": 1e-3})
        small_disk.fill()
        with pytest.raises(BitfitError, match=rf"cannot write {run}/tensorboard/events\.out\.tfevents\..+: the disk is full "
                                              r"\(\d+ B free there\)"):
            for step in range(2, 10_000):  # until the last free bytes are gone
                write({"step": step, "loss": 2.5, "lr": 1e-3})
    events = tensorboard_scalars(run, "train/loss")  # every event in the file is whole: TensorBoard reads them all
    assert events[0] == list(range(1, len(events[0]) + 1)) and events[1] == [2.5] * len(events[0])


def test_a_measure_added_to_the_step_record_reaches_every_sink_and_plot_with_no_other_edit(model_dir, tmp_path, monkeypatch, capsys):
    real = train.train_step

    def with_measures(model, flat, *args):  # a fork's one edit: two more numbers in the step's record
        return {**real(model, flat, *args), "bias_rms": flat.values.pow(2).mean().sqrt().item(), "nested": {"depth": 2}}

    monkeypatch.setattr(train, "train_step", with_measures)
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--log-every", "1", "--report-to", "tensorboard", "--out-dir", str(out)]) == 0
    lines = metrics(out)
    assert all("bias_rms" in line and line["nested/depth"] == 2 for line in lines)
    said = capsys.readouterr().out
    assert said.count(" | bias_rms ") == len(lines) and said.count(" | nested/depth 2") == len(lines)
    assert tensorboard_scalars(out, "train/nested/depth")[1] == [2.0] * len(lines)
    assert tensorboard_scalars(out, "train/bias_rms")[1] == pytest.approx([line["bias_rms"] for line in lines], rel=1e-6)
    width, height = png_size(out / "measures.png")  # a panel per measure, three to a row: lr, grad_norm... and both
    assert width == 960 and height >= 220 * -(-len(bitfit.run.report.numbers(lines[0])) // 3) - 1
