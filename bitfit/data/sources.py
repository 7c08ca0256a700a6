"""Rows in, token ids with -100 prompt labels out.

Sources (`load_records`): the built-in task, a local .json file (a list of rows), .jsonl file (one row
a line), .csv file (a header line, then one row a record; a `messages` cell holds its conversation as
JSON text) or .parquet file, a folder written by `Dataset.save_to_disk`, or a hub dataset. Every row comes
with its place, so an error names what a user can open and look at:
    data.jsonl line 12        a JSONL line, counted from 1 as editors count
    data.csv line 12          the line a CSV record starts on, counted from 1 (a quoted cell may span lines)
    data.json element 3       an element of a JSON list, counted from 0 as Python counts
    data.parquet row 3        a Parquet row, counted from 0
    saved train row 7         a dataset row (save_to_disk, hub, built-in), counted from 0
A split picks and slices, the same way for every source: NAME or NAME[START:END], a bound being a number
or a percentage (train, train[:1000], train[10%:-5]). A file or a saved single Dataset has one split,
'train'; a saved DatasetDict and a hub dataset have theirs.
"""

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from bitfit import hub
from bitfit.core.errors import BitfitError
from bitfit.data.tasks import LABELLED, builtin_labelled, builtin_records
from bitfit.files import parse_json

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


# ---------------------------------------------------------------------------------------------------
# Loading records
# ---------------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")  # a bound: digits, a sign, a percent sign


def parse_split(expression: str) -> tuple[str, slice]:
    """ "train[:1000]" -> ("train", slice(None, "1000")); bounds may be percentages ("train[10%:]")."""
    match = _SPLIT.match(expression.replace(" ", ""))
    if not match:
        raise BitfitError(f"split {expression!r} is not of the form NAME or NAME[START:END] (a bound is a number "
                          "or a percentage), e.g. train, train[:1000], train[10%:20%]")
    name, start, end = match.groups()
    return name, slice(start, end)


