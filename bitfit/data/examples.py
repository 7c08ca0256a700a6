"""Rows in, token ids with -100 prompt labels out: what every row is checked against, then how it is
rendered and tokenized.

Row shapes (`check_record`), the three that instruction data comes in, and plain text:
    instruction, input, output   Alpaca: the prompt template's question, the output learned
    messages                     chat: [{role, content}, ...] through the tokenizer's chat template,
                                 every assistant turn learned, the other turns not
    prompt, completion           plain text (TRL's convention): the prompt verbatim, the completion learned
    text                         plain text, as pretraining corpora and TRL's language modeling rows are:
                                 every token learned; it asks no question, so it has no exact match

Examples (`read_records`, `encode`): every row is read and checked before a model or tokenizer is even
loaded (`read_records`), so a bad row stops the run in seconds, naming its place, never as a NaN or a crash deep inside the training loop. Only what
fits in `max_len` tokens is tokenized, so a row with a 50 MB field costs what a short one does.
Asking (`questions`): the prompt ids a model continues to answer a row, for evaluation and generate.py.
"""

import re
from collections.abc import Iterator

from tqdm import tqdm

from bitfit.core.errors import BitfitError
from bitfit.core.loss import IGNORE_INDEX
from bitfit.data.sources import load_records

Example = dict  # input_ids, attention_mask, labels (lists of equal length), row (index of its record), place
Piece = tuple[str, bool]  # a stretch of an example's text, and whether the model learns it (keeps its labels)
Question = tuple[list[int], str, str]  # prompt ids, the question in words, the answer the row expects ('' if none)

TEMPLATES = ("alpaca", "chat")  # how an Alpaca row becomes text: the HF Trainer recipe's prompt, or the chat template
ENCODE_CHUNK = 2000  # rows tokenized at a time; a source with more gets a progress bar
SHAPES = "instruction/input/output (Alpaca), messages (chat), prompt/completion or text (plain text, all learned)"
FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "text": ("prompt", "completion"),
          "plain": ("text",)}

# Before tokenizing, a text is cut to max_len * CHARS_PER_TOKEN characters: more than any tokenizer's
# tokens average, so the cut text almost always still holds its first max_len tokens...
CHARS_PER_TOKEN = 32
# ...and the cut changes only the tokens next to it, so when at least MARGIN tokens follow the first
# max_len, those are the whole text's. Where fewer follow, a longer cut is tokenized, up to the whole text.
MARGIN = 16


