"""Every bad input gets a clear one-line error and exit code 2, never a traceback."""

import json
import os
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import save_file
from test_merge import files
from test_train import saved
from transformers import PreTrainedTokenizerFast

import generate
import train
from bitfit.data import packing
from bitfit.export import merge
from bitfit.model import pretrained
from bitfit.model.delta import read_delta
from bitfit.run.config import parser
from tiny import _trained_bpe, tiny_bloom, tiny_llama, tiny_tokenizer

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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "no such file or folder: .*missing.json"),
        ("data.json", "this is not JSON", "not valid JSON"),
        ("data.jsonl", '{"instruction": "a", "output": "b"}\n{broken', "data.jsonl line 2 is not valid JSON"),
        ("DATA.JSONL", '{"instruction": "a", "output": "b"}\n{broken', "DATA.JSONL line 2 is not valid JSON"),
        ("data.jsonl", "", "holds no records"),
        ("data.json", json.dumps([RECORD, {"input": "x", "output": "y"}]), "data.json element 1: no 'instruction' field"),
        ("data.json", json.dumps([{"instruction": "a"}]), "data.json element 0: no 'output' field"),
        ("data.json", json.dumps([{**RECORD, "output": 42}]), "element 0: 'output' must be a string, found int"),
        ("data.json", json.dumps([{**RECORD, "output": None}]), "element 0: 'output' must be a string, found NoneType"),
        ("data.jsonl", "\n\n" + json.dumps({**RECORD, "output": "\ud800"}), "data.jsonl line 3: 'output' holds a lone surrogate"),
        ("data.jsonl", json.dumps({"question": "hi"}), "line 1: a row needs the fields instruction/input/output .*, messages"),
        ("data.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "line 1: 'messages' has no assistant turn"),
        ("notes.txt", "hello", "notes.txt: a data file must be .json, .jsonl, .csv or .parquet, not .txt"),
        ("data.csv", "instruction,input,output\nSay hi.,,hi\nBad,row\n", r"data.csv line 3: 2 fields, but the header \(line 1\) names 3"),
        ("data.csv", 'instruction,output\n"two\nlines",ok\nshort\n', "data.csv line 4: 1 fields"),  # a record's own line
        ("data.csv", 'messages\n"not json"\n', "data.csv line 2: a 'messages' cell holds the conversation as JSON text"),
        ("data.csv", "instruction,instruction\na,b\n", "data.csv line 1: the header must name every field once"),
        ("data.csv", 'instruction,output\nAdd 1 2,"3\nAdd 2 2,4\n', r"data.csv line 2: not valid CSV \(unexpected end of data"),
        ("data.csv", 'instruction,output\nAdd 1 2,"3"x\n', "data.csv line 2: not valid CSV"),
        ("data.jsonl", "[" * 100000 + "]" * 100000, r"data.jsonl line 1 is not valid JSON \(nested too deeply to read\)"),
        ("data.jsonl", '{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}", "data.jsonl line 1 is not valid JSON"),
        ("data.csv", "prompt,output\na,b\n", "data.csv line 2: a row has the fields of one shape"),
        ("data.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "2+2"},
                                                {"role": "assistant", "content": "4"}]}),
         r"line 1: messages\[0\] is an assistant turn with nothing before it; .* start the conversation with a user"),
    ],
)
def test_bad_data_is_a_one_line_error_naming_the_file_or_row(name, content, message, model_dir, tmp_path, capsys):
    path = str(tmp_path / name) if content is None else data_file(tmp_path, name, content)
    assert run_on(model_dir, tmp_path, "--data", path) == 2
    fails_with(capsys, 2, message)


