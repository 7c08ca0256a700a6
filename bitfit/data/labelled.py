"""Labelled rows, for classification and regression: a text (or a pair of texts) and its label, to token ids.

Row shapes (`check_labelled`); other keys are ignored:
    text, label                       one text
    sentence1, sentence2, label       a pair, encoded as the tokenizer's sentence pair ([CLS] a [SEP] b [SEP])
and GLUE's own column names: sentence (SST-2, CoLA); question, sentence (QNLI); premise, hypothesis (MNLI);
question1, question2 (QQP); sentence1, sentence2 (MRPC, RTE, STS-B). A data set is all pairs or all
single texts (`one_shape`): a pair row that lacks its second text is refused, not read as a single text.

Labels: for --task classify a class, given as an int, or as a name. A label is read as what it says, not
as it is spelled: surrounding spaces are dropped, and a whole number, written "1", " 1", "1.0" or 1.0 (a
CSV cell is text; a Parquet column of numbers may be floats), is the int 1. Which output of the model is
which class (`label_names`), saved with the run and written into everything exported as id2label /
label2id, keeps the ids the data has: a dataset's ClassLabel column's own order (GLUE's: on MRPC class 1
is `equivalent`), an int label its own id (classes 0 to the largest), and names without ids sorted. For
--task regress a finite number (a CSV cell's text read as one). A bad label (missing, null, of the wrong
type, NaN, a class the training data never had, GLUE's -1 "no label") is one error naming its file and
line, before any model loads.
"""

import re

from bitfit.core.errors import BitfitError
from bitfit.data.examples import Example, chunks, cut_to_tokens, text_field
from bitfit.files import finite_number

PAIRS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("question1", "question2"))
SINGLES = ("text", "sentence")
SHAPES = "text (or GLUE's sentence), or a pair: sentence1/sentence2, question/sentence, premise/hypothesis, question1/question2"
TASKS = ("classify", "regress")
MAX_TARGET = 1e15  # a regression target's largest size: its squared error must stay far inside float32
MAX_CLASSES = 10_000  # an int label is its class's id: the head has as many outputs as the largest id, plus one


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
    """The row's label, checked for the task and read as what it says: a class (an int id, or a name without
    its surrounding spaces), or a finite number."""
    if "label" not in row:
        raise BitfitError(f"{place}: no 'label' field (keys: {sorted(map(str, row))})")
    label = row["label"]
    if label is None:
        raise BitfitError(f"{place}: the label is null")
    if isinstance(label, str):
        label = label.strip()  # " 1" and "1", "pos " and "pos": one label each
    if task == "regress":
        if isinstance(label, str):  # a CSV cell is text: "3.5" is the number 3.5
            try:
                label = float(label)
            except ValueError:
                pass
        if not isinstance(label, (int, float)) or isinstance(label, bool):
            raise BitfitError(f"{place}: --task regress needs a number as the label, found {type(label).__name__} {label!r:.40}")
        if not finite_number(label) or abs(float(label)) > MAX_TARGET:
            raise BitfitError(f"{place}: the label is {str(label)[:40]}, not a finite number of at most {MAX_TARGET:g} "
                              "(a target is learned in float32, where a larger one's squared error overflows)")
        return float(label)
    label = class_id(label)
    if isinstance(label, int) and not isinstance(label, bool):
        if label < 0:
            raise BitfitError(f"{place}: label {label} is no class (GLUE's test splits mark 'no label' with -1: use a "
                              "split with labels, such as validation)")
        if label >= MAX_CLASSES:
            said = str(label) if len(str(label)) <= 20 else f"{str(label)[:12]}... ({len(str(label))} digits)"
            raise BitfitError(f"{place}: label {said} as a class id asks for that many outputs and one more (an int label "
                              f"is its class's id, from 0); give at most {MAX_CLASSES:,} classes, or name them with strings")
        return label
    if isinstance(label, str) and label:
        return label
    hint = "; for a number to predict use --task regress" if isinstance(label, float) else ""
    raise BitfitError(f"{place}: --task classify needs an int or a non-empty string as the label (a class), found "
                      f"{type(label).__name__} {label!r:.40}{hint}")