# ---------------------------------------------------------------------------------------------------
# Checking rows: three shapes, one form (a conversation of {role, content} messages)
# ---------------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_field(row: dict, key: str, place: str, required: bool = True, name: str = "") -> str | None:
    """row[key], checked to be text; None where it is missing and not `required`."""
    name = name or repr(key)
    if key not in row or (row[key] is None and not required):  # a table's empty cell (Parquet: null) is missing
        if required:
            raise BitfitError(f"{place}: no {name} field (keys: {sorted(row)})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise BitfitError(f"{place}: {name} must be a string, found {type(value).__name__} {value!r:.40}")
    surrogate = _SURROGATE.search(value)
    if surrogate:  # JSON lets "\ud800" through, but no tokenizer can encode half a UTF-16 pair
        raise BitfitError(f"{place}: {name} holds a lone surrogate ({surrogate.group()!a}, half of a UTF-16 pair) "
                          f"at character {surrogate.start()}, which is not text")
    return value


def check_record(row: object, place: str, need_answer: bool = True) -> tuple[str, list[dict]]:
    """(shape, conversation) of one row, or a BitfitError naming its place and what is wrong.

    The shape is 'alpaca', 'chat', 'text' (prompt/completion) or 'plain' (text); the conversation is the
    row as chat messages: an Alpaca row is a user turn (instruction and input on two lines) and an assistant
    turn (output), a prompt/completion row likewise, a plain text one assistant turn (all of it learned). A missing `input` means an empty one (many instruction
    datasets omit it); anything else missing or not a string is an error, because guessing would train
    on garbage. `need_answer=False` (asking a model, not training it) lets the answer be missing.
    """
    if not isinstance(row, dict):
        raise BitfitError(f"{place}: expected a record with {SHAPES} fields, found {row!r:.80}")
    shapes = [shape for shape, keys in FIELDS.items() if any(key in row for key in keys)]
    if not shapes:
        raise BitfitError(f"{place}: a row needs the fields {SHAPES}; this one has {sorted(row)}")
    if len(shapes) > 1:
        found = " and ".join("/".join(key for key in FIELDS[shape] if key in row) for shape in shapes)
        raise BitfitError(f"{place}: a row has the fields of one shape ({SHAPES}); this one has {found}")
    shape = shapes[0]

    if shape == "chat":
        return shape, _check_messages(row["messages"], place, need_answer)
    if shape == "plain":
        return shape, [{"role": "assistant", "content": text_field(row, "text", place)}]
    if shape == "alpaca":  # the question: instruction and input on two lines, as the HF Trainer recipe's prompt has them
        instruction, input = text_field(row, "instruction", place), text_field(row, "input", place, required=False) or ""
        question, answer = "\n".join([instruction, input]).strip(), text_field(row, "output", place, required=need_answer)
    else:  # prompt/completion: the prompt verbatim, whitespace and all
        question, answer = text_field(row, "prompt", place), text_field(row, "completion", place, required=need_answer)
    turns = [{"role": "user", "content": question}]
    return shape, turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _check_messages(messages: object, place: str, need_answer: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BitfitError(f"{place}: 'messages' must be a list of {{role, content}} turns, found {messages!r:.60}")
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BitfitError(f"{place}: messages[{number}] must be a {{role, content}} turn, found {message!r:.60}")
        for key in ("role", "content"):
            text_field(message, key, place, name=f"messages[{number}].{key}")
    if messages[0]["role"] == "assistant":
        raise BitfitError(f"{place}: messages[0] is an assistant turn with nothing before it; an assistant turn is "
                          "learned as the answer to the turns before it, so start the conversation with a user (or "
                          "system) turn")
    if need_answer and not any(message["role"] == "assistant" for message in messages):
        raise BitfitError(f"{place}: 'messages' has no assistant turn, so nothing to learn")
    return messages


# ---------------------------------------------------------------------------------------------------
# Rendering: a conversation -> pieces of text, each learned or not
# ---------------------------------------------------------------------------------------------------


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The HF Trainer recipe's prompt: 'Human: ' + instruction and input on two lines, then the assistant cue."""
    return "Human: " + "\n".join([instruction, input]).strip() + "\n\nAssistant: "


def _chat(tokenizer, messages: list[dict], place: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as error:  # the template's own check (jinja's TemplateError, or whatever it raises)
        raise BitfitError(f"{place}: the chat template refused this conversation: {error}") from None


def _chat_pieces(tokenizer, messages: list[dict], place: str, ask: bool) -> list[Piece]:
    """The conversation as the chat template writes it, cut where each assistant turn starts and ends.

    Before an assistant turn is the conversation so far with the template's generation prompt; the turn
    is what the conversation with it adds: its content and the template's end-of-turn marker. Messages
    after the last assistant turn teach nothing and are left out. `ask` ends the pieces with the
    generation prompt after the last message, for a model to continue."""

    def rest(text: str, start: str) -> str:  # what `text` adds to `start`, which it must begin with
        if not text.startswith(start):
            raise BitfitError(f"{place}: this chat template does not write a conversation as the start of the "
                              "conversation continued, so an assistant turn's tokens cannot be told apart")
        return text[len(start) :]

    pieces, done = [], ""
    for end in [k for k, message in enumerate(messages) if message["role"] == "assistant"]:
        before = _chat(tokenizer, messages[:end], place, add_generation_prompt=True)
        after = _chat(tokenizer, messages[: end + 1], place)
        pieces += [(rest(before, done), False), (rest(after, before), True)]
        done = after
    if ask:
        pieces.append((rest(_chat(tokenizer, messages, place, add_generation_prompt=True), done), False))
    return pieces


def render(shape: str, conversation: list[dict], tokenizer, template: str, place: str, ask: bool = False) -> tuple[list[Piece], bool]:
    """The pieces of a checked row's text, and whether the chat template wrote them (`templated`).

    A chat row always goes through the tokenizer's chat template; an Alpaca row through the HF Trainer recipe's
    prompt, or the chat template with template='chat'; a prompt/completion row is used verbatim.
    `ask=True` gives the prompt alone: everything before the row's last answer, for a model to continue.
    """
    if shape == "chat" or (shape == "alpaca" and template == "chat"):
        if not tokenizer.chat_template:
            raise BitfitError(f"{place}: a chat row (messages) goes through the tokenizer's chat template, and this "
                              "tokenizer has none")
        if ask:  # the conversation up to its last assistant turn
            last = max((k for k, m in enumerate(conversation) if m["role"] == "assistant"), default=len(conversation))
            conversation = conversation[:last]
        return _chat_pieces(tokenizer, conversation, place, ask), True
    if shape == "plain":
        if ask:
            raise BitfitError(f"{place}: a plain-text row (text) asks no question: give prompts as instruction, "
                              "prompt or messages rows")
        return [(conversation[0]["content"], True)], False  # every token learned, from the first
    question, answer = conversation[0]["content"], conversation[1:]  # alpaca: instruction and input joined
    pieces = [(alpaca_prompt(question) if shape == "alpaca" else question, False)]
    return pieces + ([] if ask else [(turn["content"], True) for turn in answer]), False


# ---------------------------------------------------------------------------------------------------
# Tokenizing: only what fits in max_len
# ---------------------------------------------------------------------------------------------------


def cut_to_tokens(tokenizer, texts: list[str], n: int) -> list[str]:
    """Each text, or as much of its start as still holds its first n tokens exactly: a text longer than
    n * CHARS_PER_TOKEN characters is cut there, or where MARGIN more tokens follow (CHARS_PER_TOKEN,
    MARGIN), so tokenizing it costs what a text of n tokens does however long it is. The long texts are
    probed in one batched call; only one whose cut holds too few tokens is cut again, longer."""
    bound, cut_texts = n * CHARS_PER_TOKEN, list(texts)
    long = [i for i, text in enumerate(texts) if len(text) > bound]
    probed = tokenizer([texts[i][:bound] for i in long], add_special_tokens=False)["input_ids"] if long else []
    for i, ids in zip(long, probed):
        cut, before = bound, -1
        # Too few tokens to trust the cut: cut longer, while that still adds tokens (a run with none, such as
        # one unbroken 10 MB "word" the tokenizer makes one [UNK] of, adds none however much of it is taken).
        while len(ids) < n + MARGIN and cut < len(texts[i]) and len(ids) > before:
            cut, before = cut * 4, len(ids)
            ids = tokenizer(texts[i][:cut], add_special_tokens=False)["input_ids"]
        cut_texts[i] = texts[i][:cut]
    return cut_texts


def _first_tokens(tokenizer, texts: list[str], n: int | None, special: bool) -> list[list[int]]:
    """tokenizer(text)["input_ids"][:n] for each text (all of them if n is None), without tokenizing more
    of a long text than its first n tokens need (cut_to_tokens)."""
    if not texts:
        return []
    # One batched call for all texts: the fast tokenizer then works through them in Rust.
    ids = tokenizer(texts if n is None else cut_to_tokens(tokenizer, texts, n), add_special_tokens=special)["input_ids"]
    return ids if n is None else [row[:n] for row in ids]


def _tokenize(tokenizer, rendered: list[tuple[list[Piece], bool]], n: int | None) -> list[list[list[int]]]:
    """The token ids of every piece of every rendered row, each cut at n tokens.

    A row's first piece gets the tokenizer's special tokens (a BOS where it adds one) unless the chat
    template wrote the text, which holds its own; later pieces get none, so no BOS lands mid-sequence."""
    flat = [(text, i == 0 and not templated) for pieces, templated in rendered for i, (text, _) in enumerate(pieces)]
    ids: list = [None] * len(flat)
    for special in (True, False):
        chosen = [k for k, (_, s) in enumerate(flat) if s == special]
        for k, piece_ids in zip(chosen, _first_tokens(tokenizer, [flat[k][0] for k in chosen], n, special)):
            ids[k] = piece_ids
    pieces_ids, start = [], 0
    for pieces, _ in rendered:
        pieces_ids.append(ids[start : start + len(pieces)])
        start += len(pieces)
    return pieces_ids


# ---------------------------------------------------------------------------------------------------
# Records to examples, and to questions
# ---------------------------------------------------------------------------------------------------


def check_tokenizer(tokenizer, template: str) -> None:
    """A BitfitError if this tokenizer cannot make examples with this template: a problem of the model, not the data."""
    if tokenizer.eos_token_id is None:
        raise BitfitError("the tokenizer has no eos token, so a response could never end; set tokenizer.eos_token")
    if template not in TEMPLATES:
        raise BitfitError(f"template must be 'alpaca' or 'chat', not {template!r}")
    if template == "chat" and not tokenizer.chat_template:
        raise BitfitError("template='chat' needs a tokenizer with a chat template; this one has none")


def encode(
    records: list,
    tokenizer,
    max_len: int = 256,
    template: str = "alpaca",
    places: list[str] | None = None,
    progress: bool = True,
) -> tuple[list[Example], int]:
    """Tokenize records into training examples; returns (examples, number dropped).

    The pieces' ids end to end, labels -100 on the pieces not learned (a plain-text row has none), all three fields cut at `max_len`,
    exactly as tokenizing each whole piece and cutting would give. A learned answer ends with eos, so the
    model learns to stop (a chat template's end-of-turn marker counts where it is the eos). An example
    whose answers are cut away entirely would have no label to learn from (and a 0/0 loss), so it is
    dropped and counted. `places` name the rows in errors (default: "row 0", "row 1", ...). More than
    ENCODE_CHUNK records are tokenized chunk by chunk under a progress bar (when `progress`).
    """
    check_tokenizer(tokenizer, template)
    places = places or [f"row {index}" for index in range(len(records))]
    examples, dropped = [], 0
    for chunk in chunks(len(records), progress):
        rendered = [render(*check_record(records[i], places[i]), tokenizer, template, places[i]) for i in chunk]
        for row, (pieces, templated), pieces_ids in zip(chunk, rendered, _tokenize(tokenizer, rendered, max_len)):
            example = _example(pieces, pieces_ids, templated, tokenizer.eos_token_id, max_len)
            if example is None:
                dropped += 1
                continue
            # "row" (the index of its record) and "place" (where that record is) are for error messages;
            # the collator ignores them.
            examples.append({**example, "row": row, "place": places[row]})
    return examples, dropped


def chunks(n_rows: int, progress: bool = True) -> Iterator[range]:
    """The row indices 0..n_rows-1 in chunks of ENCODE_CHUNK, under a "tokenizing" progress bar when there
    is more than one chunk (and `progress`): how every encoder walks a large source."""
    with tqdm(total=n_rows, desc="tokenizing", unit="row", disable=not progress or n_rows <= ENCODE_CHUNK) as bar:
        for start in range(0, n_rows, ENCODE_CHUNK):
            chunk = range(start, min(start + ENCODE_CHUNK, n_rows))
            yield chunk
            bar.update(len(chunk))


def _example(pieces: list[Piece], pieces_ids: list[list[int]], templated: bool, eos: int, max_len: int) -> Example | None:
    """One row's input_ids, attention_mask and labels, or None when max_len cut away every learned token."""
    last_answer = max(k for k, (_, learned) in enumerate(pieces) if learned)
    input_ids, labels = [], []
    for k, ((_, learned), ids) in enumerate(zip(pieces, pieces_ids)):
        if k == last_answer and (not templated or eos not in ids):
            ids = ids + [eos]
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first token is never predicted: nothing to learn
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def asks(record: object) -> bool:
    """Whether a (checked) record asks a question a model can answer: every shape but plain text."""
    return check_record(record, "", need_answer=False)[0] != "plain"


def questions(records: list, tokenizer, template: str = "alpaca", places: list[str] | None = None) -> list[Question]:
    """What to ask a model about each record: (prompt ids, the question in words, the expected answer).

    The prompt ids are exactly those the record's training example has before its (last) answer, so a
    model is asked in evaluation as it was taught. A record may lack its answer here (generate.py asks
    about bare prompts): the expected answer is then ''.
    """
    places = places or [f"row {index}" for index in range(len(records))]
    checked = [check_record(row, place, need_answer=False) for row, place in zip(records, places)]
    rendered = [render(shape, turns, tokenizer, template, place, ask=True)
                for (shape, turns), place in zip(checked, places)]
    asked = []
    for (_, turns), pieces_ids in zip(checked, _tokenize(tokenizer, rendered, None)):
        answer = max((k for k, turn in enumerate(turns) if turn["role"] == "assistant"), default=None)
        before = turns[:answer]  # all turns where the row gives no answer
        asked.append(([i for ids in pieces_ids for i in ids], before[-1]["content"] if before else "",
                      turns[answer]["content"] if answer is not None else ""))
    return asked


def token_fields(example: Example) -> dict:
    """An example's input_ids, attention_mask and labels: what a collator batches (not its row and place)."""
    return {key: example[key] for key in ("input_ids", "attention_mask", "labels")}


def read_records(source: str, split: str, role: str = "training data", check=None,
                 config: str = "") -> tuple[list, list[str]]:
    """(records, places) of a source's split, every row checked by `check(row, place)` (default
    check_record; bitfit.data.labelled.check_labelled for labelled rows): all that can be wrong with the data
    itself is found here, before any model or tokenizer loads. An empty split is an error. Every error
    starts with `role` ('training data' or 'evaluation data'), so it says which flags to fix."""
    check = check or check_record
    try:
        records, places = load_records(source, split, config)
        if not records:
            raise BitfitError(f"{source} {split} holds no records")
        for row, place in zip(records, places):
            check(row, place)
    except BitfitError as error:
        raise BitfitError(f"{role}: {error}") from None
    return records, places


def examples_of(records: list, places: list[str], name: str, tokenizer, max_len: int = 256, template: str = "alpaca",
                role: str = "training data", progress: bool = True) -> tuple[list[Example], int]:
    """(examples, number dropped) of records from read_records (of the source and split `name`): encode,
    where records none of which keeps a label within max_len are an error that starts with `role`."""
    check_tokenizer(tokenizer, template)  # its problems are the model's, not the data's: no `role`
    try:
        examples, dropped = encode(records, tokenizer, max_len, template, places, progress)
        if not examples:
            raise BitfitError(f"no usable examples in {name}: {dropped} dropped because max_len "
                              f"{max_len} cut away their whole response")
    except BitfitError as error:
        raise BitfitError(f"{role}: {error}") from None
    return examples, dropped


def load_examples(
    source: str,
    split: str,
    tokenizer,
    max_len: int = 256,
    template: str = "alpaca",
    role: str = "training data",
) -> tuple[list, list[Example], int]:
    """(records, examples, number dropped) of a source's split: read_records, then examples_of."""
    check_tokenizer(tokenizer, template)
    records, places = read_records(source, split, role)
    return (records, *examples_of(records, places, f"{source} {split}", tokenizer, max_len, template, role))
