import csv
import json
import pathlib

import datasets
import huggingface_hub
import pytest

import bitfit.data.examples
from bitfit.core.errors import BitfitError
from bitfit.core.loss import IGNORE_INDEX
from bitfit.data.examples import (
    CHARS_PER_TOKEN,
    alpaca_prompt,
    encode,
    load_examples,
    questions,
    read_records,
    token_fields,
)
from bitfit.data.sources import load_records, parse_split
from tiny import tiny_tokenizer

RECORDS = [
    {"instruction": "Sort these numbers from smallest to largest.", "input": "3 1 2", "output": "1 2 3"},
    {"instruction": "Add these two numbers.", "input": "2 2", "output": "4"},
    {"instruction": "Count the words in this list.", "input": "", "output": "0"},
]
CHAT = {"messages": [{"role": "user", "content": "Add these two numbers.\n2 2"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "Add these two numbers.\n3 3"}, {"role": "assistant", "content": "6"}]}
PROMPT_COMPLETION = {"prompt": "Sort: 3 1 2 ->", "completion": " 1 2 3"}


def seed_process(sample: dict, tokenizer, max_len: int = 256) -> dict:
    """The tokenization of seed 001, verbatim in substance: the reference we must reproduce."""
    human = tokenizer("Human: " + "\n".join([sample["instruction"], sample["input"]]).strip() + "\n\nAssistant: ")
    ml = tokenizer(sample["output"] + tokenizer.eos_token)
    input_ids = human["input_ids"] + ml["input_ids"]
    attention_mask = human["attention_mask"] + ml["attention_mask"]
    labels = [-100] * len(human["input_ids"]) + ml["input_ids"]
    return {"input_ids": input_ids[:max_len], "attention_mask": attention_mask[:max_len], "labels": labels[:max_len]}


def without_row(examples: list[dict]) -> list[dict]:
    return [token_fields(e) for e in examples]