@pytest.mark.slow
def test_a_data_file_with_invalid_utf8_is_a_one_line_error_naming_its_line(model_dir, tmp_path, capsys):
    latin1 = b'{"instruction": "Say hi.", "output": "caf\xe9"}'  # "café" saved as Latin-1, not UTF-8
    (tmp_path / "data.jsonl").write_bytes(json.dumps(RECORD).encode() + b"\n" + latin1 + b"\n")
    assert run_on(model_dir, tmp_path, "--data", str(tmp_path / "data.jsonl")) == 2
    position = latin1.index(0xE9) + 1  # counted from 1, in bytes
    fails_with(capsys, 2, f"data.jsonl line 2 is not valid UTF-8 \\(byte 0xe9 at position {position}\\); save the file as UTF-8")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", ""], "training data: no data source given"),
        (["--data", "folder"], "folder is a folder, but not one written by Dataset.save_to_disk"),
        (["--data", "./no/such/folder"], "no such file or folder: no/such/folder"),
        (["--split", "train[%:]"], "split 'train\\[%:\\]' is not of the form NAME or NAME\\[START:END\\]"),
        (["--data", "data.jsonl", "--split", "test[:10]"], "data.jsonl is a data file, which has one split, 'train'"),
    ],
)
def test_a_bad_data_flag_is_a_one_line_error(flags, message, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    data_file(tmp_path, "data.jsonl", json.dumps(RECORD))
    assert run_on(model_dir, tmp_path, *flags) == 2
    fails_with(capsys, 2, message)


@pytest.mark.slow
def test_an_error_in_the_evaluation_data_is_a_one_line_error_saying_so(model_dir, tmp_path, capsys):
    path = data_file(tmp_path, "eval.jsonl", json.dumps(RECORD) + "\n" + json.dumps({"instruction": "Say hi."}))
    assert run_on(model_dir, tmp_path, "--eval-data", path, "--eval-split", "train") == 2
    fails_with(capsys, 2, "^error: evaluation data: .*eval.jsonl line 2: no 'output' field")


@pytest.mark.slow
def test_an_evaluation_set_whose_examples_are_all_dropped_is_a_one_line_error_saying_so(model_dir, tmp_path, capsys):
    long_prompt = {"instruction": "Sort these numbers. " * 30, "input": "3 1", "output": "1 3"}
    path = data_file(tmp_path, "eval.jsonl", json.dumps(long_prompt))
    assert run_on(model_dir, tmp_path, "--eval-data", path, "--eval-split", "train", "--max-len", "48") == 2
    fails_with(capsys, 2, "^error: evaluation data: no usable examples in .*eval.jsonl train: 1 dropped")


@pytest.mark.slow
def test_a_hub_that_cannot_be_reached_is_a_one_line_error(model_dir, tmp_path, capsys, hub, monkeypatch):
    hub.down()
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: (_ for _ in ()).throw(ConnectionError("offline")))
    assert run_on(model_dir, tmp_path, "--data", "yahma/alpaca-cleaned") == 2
    fails_with(capsys, 2, "the hub \\(huggingface.co\\) cannot be reached .* pass a local file or folder instead")


@pytest.mark.slow
def test_max_len_too_small_for_any_prompt_is_an_error_after_counting_the_drops(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--split", "train[:16]", "--max-len", "8") == 2
    fails_with(capsys, 2, r"no usable examples .*16 dropped because max_len 8 cut away their whole response")


@pytest.mark.slow
def test_examples_cut_away_by_max_len_are_dropped_counted_and_the_run_goes_on(model_dir, tmp_path, capsys):
    long_prompt = {"instruction": "Sort these numbers. " * 30, "input": "3 1", "output": "1 3"}
    path = data_file(tmp_path, "data.jsonl", "\n".join(json.dumps(r) for r in [long_prompt] + [RECORD] * 8))
    assert run_on(model_dir, tmp_path, "--data", path, "--max-len", "48", "--eval-data", "builtin") == 0
    assert "8 examples from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["dropped"] == 1


@pytest.mark.slow
def test_a_model_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    assert run_on(str(tmp_path / "no-such-model"), tmp_path) == 2
    fails_with(capsys, 2, "no such model folder: .*no-such-model")


@pytest.mark.slow
def test_a_hub_model_without_a_hub_is_a_one_line_error_at_once(tmp_path, capsys, hub):
    hub.down()
    assert run_on("bigscience/bloomz-1b1", tmp_path) == 2
    fails_with(capsys, 2, "the hub \\(huggingface.co\\) cannot be reached and the model 'bigscience/bloomz-1b1' is not")


def broken_model_folders(folder: Path) -> dict[str, tuple[Path, str]]:
    """Model folders that cannot load, each with (its path, the error expected)."""
    def made(name: str, change) -> Path:
        copy = folder.parent / name
        shutil.copytree(folder, copy)
        change(copy)
        return copy

    weights = folder / "model.safetensors"
    return {
        "empty": (made("empty", lambda f: [p.unlink() for p in f.iterdir()]), "its config.json cannot be read"),
        "truncated weights": (made("truncated", lambda f: (f / "model.safetensors").write_bytes(weights.read_bytes()[:1000])),
                              "could not load model"),
        "random weights": (made("random", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096))), "could not load model"),
        "config a list": (made("list", lambda f: (f / "config.json").write_text("[]")), "is not a JSON object"),
        "unknown model_type": (made("unknown", lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((folder / "config.json").read_text()), "model_type": "no-such-arch"}))), "could not load model"),
        "custom code": (made("custom", lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((folder / "config.json").read_text()), "model_type": "custom-arch",
             "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"}}))),
            "contains custom code .*; pass --trust-remote-code if you trust that code"),
    }