def select(n: int, bounds: slice) -> range:
    """The indices that `bounds` (from parse_split) takes out of n rows: range(n)[start:end], percentages of n."""

    def index(bound: str | None) -> int | None:
        if bound is None:
            return None
        return round(n * int(bound[:-1]) / 100) if bound.endswith("%") else int(bound)

    return range(n)[index(bounds.start) : index(bounds.stop)]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number from 1, text) of each line of a UTF-8 text file, read one line at a time.

    Lines end at "\\n" (a "\\r" before it goes too) and nowhere else: str.splitlines() would also split
    inside a JSON string at U+2028 or U+0085, which are text. A UTF-8 byte order mark at the start is
    skipped, as editors on Windows write one. Bytes that are not UTF-8 are an error naming the line.
    """
    try:
        file = path.open("rb")  # bytes, so a decoding error is caught at its own line
    except FileNotFoundError:
        raise BitfitError(f"no such file or folder: {path}") from None
    except OSError as error:  # permission denied, a folder, ...
        raise BitfitError(f"cannot read {path}: {error.strerror}") from None
    with file:
        for number, raw in enumerate(file, start=1):
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise BitfitError(f"{path} line {number} is not valid UTF-8 (byte {raw[error.start]:#04x} at "
                                  f"position {error.start + 1}); save the file as UTF-8") from None


def _read_jsonl(path: Path, bounds: slice) -> tuple[list, list[str]]:
    lines = [(number, text) for number, text in read_lines(path) if text.strip()]
    rows, places = [], []
    for number, text in (lines[i] for i in select(len(lines), bounds)):  # only the lines used are parsed
        try:
            rows.append(parse_json(text, strict=False))
        except ValueError as error:
            raise BitfitError(f"{path} line {number} is not valid JSON ({getattr(error, 'msg', error)})") from None
        places.append(f"{path} line {number}")
    return rows, places


def _read_json(path: Path, bounds: slice) -> tuple[list, list[str]]:
    text = "\n".join(line for _, line in read_lines(path))  # read_lines: the UTF-8 check and its line numbers
    try:
        rows = parse_json(text, strict=False)
    except json.JSONDecodeError as error:
        raise BitfitError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except ValueError as error:  # too deep, too many digits
        raise BitfitError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(rows, list):
        raise BitfitError(f"{path}: expected a JSON list of records, found a {type(rows).__name__}")
    indices = select(len(rows), bounds)
    return [rows[i] for i in indices], [f"{path} element {i}" for i in indices]


def _read_csv(path: Path, bounds: slice) -> tuple[list, list[str]]:
    """The records of a CSV file: its first line names the fields; each record is placed at the line it
    starts on. Every cell is text; a `messages` cell holds the conversation as JSON text."""
    csv.field_size_limit(2**31 - 1)  # a cell may be as long as any JSON field (csv's default stops at 128 KiB)
    # strict: a stray quote or an unclosed one is an error, not a cell that swallows the rest of the file
    reader = csv.reader((text + "\n" for _, text in read_lines(path)), strict=True)  # read_lines: UTF-8, by line
    rows, places, start = [], [], 1  # start: the line the record being read starts on
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        if len(set(header)) != len(header) or not all(name.strip() for name in header):
            raise BitfitError(f"{path} line 1: the header must name every field once, found {header}")
        start = reader.line_num + 1
        for cells in reader:
            place = f"{path} line {start}"
            start = reader.line_num + 1
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise BitfitError(f"{place}: {len(cells)} fields, but the header (line 1) names {len(header)}")
            row = dict(zip(header, cells))
            if "messages" in row:
                try:
                    row["messages"] = parse_json(row["messages"], strict=False)
                except ValueError as error:
                    raise BitfitError(f"{place}: a 'messages' cell holds the conversation as JSON text "
                                      f"([{{\"role\": ..., \"content\": ...}}, ...]), and this one is not JSON "
                                      f"({getattr(error, 'msg', error)})") from None
            rows.append(row)
            places.append(place)
    except csv.Error as error:
        raise BitfitError(f"{path} line {start}: not valid CSV ({error}; a quote opened in this record may be the "
                          "cause)") from None
    indices = select(len(rows), bounds)
    return [rows[i] for i in indices], [places[i] for i in indices]


def _read_parquet(path: Path, bounds: slice) -> tuple[list, list[str]]:
    import pyarrow.parquet  # datasets' own dependency; imported here, as datasets is below

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # noqa: BLE001: pyarrow's error types for a file that is no Parquet
        raise BitfitError(f"{path} is not a readable Parquet file ({str(error).strip().splitlines()[0]})") from None
    indices = select(table.num_rows, bounds)
    if not indices:  # pyarrow cannot take no rows of some column types
        return [], []
    return table.take(list(indices)).to_pylist(), [f"{path} row {i}" for i in indices]  # converts only the rows used


def _read_dataset(dataset, name: str, bounds: slice) -> tuple[list, list[str]]:
    indices = select(len(dataset), bounds)
    rows = dataset.select(indices).to_list()  # converts only the rows used
    label = dataset.features.get("label")
    if getattr(label, "names", None):  # a ClassLabel (GLUE's): each class by its name; -1 ("no label") stays
        rows = [{**row, "label": label.names[row["label"]]} if isinstance(row.get("label"), int) and row["label"] >= 0
                else row for row in rows]
    return rows, [f"{name} row {i}" for i in indices]


def _looks_local(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path, not a hub name (NAME or OWNER/NAME)."""
    return (Path(source).suffix.lower() in DATA_FILE_SUFFIXES or source.startswith((".", "~", "/"))
            or source.count("/") > 1 or "\\" in source)


def is_builtin(source: str) -> bool:
    """Whether `source` names a built-in task (bitfit.data.tasks)."""
    return source == "builtin" or source in LABELLED


def is_hub_name(source: str) -> bool:
    """Whether load_records would ask the hub for `source`: not the built-in task, nothing on disk, and not
    a path that is missing."""
    return not is_builtin(source) and not Path(source).expanduser().exists() and not _looks_local(source)