def learned_runs(tokenizer, example: dict) -> list[str]:
    """The text of each run of consecutive labelled tokens: what the model learns, turn by turn."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def write(path: pathlib.Path, rows: list) -> str:
    """Rows as a .jsonl or .json file (by the path's suffix, in any case)."""
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


# --- examples from Alpaca records -------------------------------------------------------------------


def test_prompt_is_the_seed_recipe():
    assert alpaca_prompt("Say hi.", "") == "Human: Say hi.\n\nAssistant: "
    assert alpaca_prompt("Add.", "2 3") == "Human: Add.\n2 3\n\nAssistant: "


def test_examples_equal_the_seed_tokenization():
    tokenizer = tiny_tokenizer()
    examples, dropped = encode(RECORDS, tokenizer)
    assert dropped == 0
    assert without_row(examples) == [seed_process(r, tokenizer) for r in RECORDS]
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


# --- chat and prompt/completion rows ----------------------------------------------------------------


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_chat_row_learns_every_assistant_turn_and_nothing_else(template):
    tokenizer = tiny_tokenizer(chat=True)
    [example], _ = encode([CHAT], tokenizer, template=template)  # a chat row is a chat, whatever the template
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert learned_runs(tokenizer, example) == ["4</s>\n", "6</s>\n"]


def test_a_system_turn_and_a_trailing_user_turn_are_not_learned():
    tokenizer = tiny_tokenizer(chat=True)
    messages = [{"role": "system", "content": "Be brief."}, *CHAT["messages"][:2], {"role": "user", "content": "Thanks."}]
    [example], _ = encode([{"messages": messages}], tokenizer)
    assert learned_runs(tokenizer, example) == ["4</s>\n"]
    assert "Thanks." not in tokenizer.decode(example["input_ids"])  # after the last answer: nothing to learn


def test_a_chat_row_equals_the_same_alpaca_record_under_the_chat_template():
    tokenizer = tiny_tokenizer(chat=True)
    chat = {"messages": [{"role": "user", "content": "Add these two numbers.\n2 2"}, {"role": "assistant", "content": "4"}]}
    assert encode([chat], tokenizer) == encode(RECORDS[1:2], tokenizer, template="chat")


def test_a_chat_row_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(BitfitError, match="row 0: a chat row .* this tokenizer has none"):
        encode([CHAT], tiny_tokenizer())


def test_a_chat_row_without_an_assistant_turn_is_an_error_naming_the_row():
    with pytest.raises(BitfitError, match="row 1: 'messages' has no assistant turn"):
        encode([CHAT, {"messages": CHAT["messages"][:1]}], tiny_tokenizer(chat=True))


@pytest.mark.parametrize(("messages", "message"), [
    ("hi", "'messages' must be a list"),
    ([{"role": "user"}], r"no messages\[0\].content field"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"messages\[0\].content must be a string"),
])
def test_a_malformed_chat_row_is_an_error_naming_the_turn(messages, message):
    with pytest.raises(BitfitError, match=f"row 0: {message}"):
        encode([{"messages": messages}], tiny_tokenizer(chat=True))


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_prompt_completion_row_is_the_prompt_verbatim_and_the_completion_plus_eos_learned(template):
    tokenizer = tiny_tokenizer(chat=True)
    [example], _ = encode([PROMPT_COMPLETION], tokenizer, template=template)
    prompt = tokenizer(PROMPT_COMPLETION["prompt"])["input_ids"]
    completion = tokenizer(PROMPT_COMPLETION["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion


def test_a_row_of_unknown_shape_is_an_error_naming_the_shapes_accepted():
    with pytest.raises(BitfitError, match=r"row 0: a row needs the fields instruction/input/output \(Alpaca\), "
                                          r"messages \(chat\), prompt/completion or text \(plain text, all learned\); "
                                          r"this one has \['answer', 'question'\]"):
        encode([{"answer": "hello", "question": "?"}], tiny_tokenizer())


def test_a_plain_text_row_learns_every_token_and_ends_with_eos():
    tokenizer = tiny_tokenizer()
    [example], _ = encode([{"text": "Sort these numbers: 3 1 2"}], tokenizer)
    assert example["input_ids"] == tokenizer("Sort these numbers: 3 1 2")["input_ids"] + [tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]  # no prompt: nothing is -100


def test_a_plain_text_row_asks_no_question_so_it_is_no_prompt_and_has_no_exact_match():
    from bitfit.run.evaluate import exact_match

    with pytest.raises(BitfitError, match=r"row 0: a plain-text row \(text\) asks no question"):
        questions([{"text": "Once upon a time"}], tiny_tokenizer())
    assert exact_match(None, tiny_tokenizer(), [{"text": "Once upon a time"}], "alpaca", None, False, 4) == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_plain_text_rows_train_a_causal_lm_from_every_file_format(suffix, tmp_path):
    import train
    from test_train import saved
    from tiny import tiny_llama

    rows = [{"text": f"The number {i} comes before {i + 1}."} for i in range(16)]
    data = tmp_path / f"data{suffix}"
    if suffix in (".csv", ".parquet"):
        datasets.Dataset.from_list(rows).to_csv(str(data), index=False) if suffix == ".csv" else \
            datasets.Dataset.from_list(rows).to_parquet(str(data))
    else:
        data.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    assert train.main(["--model", saved(tiny_llama, tmp_path / "llama"), "--data", str(data), "--eval-data", str(data),
                       "--max-steps", "2", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["loss"] < results["before"]["loss"] and "exact_match" not in results["after"]


def test_a_row_with_the_fields_of_two_shapes_is_an_error():
    with pytest.raises(BitfitError, match="row 0: a row has the fields of one shape .* this one has "
                                          "instruction/input/output and prompt"):
        encode([{**RECORDS[0], "prompt": "Sort."}], tiny_tokenizer())


@pytest.mark.parametrize(("row", "question", "answer"), [
    (RECORDS[0], "Sort these numbers from smallest to largest.\n3 1 2", "1 2 3"),
    (CHAT, "Add these two numbers.\n3 3", "6"),
    (PROMPT_COMPLETION, "Sort: 3 1 2 ->", " 1 2 3"),
])
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_model_is_asked_with_exactly_the_prompt_ids_of_the_training_example(row, question, answer, template):
    tokenizer = tiny_tokenizer(chat=True)
    [example], _ = encode([row], tokenizer, template=template)
    last_answer_starts = max(k for k, label in enumerate(example["labels"]) if label == IGNORE_INDEX) + 1
    assert questions([row], tokenizer, template) == [(example["input_ids"][:last_answer_starts], question, answer)]


def test_a_row_without_its_answer_can_still_be_asked_about():
    tokenizer = tiny_tokenizer(chat=True)
    rows = [{"instruction": "Say hi."}, {"prompt": "Say hi:"}, {"messages": CHAT["messages"][:1]}]
    asked = questions(rows, tokenizer)
    assert [answer for _, _, answer in asked] == ["", "", ""]
    assert tokenizer.decode(asked[2][0]) == "<|user|>Add these two numbers.\n2 2</s>\n<|assistant|>"


# --- only what fits in max_len is tokenized ---------------------------------------------------------


def whole_text_examples(rows: list[dict], tokenizer, max_len: int) -> list[dict]:
    """Each whole text tokenized, then cut at max_len (seed 001's way); examples without labels dropped."""
    examples = [seed_process({"input": "", **row}, tokenizer, max_len) for row in rows]
    return [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]


@pytest.mark.parametrize("max_len", [4, 64, 300])
def test_examples_of_rows_with_long_fields_equal_whole_text_tokenization(max_len):
    tokenizer = tiny_tokenizer()
    # 25,000 characters of long tokens (8.3 characters each): at max_len 4 the first cut holds too few
    # tokens to be trusted, so a longer one is tokenized; at 64 and 300 the first cut is enough.
    long = " smallest largest numbers" * 1000
    rows = [{"instruction": "Repeat.", "output": long}, {"instruction": "Add.", "input": long, "output": "4"},
            {"instruction": long, "output": "ok"}, {"instruction": "Say hi.", "output": "hi " * 3000}]
    assert without_row(encode(rows, tokenizer, max_len=max_len)[0]) == whole_text_examples(rows, tokenizer, max_len)


class Measured:
    """A tokenizer that remembers the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest] + [len(text) for text in ([texts] if isinstance(texts, str) else texts)])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_multi_megabyte_field_is_never_tokenized_whole():
    huge = "dog cat " * 500_000  # 4 MB: tokenizing it whole took minutes and gigabytes at 50 MB
    tokenizer = Measured(tiny_tokenizer(chat=True))
    rows = [{"instruction": "Repeat.", "output": huge}, {"instruction": huge, "output": "ok"},
            {"messages": [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": huge}]},
            {"prompt": "Repeat:", "completion": huge}]
    examples, dropped = encode(rows, tokenizer, max_len=256)
    assert [len(e["input_ids"]) for e in examples] == [256, 256, 256] and dropped == 1
    assert 0 < tokenizer.longest <= 256 * CHARS_PER_TOKEN


# --- loading records --------------------------------------------------------------------------------


def test_jsonl_json_and_save_to_disk_give_the_same_records(tmp_path):
    write(tmp_path / "data.json", RECORDS)
    write(tmp_path / "data.jsonl", RECORDS)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("data.json", "data.jsonl", "saved", "saved_dict"):
        assert load_records(str(tmp_path / source))[0] == RECORDS, source


def test_csv_and_parquet_give_the_same_records_as_jsonl(tmp_path):
    datasets.Dataset.from_list(RECORDS).to_csv(str(tmp_path / "data.csv"), index=False)
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "data.parquet"))
    for source in ("data.csv", "data.parquet"):
        assert load_records(str(tmp_path / source))[0] == RECORDS, source
        assert load_records(str(tmp_path / source), "train[1:]")[0] == RECORDS[1:], source


def test_a_csv_record_is_placed_at_the_line_it_starts_on_and_its_messages_cell_is_json(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"two\nlines",a\n\nthird,b\n')  # a quoted cell spans lines; a blank line
    assert load_records(str(path)) == ([{"instruction": "two\nlines", "output": "a"}, {"instruction": "third", "output": "b"}],
                                       [f"{path} line 2", f"{path} line 5"])
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([["messages"], [json.dumps(CHAT["messages"])]])  # the JSON text, CSV-quoted
    assert load_records(str(path))[0] == [CHAT]


def test_a_parquet_null_input_is_no_input_and_a_null_output_an_error_naming_the_row(tmp_path):
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list([{**RECORDS[1], "input": None}, RECORDS[0]]).to_parquet(str(path))
    tokenizer = tiny_tokenizer()
    assert encode(load_records(str(path))[0][:1], tokenizer)[0][0]["input_ids"] == \
        encode([{**RECORDS[1], "input": ""}], tokenizer)[0][0]["input_ids"]
    datasets.Dataset.from_list([RECORDS[0], {**RECORDS[1], "output": None}]).to_parquet(str(path))
    with pytest.raises(BitfitError, match=f"^training data: {path} row 1: 'output' must be a string, found NoneType"):
        read_records(str(path), "train")


def test_a_file_that_is_not_parquet_is_a_clear_error(tmp_path):
    (tmp_path / "data.parquet").write_text("instruction,output\n")
    with pytest.raises(BitfitError, match="data.parquet is not a readable Parquet file"):
        load_records(str(tmp_path / "data.parquet"))


def test_every_row_is_checked_when_read_before_any_tokenizer_is_needed(tmp_path):
    path = write(tmp_path / "data.jsonl", [*RECORDS, {"instruction": "no output"}])
    with pytest.raises(BitfitError, match=r"^training data: .*data.jsonl line 4: no 'output' field"):
        read_records(path, "train")


def test_encoding_in_chunks_gives_the_examples_of_encoding_at_once(monkeypatch):
    rows = [{**RECORDS[i % 3], "output": f"{i}"} for i in range(7)]
    whole = encode(rows, tiny_tokenizer())
    monkeypatch.setattr(bitfit.data.examples, "ENCODE_CHUNK", 3)  # 3 chunks: 3, 3 and 1 rows, under a progress bar
    assert encode(rows, tiny_tokenizer()) == whole


def test_split_expressions_slice_local_sources(tmp_path):
    path = write(tmp_path / "data.jsonl", RECORDS)
    assert load_records(path, "train[:2]")[0] == RECORDS[:2]
    assert load_records(path, "train[1:]")[0] == RECORDS[1:]
    assert load_records(path, "train[-1:]")[0] == RECORDS[-1:]
    assert len(load_records("builtin", "train[:10%]")[0]) == 80
    assert parse_split("train[10%:20%]") == ("train", slice("10%", "20%"))


def test_jsonl_lines_end_at_newline_only_so_u2028_and_u0085_stay_inside_strings(tmp_path):
    row = {**RECORDS[0], "output": "line\u2028separator\u0085next line"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(str(path))[0] == [row]


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_a_file_with_a_utf8_bom_is_read(tmp_path, name):
    path = tmp_path / name
    write(path, RECORDS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows editors save "UTF-8"
    assert load_records(str(path))[0] == RECORDS


def test_jsonl_with_windows_line_ends_is_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in RECORDS))
    assert load_records(str(path)) == (RECORDS, [f"{path} line {n}" for n in (1, 2, 3)])


@pytest.mark.parametrize("name", ["UPPER.JSONL", "Mixed.Json"])
def test_data_file_suffixes_are_case_insensitive(tmp_path, name):
    assert load_records(write(tmp_path / name, RECORDS))[0] == RECORDS


def test_a_hub_dataset_is_loaded_by_split_name_and_sliced_as_every_source_is(monkeypatch, hub):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS * 5)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, places = load_records("yahma/alpaca-cleaned", "train[12:]")
    assert rows == (RECORDS * 5)[12:]
    assert places == ["yahma/alpaca-cleaned train row 12", "yahma/alpaca-cleaned train row 13",
                      "yahma/alpaca-cleaned train row 14"]
    assert calls == [("yahma/alpaca-cleaned", "train")]


def test_a_hub_datasets_configuration_is_passed_and_its_class_labels_come_by_name(monkeypatch, hub):
    calls = []
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0},
                                           {"sentence": "?", "label": -1}], features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, _ = load_records("nyu-mll/glue", "validation", config="sst2")
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert [row["label"] for row in rows] == ["positive", "negative", -1]  # -1: GLUE's "no label", refused by name later


def test_a_hub_error_is_a_clear_error_in_the_hubs_own_words(monkeypatch, hub):
    def missing(name, split):
        raise FileNotFoundError("Dataset 'yahma/alpaca-cleand' doesn't exist on the Hub\n(long details)")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(BitfitError, match="hub could not load it: Dataset 'yahma/alpaca-cleand' doesn't exist"):
        load_records("yahma/alpaca-cleand", "train")


# --- the hub without a network ----------------------------------------------------------------------


def test_an_unreachable_hub_fails_at_once_saying_so_and_to_pass_a_local_path(monkeypatch, hub):
    offline_during_load = []

    def nothing_cached(name, split):
        offline_during_load.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("Couldn't reach 'yahma/alpaca-cleaned' on the Hub (LocalEntryNotFoundError)")

    hub.down()
    monkeypatch.setattr(datasets, "load_dataset", nothing_cached)
    with pytest.raises(BitfitError, match=r"^the hub \(huggingface.co\) cannot be reached and the dataset "
                                          r"'yahma/alpaca-cleaned' is not in the local hub cache; pass a local "
                                          r"file or folder instead$"):
        load_records("yahma/alpaca-cleaned")
    assert offline_during_load == [True]  # the hub client asked no server, so it did not retry for a minute
    assert hub.made == [(("huggingface.co", 443), 3.0)]


def test_an_unreachable_hub_still_loads_a_cached_dataset(monkeypatch, hub):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(RECORDS))
    hub.down()
    assert load_records("yahma/alpaca-cleaned")[0] == RECORDS
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # models load from the cache too from here on


def test_a_reachable_hub_is_left_online(monkeypatch, hub):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(RECORDS))
    assert load_records("yahma/alpaca-cleaned")[0] == RECORDS
    assert hub.made and datasets.config.HF_HUB_OFFLINE is False


def test_with_hf_hub_offline_set_the_hub_is_not_probed(monkeypatch, hub):
    def nothing_cached(name, split):
        raise ConnectionError("offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", nothing_cached)
    with pytest.raises(BitfitError, match="HF_HUB_OFFLINE is set and the dataset 'x/y' is not in the local hub cache"):
        load_records("x/y")
    assert hub.made == []


# --- errors that name the file, the line and the field ----------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file or folder"), ("{not json", "not valid JSON"), ('{"a": 1}', "expected a JSON list")],
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
    with pytest.raises(BitfitError, match="data.jsonl line 2 is not valid JSON"):
        load_records(str(path))


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_invalid_utf8_is_an_error_naming_the_file_and_line(tmp_path, name):
    path = tmp_path / name
    lines = [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]).encode().replace(b"4", b"\xff")]
    lines[0] = lines[0].encode()
    path.write_bytes(b"\n".join(lines) if name.endswith("l") else b"[" + b",\n".join(lines) + b"]")
    with pytest.raises(BitfitError, match=f"{name} line 2 is not valid UTF-8 \\(byte 0xff"):
        load_records(str(path))


def test_a_lone_surrogate_is_an_error_naming_the_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]).replace('"4"', '"4\\ud800"') + "\n")
    rows, places = load_records(str(path))  # valid JSON: the escape is text JSON allows
    with pytest.raises(BitfitError, match=r"data.jsonl line 2: 'output' holds a lone surrogate \('\\ud800'"):
        encode(rows, tiny_tokenizer(), places=places)


def test_errors_name_the_true_jsonl_line_whatever_the_slice(tmp_path):
    path = tmp_path / "data.jsonl"
    bad = {"instruction": "Say hi."}
    path.write_text("\n".join([json.dumps(RECORDS[0])] * 5 + ["", json.dumps(RECORDS[1]), json.dumps(bad)]))
    rows, places = load_records(str(path), "train[5:]")
    assert places == [f"{path} line 7", f"{path} line 8"]  # line 6 is blank: blank lines are no rows
    with pytest.raises(BitfitError, match="data.jsonl line 8: no 'output' field"):
        encode(rows, tiny_tokenizer(), places=places)


def test_errors_in_a_json_list_name_the_element(tmp_path):
    rows, places = load_records(write(tmp_path / "data.json", [*RECORDS, {"output": "x"}]), "train[2:]")
    with pytest.raises(BitfitError, match="data.json element 3: no 'instruction' field"):
        encode(rows, tiny_tokenizer(), places=places)


def test_rows_of_a_saved_dataset_are_named_by_split_and_row(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS * 2)}).save_to_disk(str(tmp_path / "saved"))
    _, places = load_records(str(tmp_path / "saved"), "test[-2:]")
    assert places == [f"{tmp_path / 'saved'} test row 4", f"{tmp_path / 'saved'} test row 5"]


def test_a_file_that_cannot_be_read_is_a_clear_error(tmp_path, monkeypatch):
    path = write(tmp_path / "data.jsonl", RECORDS)

    def refused(self, *args, **kwargs):  # what chmod 000 does to anyone but root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "open", refused)
    with pytest.raises(BitfitError, match="cannot read .*data.jsonl: Permission denied"):
        load_records(path)


def test_a_folder_that_is_not_a_saved_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    with pytest.raises(BitfitError, match="folder is a folder, but not one written by Dataset.save_to_disk"):
        load_records(str(tmp_path / "folder"))


@pytest.mark.parametrize("source", ["", "  "])
def test_an_empty_data_source_is_a_clear_error(source):
    with pytest.raises(BitfitError, match="no data source given"):
        load_records(source)


@pytest.mark.parametrize("split", ["train[%:]", "train[1:2:3]", "train[a:]", "train[:5", "[:5]"])
def test_a_malformed_split_is_a_clear_error(split):
    with pytest.raises(BitfitError, match="is not of the form NAME or NAME\\[START:END\\]"):
        load_records("builtin", split)


@pytest.mark.parametrize("saved", ["file", "dataset"])
def test_a_single_split_source_has_one_split_named_train(tmp_path, saved):
    if saved == "file":
        source = write(tmp_path / "data.jsonl", RECORDS)
    else:
        source = str(tmp_path / "saved")
        datasets.Dataset.from_list(RECORDS).save_to_disk(source)
    assert load_records(source, "train[:2]")[0] == RECORDS[:2]
    with pytest.raises(BitfitError, match="which has one split, 'train': give train or train\\[START:END\\], not 'test\\[:10\\]'"):
        load_records(source, "test[:10]")


@pytest.mark.parametrize("source", ["missing.JSONL", "data/train/set", "./set", "~/no-such-set", "/no/such/set"])
def test_a_local_path_that_does_not_exist_is_named_not_sent_to_the_hub(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("asked the hub"))
    with pytest.raises(BitfitError, match="^no such file or folder: "):
        load_records(source)


# --- load_examples: records and examples, named by their role ---------------------------------------


def test_an_error_in_the_evaluation_data_says_it_is_the_evaluation_data(tmp_path):
    path = write(tmp_path / "eval.jsonl", [RECORDS[0], {"instruction": "Say hi."}])
    with pytest.raises(BitfitError, match="^evaluation data: .*eval.jsonl line 2: no 'output' field"):
        load_examples(path, "train", tiny_tokenizer(), role="evaluation data")


def test_a_split_whose_examples_are_all_dropped_is_an_error_naming_its_role(tmp_path):
    path = write(tmp_path / "eval.jsonl", RECORDS)
    with pytest.raises(BitfitError, match="^evaluation data: no usable examples in .*eval.jsonl train: 3 dropped"):
        load_examples(path, "train", tiny_tokenizer(), max_len=4, role="evaluation data")


def test_a_csv_cell_longer_than_csvs_own_limit_is_read_like_any_long_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\n" + "x" * 300_000 + ",ok\n")
    assert load_records(str(path))[0] == [{"instruction": "x" * 300_000, "output": "ok"}]


def test_a_parquet_split_of_no_rows_is_an_empty_split_not_a_crash(tmp_path):
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "data.parquet"))
    assert load_records(str(tmp_path / "data.parquet"), "train[100:]") == ([], [])
    with pytest.raises(BitfitError, match=r"data.parquet train\[5:2\] holds no records"):
        read_records(str(tmp_path / "data.parquet"), "train[5:2]")