WHOLE_NUMBER = re.compile(r"[+-]?\d+(\.0*)?")


def read_class(label: object) -> object:
    """A class label as training reads it: a name without its surrounding spaces, a whole number as its int."""
    return class_id(label.strip() if isinstance(label, str) else label)


def class_id(label: object) -> object:
    """A class label that is a whole number, however written ("1", "1.0", 1.0), as that int; else itself."""
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and WHOLE_NUMBER.fullmatch(label) and len(label) < 20:
        return int(label.split(".")[0])
    return label


def check_labelled(row: object, place: str, task: str) -> tuple[tuple[str, ...], int | str | float]:
    """(texts, label) of one row, or a BitfitError naming its place and what is wrong."""
    texts = texts_of(row, place)
    return texts, check_label(row, place, task)


def one_shape(texts: list[tuple[str, ...]], places: list[str], width: int | None = None, whose: str = "other rows") -> int:
    """How many texts each row has (1, or 2 for a pair), the same for every row: a row of the other shape
    is a BitfitError naming it (a pair row that lacks its second text would otherwise be read as a single
    text). `width`: the shape the rows must have, that of `whose` rows (the training data's, for held-out
    rows); by default the shape most rows have."""
    widths = [len(row) for row in texts]
    width = width or max((1, 2), key=widths.count)
    odd = next((i for i, w in enumerate(widths) if w != width), None)
    if odd is not None:
        one, many = {1: "a single text", 2: "a pair of texts"}, {1: "single texts", 2: "pairs"}
        raise BitfitError(f"{places[odd]}: {one[widths[odd]]}, where the {whose} are {many[width]}: a data set is all "
                          f"pairs or all single texts ({SHAPES}); is a field of this row missing or misspelt?")
    return width


def label_names(labels: list, places: list[str], declared: list[str] | None = None) -> list:
    """The classes of the training rows' (checked) labels, class i being the i-th: the data's own class names
    where it declares them (`declared`: a ClassLabel column's), ints as their own ids (0 to the largest,
    whatever rows there are), names sorted. A BitfitError when ints and strings mix, when there is only one
    class, or when a label is not one of the declared classes."""
    if declared and len(class_ids(declared)) < len(declared):  # two names that read as one label ("01", "1")
        read = [str(read_class(name)) for name in declared]
        twins = [name for name, text in zip(declared, read) if read.count(text) > 1]
        raise BitfitError(f"the data declares the classes {declared}, of which {twins} read as one label (bitfit reads "
                          "a label as what it says: spaces dropped, a whole number as its int): rename them apart")
    seen: dict = {}
    for label, place in zip(labels, places):
        seen.setdefault(label, place)
    kinds = {type(label) for label in seen}
    if len(kinds) > 1 and not declared:  # declared names say what each class is, whatever they look like
        first = {kind: next(place for label, place in seen.items() if type(label) is kind) for kind in kinds}
        raise BitfitError(f"the labels mix numbers and strings ({', '.join(f'{k.__name__} at {p}' for k, p in first.items())}): "
                          "give every class the same way")
    if len(seen) < 2:
        label, place = next(iter(seen.items()))
        raise BitfitError(f"every row has the label {label!r} (the first at {place}): a classifier needs at least two classes")
    if declared:
        ids = class_ids(declared)
        if unknown := next((label for label in seen if str(label) not in ids), None):
            raise BitfitError(f"{seen[unknown]}: label {unknown!r} is not one of the classes the data declares {declared}")
        return list(declared)
    return list(range(max(seen) + 1)) if int in kinds else sorted(seen)


def class_ids(classes: list) -> dict[str, int]:
    """Each class's id, by its name read as a label is (class_id) and then as text: a label is compared with
    the classes as what it says (a class a dataset declares as "1", "01" or "1.0" is the label 1)."""
    return {str(read_class(name)): i for i, name in enumerate(classes)}


