import json

import datasets
import pytest

from bitfit.data import IGNORE_INDEX, alpaca_prompt, encode, load_records, parse_split
from bitfit.errors import BitfitError
from tiny import tiny_tokenizer

RECORDS = [
    {"instruction": "Sort these numbers from smallest to largest.", "input": "3 1 2", "output": "1 2 3"},
    {"instruction": "Add these two numbers.", "input": "2 2", "output": "4"},
    {"instruction": "Count the words in this list.", "input": "", "output": "0"},
]


def seed_process(sample: dict, tokenizer, max_len: int = 256) -> dict:
    """The tokenization of seed 001, verbatim in substance: the reference we must reproduce."""
    human = tokenizer("Human: " + "\n".join([sample["instruction"], sample["input"]]).strip() + "\n\nAssistant: ")
    ml = tokenizer(sample["output"] + tokenizer.eos_token)
    input_ids = human["input_ids"] + ml["input_ids"]
    attention_mask = human["attention_mask"] + ml["attention_mask"]
    labels = [-100] * len(human["input_ids"]) + ml["input_ids"]
    return {"input_ids": input_ids[:max_len], "attention_mask": attention_mask[:max_len], "labels": labels[:max_len]}


def test_prompt_is_the_seed_recipe():
    assert alpaca_prompt("Say hi.", "") == "Human: Say hi.\n\nAssistant: "
    assert alpaca_prompt("Add.", "2 3") == "Human: Add.\n2 3\n\nAssistant: "


def test_examples_equal_the_seed_tokenization():
    tokenizer = tiny_tokenizer()
    examples, dropped = encode(RECORDS, tokenizer)
    assert dropped == 0
    assert [{k: v for k, v in e.items() if k != "row"} for e in examples] == [seed_process(r, tokenizer) for r in RECORDS]
    assert [e["row"] for e in examples] == [0, 1, 2]


def test_prompt_positions_are_labelled_minus_100_and_the_response_ends_with_eos():
    tokenizer = tiny_tokenizer()
    [example], _ = encode(RECORDS[:1], tokenizer)
    n_prompt = len(tokenizer(alpaca_prompt(RECORDS[0]["instruction"], RECORDS[0]["input"]))["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_all_three_fields_are_truncated_to_max_len():
    tokenizer = tiny_tokenizer()
    long = {"instruction": "Reverse the order of these words.", "input": "cat dog", "output": "dog cat " * 50}
    [example], dropped = encode([long], tokenizer, max_len=32)
    assert dropped == 0
    assert [len(example[key]) for key in ("input_ids", "attention_mask", "labels")] == [32, 32, 32]


def test_an_example_whose_response_is_cut_away_is_dropped_and_counted():
    tokenizer = tiny_tokenizer()
    long_prompt = {"instruction": "Sort these numbers. " * 20, "input": "3 1", "output": "1 3"}
    examples, dropped = encode([long_prompt, *RECORDS], tokenizer, max_len=24)
    assert dropped == 1
    assert [e["row"] for e in examples] == [1, 2, 3]  # row 0 dropped, the others keep their record's index
    assert all(any(label != IGNORE_INDEX for label in example["labels"]) for example in examples)


def test_a_missing_input_is_treated_as_empty():
    tokenizer = tiny_tokenizer()
    without = {"instruction": "Say hi.", "output": "hi"}
    assert encode([without], tokenizer) == encode([{**without, "input": ""}], tokenizer)


@pytest.mark.parametrize("key", ["instruction", "output"])
def test_a_missing_instruction_or_output_is_an_error_naming_the_row(key):
    rows = [dict(RECORDS[0]), {k: v for k, v in RECORDS[1].items() if k != key}]
    with pytest.raises(BitfitError, match=f"row 1: no '{key}' field"):
        encode(rows, tiny_tokenizer())


@pytest.mark.parametrize("value", [None, 3, ["a"]])
def test_a_non_string_field_is_an_error_naming_the_row(value):
    rows = [*RECORDS, {**RECORDS[0], "output": value}]
    with pytest.raises(BitfitError, match="row 3: 'output' must be a string"):
        encode(rows, tiny_tokenizer())


def test_a_tokenizer_without_eos_is_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(BitfitError, match="no eos token"):
        encode(RECORDS, tokenizer)


def test_chat_template_puts_the_rendered_turn_in_the_labels():
    tokenizer = tiny_tokenizer(chat=True)
    [example], _ = encode(RECORDS[1:2], tokenizer, template="chat")
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    prompt = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt) == "<|user|>Add these two numbers.\n2 2</s>\n<|assistant|>"
    assert tokenizer.decode(labelled) == "4</s>\n"  # the template's own end of turn, no second eos


def test_jsonl_json_and_save_to_disk_give_the_same_records(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("data.json", "data.jsonl", "saved", "saved_dict"):
        assert load_records(str(tmp_path / source)) == RECORDS, source


def test_split_expressions_slice_local_sources(tmp_path):
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    path = str(tmp_path / "data.jsonl")
    assert load_records(path, "train[:2]") == RECORDS[:2]
    assert load_records(path, "train[1:]") == RECORDS[1:]
    assert load_records(path, "train[-1:]") == RECORDS[-1:]
    assert len(load_records("builtin", "train[:10%]")) == 80
    assert parse_split("train[10%:20%]") == ("train", slice("10%", "20%"))


def test_a_hub_name_goes_to_load_dataset_with_the_split_expression(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("yahma/alpaca-cleaned", "train[:1000]") == RECORDS
    assert calls == [("yahma/alpaca-cleaned", "train[:1000]")]


def test_a_hub_that_cannot_be_reached_is_a_clear_error(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach 'yahma/alpaca-cleaned' on the Hub\n(long details)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BitfitError, match="hub could not load it: Couldn't reach"):
        load_records("yahma/alpaca-cleaned", "train")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "data file not found"), ("{not json", "not valid JSON"), ('{"a": 1}', "expected a JSON list")],
)
def test_a_bad_data_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BitfitError, match=message):
        load_records(str(path))


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(BitfitError, match="line 2 is not valid JSON"):
        load_records(str(path))
