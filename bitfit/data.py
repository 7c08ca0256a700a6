"""Alpaca records in, token ids with -100 prompt labels out.

Records come from the built-in task, a local .json/.jsonl file, a `Dataset.save_to_disk` folder or a
hub dataset. Every record is checked before it is tokenized, so a bad row stops the run at load time
with its index, never as a NaN or a crash deep inside the training loop.
"""

import json
import re
from pathlib import Path

from .errors import BitfitError
from .tasks import builtin_records

IGNORE_INDEX = -100  # the label cross-entropy skips: prompt positions and padding
Example = dict  # input_ids, attention_mask, labels (lists of equal length), row (index of its record)


# ---------------------------------------------------------------------------------------------------
# Loading records
# ---------------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


def parse_split(expression: str) -> tuple[str, slice]:
    """ "train[:1000]" -> ("train", slice(None, 1000)); bounds may be percentages ("train[10%:]")."""
    match = _SPLIT.match(expression.replace(" ", ""))
    if not match:
        raise BitfitError(f"split {expression!r} is not of the form NAME or NAME[START:END], e.g. train[:1000]")
    name, start, end = match.groups()
    return name, slice(start or None, end or None)


def _take(rows: list, bounds: slice) -> list:
    def index(bound: str | None) -> int | None:
        if bound is None:
            return None
        if bound.endswith("%"):
            return round(len(rows) * int(bound[:-1]) / 100)
        return int(bound)

    return rows[index(bounds.start) : index(bounds.stop)]


def _read_json_file(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise BitfitError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise BitfitError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(rows, list):
        raise BitfitError(f"{path}: expected a JSON list of records, found a {type(rows).__name__}")
    return rows


def load_records(source: str, split: str = "train") -> list[dict]:
    """Rows of a data source, as plain dicts, in file order.

    `source` is "builtin" (the built-in task, splits "train" and "heldout"), a .json file (a list of
    records), a .jsonl file (one record per line), a folder written by `Dataset.save_to_disk`, or the
    name of a hub dataset. `split` selects and slices: "train", "train[:1000]", "heldout[10%:20%]".
    """
    if source == "builtin":
        name, bounds = parse_split(split)
        try:
            return _take(builtin_records(name), bounds)
        except ValueError as error:
            raise BitfitError(str(error)) from None

    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise BitfitError(f"data file not found: {path}")
        name, bounds = parse_split(split)
        if name != "train":
            raise BitfitError(f"a data file has one split, 'train'; got {split!r}")
        return _take(_read_json_file(path), bounds)

    import datasets  # imported here: it is slow to import and only these two sources need it

    if path.is_dir():
        name, bounds = parse_split(split)
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise BitfitError(f"{path} has splits {sorted(loaded)}, not {name!r}")
            loaded = loaded[name]
        return _take(loaded.to_list(), bounds)

    # Anything else is a hub dataset name; the hub parses the split expression itself.
    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as error:  # offline, misspelt, private, bad split: the hub's own words say which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BitfitError(f"{source!r} is no local file or folder, and the hub could not load it: {first_line}") from error


# ---------------------------------------------------------------------------------------------------
# Records to examples
# ---------------------------------------------------------------------------------------------------


def check_record(index: int, row: object) -> tuple[str, str, str]:
    """(instruction, input, output) of one row, or a BitfitError naming the row and what is wrong.

    A missing `input` means an empty one (many instruction datasets omit it); anything else that is
    missing or not a string is an error, because guessing would train on garbage.
    """
    if not isinstance(row, dict):
        raise BitfitError(f"row {index}: expected a record with instruction/input/output, found {row!r:.80}")
    fields = []
    for key in ("instruction", "input", "output"):
        if key not in row:
            if key == "input":
                fields.append("")
                continue
            raise BitfitError(f"row {index}: no {key!r} field (keys: {sorted(row)})")
        value = row[key]
        if not isinstance(value, str):
            raise BitfitError(f"row {index}: {key!r} must be a string, found {type(value).__name__} {value!r:.40}")
        fields.append(value)
    return fields[0], fields[1], fields[2]


def alpaca_prompt(instruction: str, input: str) -> str:
    """The seeds' prompt: 'Human: ' + instruction and input on two lines, then the assistant cue."""
    return "Human: " + "\n".join([instruction, input]).strip() + "\n\nAssistant: "


def prompt_text(tokenizer, template: str, instruction: str, input: str) -> str:
    """The prompt a model sees, in training and when asked to answer: the seeds' or the chat template's."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input)
    user = [{"role": "user", "content": "\n".join([instruction, input]).strip()}]
    return tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)


def chat_response(tokenizer, prompt: str, instruction: str, input: str, output: str) -> str:
    """What the chat template adds after `prompt` for an assistant turn: the answer and its end-of-turn marker."""
    user = [{"role": "user", "content": "\n".join([instruction, input]).strip()}]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(prompt):
        raise BitfitError("this chat template does not render the prompt as a prefix of the full chat; use template='alpaca'")
    return full[len(prompt) :]


def encode(
    records: list,
    tokenizer,
    max_len: int = 256,
    template: str = "alpaca",
) -> tuple[list[Example], int]:
    """Tokenize records into training examples; returns (examples, number dropped).

    prompt ids + response ids + eos, labels -100 on the prompt, all three fields cut at `max_len`.
    An example whose response is cut away entirely would have no label to learn from (and a 0/0 loss),
    so it is dropped and counted. The prompt is tokenized with the tokenizer's special tokens (a BOS
    where it adds one), the response without, so no BOS lands in the middle of the sequence.
    """
    if tokenizer.eos_token_id is None:
        raise BitfitError("the tokenizer has no eos token, so a response could never end; set tokenizer.eos_token")
    if template not in ("alpaca", "chat"):
        raise BitfitError(f"template must be 'alpaca' or 'chat', not {template!r}")
    if template == "chat" and not tokenizer.chat_template:
        raise BitfitError("template='chat' needs a tokenizer with a chat template; this one has none")

    prompts, responses = [], []
    for index, row in enumerate(records):
        instruction, input, output = check_record(index, row)
        prompt = prompt_text(tokenizer, template, instruction, input)
        prompts.append(prompt)
        responses.append(chat_response(tokenizer, prompt, instruction, input, output) if template == "chat" else output)
    if not prompts:
        return [], 0

    # One batched call per side: the fast tokenizer then works through all rows in Rust.
    prompt_ids = tokenizer(prompts, add_special_tokens=template == "alpaca")["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]

    examples, dropped = [], 0
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if template == "alpaca" or tokenizer.eos_token_id not in response:
            response = response + [tokenizer.eos_token_id]
        input_ids = (prompt + response)[:max_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        # "row" names the record an example came from, for error messages; the collator ignores it.
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels, "row": row})
    return examples, dropped
