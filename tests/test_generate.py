import os
import time

import pytest
from test_train import saved

import generate
import train
from tiny import tiny_bloom, tiny_llama


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished train.py run on a tiny Llama: (its folder, the model folder it trained on)."""
    root = tmp_path_factory.mktemp("tiny_run")
    model_dir = saved(tiny_llama, root / "model")
    assert train.main(["--model", model_dir, "--split", "train[:16]", "--eval-split", "heldout[:2]",
                       "--max-new-tokens", "2", "--lr", "1e-1", "--out-dir", str(root / "run")]) == 0
    return root / "run", model_dir


@pytest.mark.slow
def test_generate_shows_base_and_tuned_answers_side_by_side_marking_each(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert generate.main(["--delta", str(run_dir / "delta.safetensors"), "-n", "3", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("BASE:") == 3 and out.count("TUNED:") == 3
    assert out.count("[right]") + out.count("[wrong]") == 6
    assert "(expected: " in out and "correct: base " in out


@pytest.mark.slow
def test_base_and_tuned_answers_differ_because_the_delta_is_applied(tiny_run):
    run_dir, _ = tiny_run
    result = generate.run(generate.parse_args(["--delta", str(run_dir / "delta.safetensors"), "-n", "4",
                                               "--max-new-tokens", "6"]))
    assert result["answers"]["BASE"] != result["answers"]["TUNED"]


@pytest.mark.slow
def test_a_single_prompt_is_streamed_and_not_repeated(tiny_run, capsys):
    run_dir, _ = tiny_run
    result = generate.run(generate.parse_args(["--delta", str(run_dir / "delta.safetensors"), "--prompt", "Add.",
                                               "--max-new-tokens", "3"]))
    out = capsys.readouterr().out
    assert out.count(" BASE: ") == 1 and out.count("TUNED: ") == 1
    assert result["checkable"] == 0  # a bare prompt has no expected answer to mark


@pytest.mark.slow
def test_sampling_with_the_same_seed_gives_the_same_answers(tiny_run):
    run_dir, _ = tiny_run
    args = ["--delta", str(run_dir / "delta.safetensors"), "-n", "3", "--max-new-tokens", "6", "--sample",
            "--temperature", "1.5", "--seed", "7"]
    assert generate.run(generate.parse_args(args))["answers"] == generate.run(generate.parse_args(args))["answers"]


@pytest.mark.slow
def test_prompts_come_from_a_text_file_one_per_line(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    (tmp_path / "prompts.txt").write_text("Say hi.\n\nSort these numbers.\n")
    result = generate.run(generate.parse_args(["--delta", str(run_dir / "delta.safetensors"), "--prompts-file",
                                               str(tmp_path / "prompts.txt"), "--max-new-tokens", "2"]))
    assert len(result["answers"]["BASE"]) == 2


@pytest.mark.slow
def test_a_delta_on_the_wrong_base_is_refused_naming_the_base_it_was_trained_on(tiny_run, tmp_path, capsys):
    run_dir, model_dir = tiny_run
    other = saved(tiny_bloom, tmp_path / "other")
    assert generate.main(["--delta", str(run_dir / "delta.safetensors"), "--model", other, "-n", "1"]) == 2
    assert f"this delta was trained on {model_dir!r}" in capsys.readouterr().err


def test_with_no_delta_the_latest_run_is_used(tmp_path):
    for name, age in (("older", 100), ("newer", 0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "delta.safetensors").write_bytes(b"")
        os.utime(tmp_path / name / "delta.safetensors", (time.time() - age,) * 2)
    assert generate.latest_delta(tmp_path) == tmp_path / "newer" / "delta.safetensors"


def test_no_run_at_all_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate.main([]) == 2
    assert "run `python train.py` first" in capsys.readouterr().err


def test_the_edges_of_every_checked_argument_are_accepted():
    args = generate.parse_args(["--max-new-tokens", "1", "-n", "1", "--top-p", "1", "--sample", "--temperature", "1e-3",
                                "--template", "chat", "--device", "cpu"])
    assert (args.max_new_tokens, args.n, args.top_p, args.temperature, args.template) == (1, 1, 1.0, 1e-3, "chat")


def test_a_temperature_of_0_without_sample_is_greedy_decoding_and_accepted():
    assert generate.parse_args(["--temperature", "0"]).sample is False


@pytest.mark.parametrize(("args", "message"), [
    (["--sample", "--temperature", "1e-300"], "--temperature 1e-300 is too small to sample with"),
    (["--seed", "18446744073709551616"], r"--seed must be in \[0, 2\*\*63\)"),
])
def test_a_value_past_what_sampling_can_use_is_refused_before_the_model_loads(args, message):
    with pytest.raises(generate.BitfitError, match=message):
        generate.parse_args(args)


def a_delta(tmp_path) -> tuple[str, str]:
    """(a delta of a tiny Llama whose biases moved, the folder of that Llama)."""
    import torch

    from bitfit.core.biases import add_missing_biases, select_biases
    from bitfit.core.flat import FlatBiases
    from bitfit.model import pretrained
    from bitfit.model.delta import save_delta

    model_dir = saved(tiny_llama, tmp_path / "llama")
    model, _ = pretrained.load(model_dir)
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model))
    with torch.no_grad():
        flat.values.add_(0.01)
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=model_dir, added=added)
    return str(tmp_path / "delta.safetensors"), model_dir


@pytest.mark.parametrize("prompts", [["--prompt", "Add."], ["-n", "2"]], ids=["streamed", "batched"])
@pytest.mark.parametrize("base", ["another decoder", "an encoder"])
def test_a_delta_or_model_that_cannot_answer_is_refused_before_anything_is_generated(base, prompts, tmp_path, capsys):
    from tiny import tiny_encoder

    delta, _ = a_delta(tmp_path)
    other = saved(tiny_bloom if base == "another decoder" else tiny_encoder, tmp_path / "other")
    assert generate.main(["--delta", delta, "--model", other, *prompts, "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert "BASE" not in out and "TUNED" not in out.replace(f"TUNED = {delta}", "")  # no answer of either
    said = "this delta was trained on" if base == "another decoder" else "is not a causal LM: its output at a token depends"
    assert said in err.strip().splitlines()[-1] and "Traceback" not in err


def test_train_refuses_an_encoder_for_the_lm_task_before_it_trains(tmp_path, capsys):
    from tiny import tiny_encoder

    encoder = saved(tiny_encoder, tmp_path / "bert")
    assert train.main(["--model", encoder, "--split", "train[:8]", "--eval-data", "none", "--out-dir", str(tmp_path / "run")]) == 2
    assert "is not a causal LM" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