@pytest.mark.slow
def test_a_model_folder_that_cannot_load_is_a_one_line_error(tmp_path, capsys):
    for case, (folder, message) in broken_model_folders(Path(saved(tiny_bloom, tmp_path / "good"))).items():
        assert run_on(str(folder), tmp_path, "--out-dir", str(tmp_path / "runs" / case)) == 2, case
        fails_with(capsys, 2, message)


@pytest.mark.slow
def test_pickle_weights_are_refused_unless_trusted_by_name(tmp_path, capsys):
    folder = tmp_path / "pickled"
    model = tiny_bloom()
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # how older checkpoints ship their weights
    tiny_tokenizer(padding_side="left").save_pretrained(folder)
    assert run_on(str(folder), tmp_path) == 2
    fails_with(capsys, 2, "holds its weights only as pickle \\(pytorch_model.bin\\), and loading pickle can run any code")
    assert run_on(str(folder), tmp_path, "--trust-pickle-weights", "--max-steps", "1") == 0


@pytest.mark.slow
def test_a_tokenizer_without_eos_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_bloom().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(), pad_token="<pad>").save_pretrained(folder)
    assert run_on(str(folder), tmp_path) == 2
    fails_with(capsys, 2, "the tokenizer has no eos token")


@pytest.mark.slow
def test_an_output_directory_that_cannot_be_written_is_a_one_line_error(model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "a_file" / "run")]) == 2
    fails_with(capsys, 2, "cannot write .*a_file/run: Not a directory")


