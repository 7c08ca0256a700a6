"""Labelled rows, for classification and regression: a text (or a pair of texts) and its label, to token ids.

Row shapes (`check_labelled`); other keys are ignored:
    text, label                       one text
    sentence1, sentence2, label       a pair, encoded as the tokenizer's sentence pair ([CLS] a [SEP] b [SEP])
and GLUE's own column names: sentence (SST-2, CoLA); question, sentence (QNLI); premise, hypothesis (MNLI);
question1, question2 (QQP); sentence1, sentence2 (MRPC, RTE, STS-B).

Labels: for --task classify an int or a string, one class each (a CSV file's cells are text: its classes
are strings, "1" and not 1); the classes are the training data's labels in sorted order, class i being
the i-th (`label_names`), saved with the run and written into everything exported as id2label /
label2id. For --task regress a finite number (a CSV cell's text read as one). A bad label (missing,
null, of the wrong type, NaN, a class the training data never had, GLUE's -1 "no label") is one error
naming its file and line, before any model loads.
"""

from bitfit.core.errors import BitfitError
from bitfit.data.examples import Example, chunks, text_field
from bitfit.files import finite_number

PAIRS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("question1", "question2"))
SINGLES = ("text", "sentence")
SHAPES = "text (or GLUE's sentence), or a pair: sentence1/sentence2, question/sentence, premise/hypothesis, question1/question2"
TASKS = ("classify", "regress")
MAX_TARGET = 1e15  # a regression target's largest size: its squared error must stay far inside float32


def texts_of(row: object, place: str) -> tuple[str, ...]:
    """The row's text, or its two texts, checked; a BitfitError naming the place otherwise."""
    if not isinstance(row, dict):
        raise BitfitError(f"{place}: expected a record with a label and {SHAPES}, found {row!r:.80}")
    pair = next((keys for keys in PAIRS if all(key in row for key in keys)), None)
    keys = pair or next(((key,) for key in SINGLES if key in row), None)
    if keys is None:
        raise BitfitError(f"{place}: a labelled row needs the fields {SHAPES}; this one has {sorted(map(str, row))}")
    return tuple(text_field(row, key, place) for key in keys)


def check_label(row: dict, place: str, task: str) -> int | str | float:
    """The row's label, checked for the task: an int or a string class, or a finite number."""
    if "label" not in row:
        raise BitfitError(f"{place}: no 'label' field (keys: {sorted(map(str, row))})")
    label = row["label"]
    if label is None:
        raise BitfitError(f"{place}: the label is null")
    if task == "regress" and isinstance(label, str):  # a CSV cell is text: "3.5" is the number 3.5
        try:
            label = float(label)
        except ValueError:
            pass
    number = isinstance(label, (int, float)) and not isinstance(label, bool)
    if task == "regress":
        if not number:
            raise BitfitError(f"{place}: --task regress needs a number as the label, found {type(label).__name__} {label!r:.40}")
        if not finite_number(label) or abs(float(label)) > MAX_TARGET:
            raise BitfitError(f"{place}: the label is {str(label)[:40]}, not a finite number of at most {MAX_TARGET:g} "
                              "(a target is learned in float32, where a larger one's squared error overflows)")
        return float(label)
    if isinstance(label, int) and not isinstance(label, bool):
        if label < 0:
            raise BitfitError(f"{place}: label {label} is no class (GLUE's test splits mark 'no label' with -1: use a "
                              "split with labels, such as validation)")
        return label
    if isinstance(label, str) and label.strip():
        return label
    hint = "; for a number to predict use --task regress" if number else ""
    raise BitfitError(f"{place}: --task classify needs an int or a non-empty string as the label (a class), found "
                      f"{type(label).__name__} {label!r:.40}{hint}")


def check_labelled(row: object, place: str, task: str) -> tuple[tuple[str, ...], int | str | float]:
    """(texts, label) of one row, or a BitfitError naming its place and what is wrong."""
    texts = texts_of(row, place)
    return texts, check_label(row, place, task)


def label_names(labels: list, places: list[str]) -> list:
    """The classes of the training rows' (checked) labels, sorted (ints by value, strings alphabetically):
    class i is the i-th. A BitfitError when ints and strings mix or when there is only one class."""
    seen: dict = {}
    for label, place in zip(labels, places):
        seen.setdefault(label, place)
    kinds = {type(label) for label in seen}
    if len(kinds) > 1:
        first = {kind: next(place for label, place in seen.items() if type(label) is kind) for kind in kinds}
        raise BitfitError(f"the labels mix numbers and strings ({', '.join(f'{k.__name__} at {p}' for k, p in first.items())}): "
                          "give every class the same way")
    if len(seen) < 2:
        label, place = next(iter(seen.items()))
        raise BitfitError(f"every row has the label {label!r} (the first at {place}): a classifier needs at least two classes")
    return sorted(seen)


def encode_labelled(records: list, places: list[str], tokenizer, max_len: int, task: str, classes: list | None,
                    progress: bool = True) -> list[Example]:
    """Examples of checked rows: input_ids and attention_mask (and token_type_ids where the tokenizer makes
    them) cut to max_len, a pair as the tokenizer's sentence pair; "label" the class id (classify) or the
    number (regress). A class the training data never had is an error naming the row."""
    ids = {label: i for i, label in enumerate(classes or [])}
    examples = []
    for chunk in chunks(len(records), progress):
        checked = [check_labelled(records[i], places[i], task) for i in chunk]
        # One batched call per shape: single texts, then pairs.
        for width in (1, 2):
            rows = [(i, texts, label) for i, (texts, label) in zip(chunk, checked) if len(texts) == width]
            if not rows:
                continue
            columns = list(zip(*(texts for _, texts, _ in rows)))
            encoded = tokenizer(list(columns[0]), list(columns[1]) if width == 2 else None, truncation=True,
                                max_length=max_len)
            for k, (i, _, label) in enumerate(rows):
                if task == "classify" and label not in ids:
                    raise BitfitError(f"{places[i]}: label {label!r} is not one of the training data's classes "
                                      f"{classes}")
                fields = {key: encoded[key][k] for key in ("input_ids", "attention_mask", "token_type_ids")
                          if key in encoded}
                examples.append({**fields, "label": ids[label] if task == "classify" else label, "row": i,
                                 "place": places[i]})
    return sorted(examples, key=lambda example: example["row"])
