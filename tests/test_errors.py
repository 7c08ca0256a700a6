"""Every bad input gets a clear one-line error and exit code 2, never a traceback."""

import json
import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

import generate
import train
from bitfit.config import parser
from test_train import saved
from tiny import _trained_bpe, tiny_bloom, tiny_llama

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--eval-split", "heldout[:2]", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved(tiny_bloom, tmp_path_factory.mktemp("model") / "bloom")


def fails_with(capsys, code: int, message: str) -> None:
    """The run ended with `code`, and stderr's last line is one 'error: ...' line matching `message`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    assert re.search(message, last), last


def data_file(tmp_path, name: str, content: str) -> str:
    (tmp_path / name).write_text(content)
    return str(tmp_path / name)


def run_on(model_dir, tmp_path, *args) -> int:
    return train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "run"), *args])


RECORD = {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "data file not found: .*missing.json"),
        ("data.json", "this is not JSON", "not valid JSON"),
        ("data.jsonl", '{"instruction": "a", "output": "b"}\n{broken', "line 2 is not valid JSON"),
        ("data.jsonl", "", "holds no records"),
        ("data.json", json.dumps([RECORD, {"input": "x", "output": "y"}]), "row 1: no 'instruction' field"),
        ("data.json", json.dumps([{"instruction": "a"}]), "row 0: no 'output' field"),
        ("data.json", json.dumps([{**RECORD, "output": 42}]), "row 0: 'output' must be a string, found int"),
        ("data.json", json.dumps([{**RECORD, "input": None}]), "row 0: 'input' must be a string, found NoneType"),
    ],
)
def test_bad_data_is_a_one_line_error_naming_the_file_or_row(name, content, message, model_dir, tmp_path, capsys):
    path = str(tmp_path / name) if content is None else data_file(tmp_path, name, content)
    assert run_on(model_dir, tmp_path, "--data", path) == 2
    fails_with(capsys, 2, message)


def test_max_len_too_small_for_any_prompt_is_an_error_after_counting_the_drops(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--split", "train[:16]", "--max-len", "8") == 2
    fails_with(capsys, 2, r"no usable examples .*16 dropped because max_len 8 cut away their whole response")


def test_examples_cut_away_by_max_len_are_dropped_counted_and_the_run_goes_on(model_dir, tmp_path, capsys):
    long_prompt = {"instruction": "Sort these numbers. " * 30, "input": "3 1", "output": "1 3"}
    path = data_file(tmp_path, "data.jsonl", "\n".join(json.dumps(r) for r in [long_prompt] + [RECORD] * 8))
    assert run_on(model_dir, tmp_path, "--data", path, "--max-len", "48", "--eval-data", "builtin") == 0
    assert "8 examples from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["dropped"] == 1


def test_a_model_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    assert run_on(str(tmp_path / "no-such-model"), tmp_path) == 2
    fails_with(capsys, 2, "could not load model .*no-such-model")


def test_a_tokenizer_without_eos_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_bloom().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(), pad_token="<pad>").save_pretrained(folder)
    assert run_on(str(folder), tmp_path) == 2
    fails_with(capsys, 2, "the tokenizer has no eos token")


def test_an_output_directory_that_cannot_be_written_is_a_one_line_error(model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "a_file" / "run")]) == 2
    fails_with(capsys, 2, "cannot write to the output directory")


def test_the_packed_layout_on_a_model_without_position_ids_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--layout", "packed") == 2  # model_dir holds a BLOOM: ALiBi, no position ids
    fails_with(capsys, 2, "--layout packed: BloomForCausalLM takes no position ids .*; use --layout padded")


def test_a_bad_layout_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--layout", "pack") == 2
    fails_with(capsys, 2, "--layout must be one of")


def test_an_unknown_bias_selection_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--biases", "h.(0") == 2
    fails_with(capsys, 2, "neither 'all', 'reduced' nor a valid regular expression")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(["--model", model_dir, "--split", "train[:8]", *QUICK, "--out-dir", str(run_dir)]) == 0
    return run_dir


def corrupt(delta: Path, how: str, tmp_path: Path) -> Path:
    data = delta.read_bytes()
    out = tmp_path / "delta.safetensors"
    out.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * 8 + data[8:])
    return out


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_a_truncated_or_corrupt_delta_is_a_one_line_error(how, finished_run, tmp_path, capsys):
    bad = corrupt(finished_run / "delta.safetensors", how, tmp_path)
    assert generate.main(["--delta", str(bad), "-n", "1"]) == 2
    fails_with(capsys, 2, "not a readable safetensors file, corrupt or truncated")


def test_a_delta_of_another_model_shape_is_a_one_line_error(finished_run, tmp_path, capsys):
    llama = saved(tiny_llama, tmp_path / "llama")
    assert generate.main(["--delta", str(finished_run / "delta.safetensors"), "--model", llama, "-n", "1"]) == 2
    fails_with(capsys, 2, "this delta was trained on")


def test_a_delta_of_another_base_fingerprint_is_a_one_line_error(finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_bloom(seed=5).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        source = Path(json.loads((finished_run / "config.json").read_text())["model"]) / name
        (other / name).write_bytes(source.read_bytes())
    assert generate.main(["--delta", str(finished_run / "delta.safetensors"), "--model", str(other), "-n", "1"]) == 2
    fails_with(capsys, 2, "this model's fingerprint is .* but this delta was trained on")


def test_bitfit_never_unpickles_and_never_trusts_remote_code_by_default():
    sources = [*REPO.glob("bitfit/*.py"), REPO / "train.py", REPO / "generate.py"]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"import pickle|from pickle|torch\.load\(|import dill", text), path
        assert "trust_remote_code=True" not in text, path
    assert parser().parse_args([]).trust_remote_code is False
    assert generate.parse_args([]).trust_remote_code is False