def load_records(source: str, split: str = "train", config: str = "") -> tuple[list, list[str]]:
    """The rows of a data source's split, in order, and the place of each ("data.jsonl line 12").

    `source` is "builtin" (the built-in task, splits "train" and "heldout"), a .json, .jsonl, .csv or
    .parquet file, a folder written by `Dataset.save_to_disk`, or the name of a hub dataset. `split` selects and slices:
    "train", "train[:1000]", "heldout[10%:20%]". `config` names a hub dataset's configuration (GLUE's
    "sst2"); the labels of a hub or saved dataset's ClassLabel column come as their names. Rows are
    returned as they are; `check_record` (or bitfit.data.labelled.check_labelled) checks them.
    """
    if not source.strip():
        raise BitfitError("no data source given (an empty name); give 'builtin', a .json/.jsonl/.csv/.parquet file, a "
                          "save_to_disk folder or a hub dataset name")
    name, bounds = parse_split(split)
    if is_builtin(source):
        try:
            records = builtin_records(name) if source == "builtin" else builtin_labelled(source, name)
        except ValueError as error:
            raise BitfitError(str(error)) from None
        indices = select(len(records), bounds)
        return [records[i] for i in indices], [f"{source} {name} row {i}" for i in indices]

    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()  # DATA.JSONL is a JSONL file too
        if suffix not in DATA_FILE_SUFFIXES:
            raise BitfitError(f"{path}: a data file must be .json, .jsonl, .csv or .parquet, not "
                              f"{suffix or 'without a suffix'}")
        if name != "train":
            raise BitfitError(f"{path} is a data file, which has one split, 'train': give train or train[START:END], "
                              f"not {split!r}")
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        return readers[suffix](path, bounds)
    if not path.is_dir() and _looks_local(source):
        raise BitfitError(f"no such file or folder: {path}")
    return _read_dataset(_dataset(source, split, config), f"{path if path.is_dir() else source} {name}", bounds)


def declared_classes(source: str, split: str = "train", config: str = "") -> list[str] | None:
    """The class names a saved or hub dataset declares for its `label` column (a ClassLabel, as GLUE's), in its
    own order, class i the i-th; None for any other source (load_records has read it already)."""
    path = Path(source).expanduser()
    if is_builtin(source) or path.is_file() or (not path.is_dir() and _looks_local(source)):
        return None
    label = _dataset(source, split, config).features.get("label")
    return list(label.names) if getattr(label, "names", None) else None


def _dataset(source: str, split: str, config: str):
    """The named split of `split` (its slice is load_records') of a folder written by save_to_disk, or of a
    hub dataset."""
    import datasets  # imported here: it is slow to import and only these two sources need it

    path, name = Path(source).expanduser(), parse_split(split)[0]
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise BitfitError(f"{path} is a folder, but not one written by Dataset.save_to_disk or "
                              "DatasetDict.save_to_disk") from None
        except OSError as error:
            raise BitfitError(f"cannot read {path}: {error.strerror}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise BitfitError(f"{path} has splits {sorted(loaded)}, not {name!r}")
            return loaded[name]
        if name != "train":  # a saved Dataset is one split: any other name is a mistake, never ignored
            raise BitfitError(f"{path} is a saved Dataset, which has one split, 'train': give train or "
                              f"train[START:END], not {split!r}")
        return loaded

    # Anything else is a hub dataset name.
    offline = hub.unreachable(f"the dataset {source!r}")
    try:
        return datasets.load_dataset(source, *([config] if config else []), split=name)
    except Exception as error:  # misspelt, private, no such split, offline: the hub's own words say which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BitfitError(offline or f"{source!r} is no local file or folder, and the hub could not load it: "
                                     f"{first_line}") from None


def dataset_dict_splits(source: str) -> list[str] | None:
    """The splits of a folder that DatasetDict.save_to_disk wrote (read from its dataset_dict.json, without
    loading anything), or None for any other source."""
    index = Path(source).expanduser() / "dataset_dict.json"
    try:
        splits = parse_json(index.read_text()).get("splits") if index.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return [str(split) for split in splits] if isinstance(splits, list) else None