@pytest.mark.slow
def test_the_packed_layout_on_a_model_that_cannot_pack_is_a_one_line_error(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(packing, "use_packed_alibi", lambda model: False)  # a BLOOM without ALiBi: no positions
    assert run_on(model_dir, tmp_path, "--layout", "packed") == 2
    fails_with(capsys, 2, "--layout packed: BloomForCausalLM takes no position ids and has no ALiBi.*; use --layout padded")


@pytest.mark.slow
def test_a_warmup_as_long_as_the_run_is_refused_before_training(model_dir, tmp_path, capsys):
    # Its first step's lr is 0 and it never reaches --lr: a 1-step run would train nothing at all.
    assert run_on(model_dir, tmp_path, "--max-steps", "2", "--warmup-steps", "2") == 2
    fails_with(capsys, 2, "--warmup-steps 2: the run has 2 optimizer step\\(s\\), so its lr would never reach --lr")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_bad_layout_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--layout", "pack") == 2
    fails_with(capsys, 2, "--layout must be one of")


@pytest.mark.slow
def test_an_unknown_bias_selection_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--biases", "h.(0") == 2
    fails_with(capsys, 2, "neither 'all', 'reduced', a comma list of the bias groups query, key, value, attention-output, "
                          "intermediate, output, layernorm nor a valid regular expression")


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


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_a_truncated_or_corrupt_delta_is_a_one_line_error(how, finished_run, tmp_path, capsys):
    bad = corrupt(finished_run / "delta.safetensors", how, tmp_path)
    assert generate.main(["--delta", str(bad), "-n", "1"]) == 2
    fails_with(capsys, 2, "not a readable safetensors file, corrupt or truncated")


@pytest.mark.slow
def test_a_prompts_file_with_invalid_utf8_is_a_one_line_error_naming_its_line(finished_run, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"Say hi.\nSay caf\xe9.\n")  # Latin-1, not UTF-8
    assert generate.main(["--delta", str(finished_run / "delta.safetensors"), "--prompts-file",
                          str(tmp_path / "prompts.txt")]) == 2
    fails_with(capsys, 2, "prompts.txt line 2 is not valid UTF-8")


@pytest.mark.slow
def test_a_delta_of_another_model_shape_is_a_one_line_error(finished_run, tmp_path, capsys):
    llama = saved(tiny_llama, tmp_path / "llama")
    assert generate.main(["--delta", str(finished_run / "delta.safetensors"), "--model", llama, "-n", "1"]) == 2
    fails_with(capsys, 2, "this delta was trained on")


@pytest.mark.slow
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


def only_line_is_error(capsys, message: str) -> None:
    """stderr is exactly one line, 'error: ...' matching `message`: no usage block, no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, not -3"),
        (["--sample", "--temperature", "0"], "--temperature must be a finite number above 0 with --sample, not 0.0"),
        (["--sample", "--temperature", "-1"], "--temperature must be a finite number above 0 with --sample"),
        (["--sample", "--temperature", "inf"], "--temperature must be a finite number above 0 with --sample"),
        (["--sample", "--temperature", "nan"], "--temperature must be a finite number above 0 with --sample"),
        (["--top-p", "0"], r"--top-p must be above 0 and at most 1, not 0.0"),
        (["--top-p", "1.5"], r"--top-p must be above 0 and at most 1, not 1.5"),
        (["--top-p", "nan"], r"--top-p must be above 0 and at most 1, not nan"),
        (["--template", "alpacca"], "--template must be 'alpaca', 'chat' or ''"),
        (["-n", "0"], "-n must be at least 1, not 0"),
        (["-n", "-2"], "-n must be at least 1, not -2"),
        (["--device", "tpu"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not 'tpu'"),
        (["--device", "cuda:abc"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not 'cuda:abc'"),
        (["--device", "meta"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not 'meta'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-n", "x"], "argument -n: invalid int value: 'x'"),
        (["--max-new-tokens"], "argument --max-new-tokens: expected one argument"),
    ],
)
def test_a_bad_generate_argument_is_one_error_line_and_exit_code_2(args, message, capsys):
    assert generate.main(args) == 2  # refused before any delta is looked for or model loaded
    only_line_is_error(capsys, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: --delta, --out"),
        (["--delta", "d.safetensors", "--out", "merged", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_merge_argument_is_one_error_line_and_exit_code_2(args, message, capsys):
    assert merge.main(args) == 2
    only_line_is_error(capsys, message)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["the base model's folder", "the run folder", "a file", "a path inside a file"])
def test_merge_refuses_an_out_that_is_not_a_new_or_empty_folder_and_leaves_it_byte_identical(
    victim, model_dir, finished_run, tmp_path, capsys
):
    (tmp_path / "notes.txt").write_text("my notes")
    out = {"the base model's folder": Path(model_dir), "the run folder": finished_run, "a file": tmp_path / "notes.txt",
           "a path inside a file": tmp_path / "notes.txt" / "merged"}[victim]
    watched = [Path(model_dir), finished_run, tmp_path]
    before = [files(folder) for folder in watched]
    assert merge.main(["--delta", str(finished_run / "delta.safetensors"), "--out", str(out)]) == 2
    only_line_is_error(capsys, "is a folder that is not empty|is a file|is not a folder this user may write in")
    assert [files(folder) for folder in watched] == before


@pytest.mark.slow
def test_a_delta_holding_a_nan_is_a_one_line_error_for_generate_and_merge(finished_run, tmp_path, capsys):
    tensors, metadata = read_delta(str(finished_run / "delta.safetensors"))
    name = next(iter(tensors))
    tensors[name][0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    assert generate.main(["--delta", str(tmp_path / "nan.safetensors"), "-n", "1"]) == 2
    only_line_is_error(capsys, f"not a valid bitfit delta: {re.escape(name)} holds NaN or inf values")
    assert merge.main(["--delta", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "merged")]) == 2
    only_line_is_error(capsys, f"not a valid bitfit delta: {re.escape(name)} holds NaN or inf values")
    assert not (tmp_path / "merged").exists()


# --- values that look valid but destroy or never end ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "0.5"], r"--lr 0.5 is above 0.1: AdamW moves every bias by up to about lr per step"),
    (["--weight-decay", "100"], r"--lr 0.005 x --weight-decay 100 = 0.5 is above 0.01: each step multiplies every bias"),
    (["--lr", "0.1", "--weight-decay", "1"], r"= 0.1 is above 0.01"),
])
def test_a_flag_value_that_would_destroy_the_biases_is_refused_with_its_reason(flags, message, model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, *flags) == 2
    fails_with(capsys, 2, message)
    assert not (tmp_path / "run").exists()


def test_the_help_gives_the_reason_of_every_bound():
    text = " ".join(parser().format_help().split())
    assert "For Adam's family, from 1e-08 to 0.1: it moves every bias by up to about lr per step" in text
    assert "--lr x --weight-decay at most 0.01: every step multiplies each bias by (1 - lr x weight_decay)" in text
    assert "at most 10,000,000 examples drawn in all" in text


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--epochs", "1000000000000"], ["--epochs", "1000000000000", "--max-steps", "2000000"]])
def test_a_run_of_more_examples_than_any_plan_holds_is_refused_before_the_plan_is_drawn(flags, model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--split", "train[:16]", *flags) == 2
    fails_with(capsys, 2, r"--epochs 1000000000000 over 16 rows is [\d,]+ examples to train on .*: lower --epochs, or "
                          "set --max-steps")


@pytest.mark.slow
def test_the_log_says_capped_by_max_steps_only_when_the_flag_cut_the_run(model_dir, tmp_path, capsys):
    assert run_on(model_dir, tmp_path, "--split", "train[:16]", "--max-steps", "100", "--eval-data", "none") == 0
    assert "steps: 2 optimizer steps, 1 epoch(s)\n" in capsys.readouterr().out  # the data set 2 steps, not the flag
    assert train.main(["--model", model_dir, "--split", "train[:16]", "--max-steps", "1", "--eval-data", "none",
                       "--out-dir", str(tmp_path / "capped")]) == 0
    assert "steps: 1 optimizer steps, 1 epoch(s), capped by --max-steps 1 (of 2)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def short_context(tmp_path_factory) -> str:
    """A tiny Llama built for 64 positions."""
    def llama_of_64():
        model = tiny_llama()
        model.config.max_position_embeddings = 64
        return model

    return saved(llama_of_64, tmp_path_factory.mktemp("short") / "llama")


@pytest.mark.slow
def test_a_max_len_past_the_models_context_is_warned(short_context, tmp_path, capsys):
    assert train.main(["--model", short_context, "--split", "train[:8]", "--eval-data", "none", "--max-len", "100",
                       "--out-dir", str(tmp_path / "run")]) == 0
    assert ("warning: --max-len 100 is past the model's context of 64 tokens: an example longer than 64 tokens trains "
            "positions the model never saw; --max-len 64 keeps them within it") in capsys.readouterr().out


@pytest.mark.slow
def test_generation_stops_at_the_models_context_whatever_max_new_tokens_asks(short_context, tmp_path, capsys):
    assert train.main(["--model", short_context, "--split", "train[:8]", "--eval-data", "none",
                       "--out-dir", str(tmp_path / "run")]) == 0
    assert generate.main(["--delta", str(tmp_path / "run"), "--prompt", "Add these two numbers.\n1 2",
                          "--max-new-tokens", "1000000000"]) == 0
    out = capsys.readouterr().out
    said = re.search(r"note: --max-new-tokens 1000000000 is past the model's context of 64 tokens: at most (\d+) new "
                     r"tokens after the longest prompt", out)
    assert said and 0 < int(said[1]) < 64


# --- generate's inputs ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("name", "content"), [("prompts.txt", ""), ("prompts.txt", "\n  \n\n"), ("prompts.jsonl", "")])
def test_an_empty_prompts_file_is_a_one_line_error(name, content, finished_run, tmp_path, capsys):
    (tmp_path / name).write_text(content)
    assert generate.main(["--delta", str(finished_run), "--prompts-file", str(tmp_path / name)]) == 2
    fails_with(capsys, 2, f"--prompts-file .*{name} holds no prompts")


def test_a_lora_adapter_given_as_a_delta_is_named_as_lora(tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(8, 32)}, str(tmp_path / "lora" / "adapter_model.safetensors"))
    for given in ("lora", "lora/adapter_model.safetensors"):
        assert generate.main(["--delta", str(tmp_path / given), "-n", "1"]) == 2
        fails_with(capsys, 2, "(is a PEFT LORA adapter|holds a LoRA adapter's weights).*load it with peft.PeftModel.from_pretrained")


@pytest.mark.slow
def test_bad_data_is_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch, capsys):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(pretrained, "load", load)
    bad = data_file(tmp_path, "data.jsonl", json.dumps(RECORD) + "\n" + json.dumps({"instruction": "no answer"}) + "\n")
    assert run_on(model_dir, tmp_path, "--data", bad) == 2
    fails_with(capsys, 2, "^error: training data: .*data.jsonl line 2: no 'output' field")
    bad_eval = data_file(tmp_path, "eval.csv", "instruction,output\nx\n")
    assert run_on(model_dir, tmp_path, "--eval-data", bad_eval, "--eval-split", "train") == 2
    fails_with(capsys, 2, "^error: evaluation data: .*eval.csv line 2: 1 fields")


def test_a_model_that_names_no_context_still_stops_generating_at_2048_positions():
    from bitfit.model.pretrained import (
        NO_CONTEXT,
        context_length,
        new_tokens_within_context,
    )

    bloom = tiny_bloom()  # ALiBi: its config names no context length
    assert context_length(bloom) is None and NO_CONTEXT == 2048
    assert new_tokens_within_context(bloom, prompt_length=48, wanted=10**9) == 2000
    assert new_tokens_within_context(bloom, prompt_length=5000, wanted=10**9) == 1  # at least one
    assert new_tokens_within_context(tiny_llama(), prompt_length=48, wanted=16) == 16


@pytest.mark.slow
def test_a_path_the_system_refuses_is_one_error_line_in_every_command(finished_run, tmp_path, capsys):
    from bitfit.export import adapter
    from bitfit.export import inspection as inspect_delta
    from bitfit.infer import classify

    too_long = str(tmp_path / ("x" * 300))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a link to itself
    commands = [lambda: train.main(["--out-dir", too_long]), lambda: train.main(["--data", too_long + ".jsonl"]),
                lambda: generate.main(["--delta", too_long]), lambda: merge.main(["--delta", too_long, "--out", str(tmp_path / "m")]),
                lambda: merge.main(["--delta", str(finished_run), "--out", str(tmp_path / "loop" / "m")]),
                lambda: adapter.main(["--delta", str(finished_run), "--out", str(tmp_path / "loop" / "a")]),
                lambda: inspect_delta.main([too_long]), lambda: classify.main(["--delta", too_long, "--text", "hi"])]
    for command in commands:
        assert command() == 2
        fails_with(capsys, 2, "(File name too long|Symlink loop|no such|not found|cannot use)")


@pytest.mark.slow
def test_ctrl_c_in_a_command_is_one_line_and_exit_130(finished_run, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate.pretrained, "load", interrupted)
    assert generate.main(["--delta", str(finished_run), "--prompt", "hi"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