def check_rows(train: tuple[list, list[str]], held_out: tuple[list, list[str]] | None, task: str,
               declared: list[str] | None = None) -> list | None:
    """A classifier's classes (label_names; None for a regressor), once the training rows (records, places)
    are one shape (one_shape) and the held-out rows (or None) that same shape, each labelled with a class
    of the training data's. A BitfitError starting with which data it is about."""
    role = "training data"
    try:
        checked = [check_labelled(row, place, task) for row, place in zip(*train)]
        width = one_shape([texts for texts, _ in checked], train[1])
        classes = label_names([label for _, label in checked], train[1], declared) if task == "classify" else None
        role = "evaluation data"
        held = [check_labelled(row, place, task) for row, place in zip(*(held_out or ([], [])))]
        if held:
            one_shape([texts for texts, _ in held], held_out[1], width, "training data's rows")
        ids = class_ids(classes or [])
        for (_, label), place in zip(held, held_out[1] if held_out else []):  # a class the model has no output for
            if classes and str(label) not in ids:
                raise BitfitError(f"{place}: label {label!r} is not one of the training data's classes {classes}")
    except BitfitError as error:
        raise BitfitError(f"{role}: {error}") from None
    return classes


def encode_labelled(records: list, places: list[str], tokenizer, max_len: int, task: str, classes: list | None,
                    progress: bool = True) -> list[Example]:
    """Examples of checked rows: input_ids and attention_mask (and token_type_ids where the tokenizer makes
    them) cut to max_len (`tokenize`), a pair as the tokenizer's sentence pair; "label" the class id
    (classify) or the number (regress). A class the training data never had is an error naming the row."""
    ids = class_ids(classes or [])
    examples = []
    for chunk in chunks(len(records), progress):
        checked = [check_labelled(records[i], places[i], task) for i in chunk]
        for i, (_, label), fields in zip(chunk, checked, tokenize(tokenizer, [texts for texts, _ in checked], max_len)):
            if task == "classify" and str(label) not in ids:
                raise BitfitError(f"{places[i]}: label {label!r} is not one of the training data's classes {classes}")
            examples.append({**fields, "label": ids[str(label)] if task == "classify" else label, "row": i, "place": places[i]})
    return examples


def tokenize(tokenizer, rows: list[tuple[str, ...]], max_len: int) -> list[dict[str, list[int]]]:
    """Each row (a text, or a pair: the tokenizer's sentence pair) encoded and cut to max_len tokens:
    input_ids, attention_mask, and token_type_ids where the tokenizer makes them. One batched call per shape.
    Only what max_len can hold of a long text is tokenized (examples.cut_to_tokens), so a 10 MB text costs
    what a short one does. A max_len that leaves no token of text beside the tokenizer's special tokens is
    a BitfitError: the tokenizer would not cut such a row at all."""
    encoded: list = [None] * len(rows)
    for width in (1, 2):
        chosen = [i for i, texts in enumerate(rows) if len(texts) == width]
        if not chosen:
            continue
        special = tokenizer.num_special_tokens_to_add(pair=width == 2)
        if max_len < special + width:
            raise BitfitError(f"--max-len {max_len} leaves no room for text: the tokenizer adds {special} special "
                              f"tokens to {'a pair' if width == 2 else 'a text'}, so it cannot cut one to fewer than "
                              f"{special + width} tokens; use a --max-len of at least that")
        columns = [cut_to_tokens(tokenizer, [rows[i][column] for i in chosen], max_len) for column in range(width)]
        batch = tokenizer(*columns, truncation=True, max_length=max_len)
        for k, i in enumerate(chosen):
            encoded[i] = {key: batch[key][k] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
            if len(encoded[i]["input_ids"]) > max_len:  # never trust a silent refusal to cut
                raise BitfitError(f"the tokenizer did not cut a row to --max-len {max_len} tokens (it gave "
                                  f"{len(encoded[i]['input_ids'])}); use a larger --max-len")
    return encoded
