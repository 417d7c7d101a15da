"""One reader for labelled text, whatever file it comes in (docs/classification.md#data).

Formats, chosen by ``format`` or the file's extension: ``tsv`` (``.tsv``, ``.txt``:
``text<TAB>label``, the label after the *last* tab), ``csv`` (``.csv``: quoted fields and
multi-line texts as Python's ``csv`` reads them), ``jsonl`` (``.jsonl``, ``.ndjson``, ``.json``:
one object a line, or one JSON array), ``parquet`` (``.parquet``, ``.pq``; needs pyarrow) and
``arrow`` (a directory ``datasets.Dataset.save_to_disk`` wrote; needs datasets).

Columns: ``text_column`` / ``label_column`` name them (or give 0-based positions in a file
without a header); left out, the first of ``TEXT_NAMES`` / ``LABEL_NAMES`` present is used.
A TSV or CSV file's first row is a header when every cell is a short name and one of them is
a known column name (``header=True/False`` decides instead). Integer labels can be given
names (``label_names=["negative", "positive"]``: 0 is "negative"); a ``datasets`` ClassLabel
column brings its own names. Files are read as a stream, ``limit`` examples at most; every
bad input is a ValueError of one line naming ``file:line`` (``file: row N`` in Parquet and
Arrow). Host-side code: no array library.
"""
from __future__ import annotations

import csv
import io
import json
import re
from itertools import islice
from dataclasses import dataclass
from pathlib import Path

from ..text.datasets import SENTIMENT_SPLITS
from ..files.untrusted import regular_file

FORMATS = ("tsv", "csv", "jsonl", "parquet", "arrow")
EXTENSIONS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
TEXT_NAMES = ("text", "sentence", "content", "review", "document", "question")
LABEL_NAMES = ("label", "labels", "class", "target", "sentiment", "category")
MAX_DATA_BYTES = 512 << 20    # a data file becomes a list of examples: bounded first
MAX_LINE_BYTES = 1 << 20      # a longer line is a binary or a wrongly split file
MAX_LABELS = 1 << 16          # classes a classifier may have (its head is C x d)
MAX_LABEL_CHARS = 256


@dataclass
class Example:
    text: str
    label: str          # as written in the file
    source: str         # "file:line", for error messages
_NAME = re.compile(r"[A-Za-z_][\w .\-]{0,39}")


def format_of(path, format: str | None = None) -> str:
    """The format of ``path``: ``format`` when given, else from the extension."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}")
        return format
    path = Path(path)
    if path.is_dir():
        return "arrow"
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise ValueError(f"{path}: cannot tell the format from the extension "
                         f"{path.suffix or '(none)'}; pass --format, one of {FORMATS}")
    return found


def resolve(path) -> Path:
    """A path, or a shipped split by name (``sentiment:train``, ``sentiment:val``)."""
    text = str(path)
    if text.startswith("sentiment:"):
        split = text.split(":", 1)[1]
        if split not in SENTIMENT_SPLITS:
            raise ValueError(f"{text}: the shipped sentiment data has the splits "
                             f"{sorted(SENTIMENT_SPLITS)}")
        return SENTIMENT_SPLITS[split]
    return Path(path)


def read_examples(path, format: str | None = None, text_column=None, label_column=None,
                  label_names=None, header: bool | None = None, limit: int | None = None,
                  split: str | None = None) -> list[Example]:
    """The examples of one file (at most ``limit``); an empty file is an error."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    if split is None:
        path, split = split_of(path)
    path = resolve(path)
    examples = list(islice(iter_examples(path, format, text_column, label_column, label_names,
                                         header, split), limit))
    if not examples:
        raise ValueError(f"{path}: empty file (no examples)")
    return examples


def iter_examples(path, format=None, text_column=None, label_column=None, label_names=None,
                  header=None, split=None):
    """The examples of ``path`` one at a time (see the module docstring)."""
    path = resolve(path)
    kind = format_of(path, format)
    if kind != "arrow" and not path.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else
                         f"{path}: a directory, not a {kind} file")
    if kind != "arrow":
        regular_file(path, MAX_DATA_BYTES, "data file")   # a size the host can hold
    reader = {"tsv": _tsv, "csv": _csv, "jsonl": _jsonl, "parquet": _parquet,
              "arrow": _arrow}[kind]
    names = None if label_names is None else [str(n) for n in label_names]
    try:
        for example in reader(path, text_column, label_column, header, split):
            yield _named(example, names)
    except OSError as exc:   # a device or a file that fails mid-read: one line, with the file
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _named(example: Example, names) -> Example:
    if names is None:
        return example
    label = example.label
    if not (label.isascii() and label.isdigit()):
        if label in names:
            return example
        raise ValueError(f"{example.source}: label {label!r} is neither an index nor one of "
                         f"the label names {names}")
    if int(label) >= len(names):
        raise ValueError(f"{example.source}: label {label} has no name (label names: {names})")
    return Example(example.text, names[int(label)], example.source)


def _lines(path):
    """``(line number, text)`` of a UTF-8 file, read as a stream."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes "
                                 "(not a text file?)")
            try:
                yield number, raw.decode("utf-8").lstrip("\ufeff" if number == 1 else "")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number}: not UTF-8 text "
                                 f"(byte 0x{raw[exc.start]:02x})") from None


def _is_header(cells, text_column, label_column, header) -> bool:
    if header is not None:
        return bool(header)
    cells = [c.strip() for c in cells]
    given = {str(c) for c in (text_column, label_column) if c is not None}
    known = {n.lower() for n in TEXT_NAMES + LABEL_NAMES}
    return (all(_NAME.fullmatch(c) for c in cells)
            and any(c in given or c.lower() in known for c in cells))


def _column(columns, wanted, defaults, where, role) -> int:
    """The index of the ``role`` column among ``columns`` (a header's names or None)."""
    if wanted is not None and str(wanted).isdigit() and (columns is None
                                                        or str(wanted) not in columns):
        return int(wanted)
    if columns is None:
        raise ValueError(f"{where}: no header row, so --{role}-column must be a 0-based "
                         f"position, not {wanted!r}")
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{where}: no column {wanted!r}; the header has {columns}")
        return columns.index(wanted)
    lower = [c.lower() for c in columns]
    for name in defaults:
        if name in lower:
            return lower.index(name)
    raise ValueError(f"{where}: no {role} column among {columns}; pass --{role}-column")


def _example(text, label, where) -> Example:
    text, label = str(text).strip(), str(label).strip()
    if not text or not label:
        raise ValueError(f"{where}: empty {'text' if not text else 'label'}")
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"{where}: a label of {len(label):,} characters (at most "
                         f"{MAX_LABEL_CHARS})")
    return Example(text, label, where)


def _tsv(path, text_column, label_column, header, split):
    columns = t = y = None
    for number, line in _lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if "\t" not in line:
            raise ValueError(f"{where}: no tab; expected 'text<TAB>label'"
                             + (" (a CSV file? pass --format csv)" if "," in line else ""))
        cells = line.split("\t")
        if columns is None and t is None:
            if _is_header(cells, text_column, label_column, header):
                columns = [c.strip() for c in cells]
                t = _column(columns, text_column, TEXT_NAMES, where, "text")
                y = _column(columns, label_column, LABEL_NAMES, where, "label")
                continue
            if text_column is None and label_column is None:
                t = y = "last tab"                    # text<TAB>label, the text may hold tabs
            else:
                t = 0 if text_column is None else _column(None, text_column, (), where, "text")
                y = -1 if label_column is None else _column(None, label_column, (), where,
                                                            "label")
        if t == "last tab":
            body, _, label = line.rpartition("\t")
            yield _example(body, label, where)
        else:
            yield _example(*_cells(cells, (t, y), where), where)


def _cells(cells, indices, where):
    try:
        return [cells[i] for i in indices]
    except IndexError:
        raise ValueError(f"{where}: {len(cells)} fields, expected at least "
                         f"{max(indices) + 1}") from None


def _csv(path, text_column, label_column, header, split):
    numbers = {}

    def text_lines():
        for number, line in _lines(path):
            numbers["line"] = number
            yield line

    rows = csv.reader(text_lines(), strict=True)
    indices = None
    while True:
        try:
            cells = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(f"{path}:{numbers.get('line', 1)}: bad CSV ({exc})") from None
        where = f"{path}:{numbers['line']}"
        if not any(c.strip() for c in cells):
            continue
        if indices is None:
            if _is_header(cells, text_column, label_column, header):
                columns = [c.strip() for c in cells]
                indices = (_column(columns, text_column, TEXT_NAMES, where, "text"),
                           _column(columns, label_column, LABEL_NAMES, where, "label"))
                continue
            indices = (0 if text_column is None else _column(None, text_column, (), where,
                                                             "text"),
                       -1 if label_column is None else _column(None, label_column, (), where,
                                                               "label"))
            if len(cells) < 2:
                raise ValueError(f"{where}: one field; expected text,label")
        yield _example(*_cells(cells, indices, where), where)


def _pick(record: dict, wanted, defaults, where, role):
    if wanted is not None:
        if wanted not in record:
            raise ValueError(f"{where}: no field {wanted!r}; the record has {sorted(record)}")
        return record[wanted]
    for name in record:
        if name.lower() in defaults:
            return record[name]
    raise ValueError(f"{where}: no {role} field among {sorted(record)}; pass --{role}-column")


def _record(record, text_column, label_column, where, label_names=None) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with text and label, got "
                         f"{type(record).__name__}")
    text = _pick(record, text_column, TEXT_NAMES, where, "text")
    label = _pick(record, label_column, LABEL_NAMES, where, "label")
    if not isinstance(text, str):
        raise ValueError(f"{where}: the text is {type(text).__name__}, not a string")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"{where}: the label is {type(label).__name__}; expected an integer "
                         "or a name")
    if isinstance(label, int):
        if label < 0:
            raise ValueError(f"{where}: negative label {label}")
        if label_names is not None:
            label = label_names[label]
    return _example(text, label, where)


def _jsonl(path, text_column, label_column, header, split):
    with open(path, "rb") as f:
        first = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if first.startswith(b"["):                  # one JSON array (not streamed)
        try:
            records = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON array ({exc})") from None
        for i, record in enumerate(records):
            yield _record(record, text_column, label_column, f"{path}: item {i}")
        return
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        yield _record(record, text_column, label_column, where)


def _parquet(path, text_column, label_column, header, split):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow "
                          "(pip install 'lowrank[data]')") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as exc:   # pyarrow's own error types: not a Parquet file
        raise ValueError(f"{path}: not a Parquet file ({_first_line(exc)})") from None
    columns = f.schema_arrow.names
    where = f"{path}: schema"
    t = columns[_column(columns, text_column, TEXT_NAMES, where, "text")]
    y = columns[_column(columns, label_column, LABEL_NAMES, where, "label")]
    row = 0
    for batch in f.iter_batches(batch_size=1024, columns=[t, y]):
        for text, label in zip(*(batch.column(i).to_pylist() for i in range(2))):
            yield _record({t: text, y: label}, t, y, f"{path}: row {row}")
            row += 1


def _arrow(path, text_column, label_column, header, split):
    if not Path(path).is_dir():
        raise ValueError(f"{path}: not a directory datasets' save_to_disk wrote")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path}: reading a saved dataset needs datasets "
                          "(pip install 'lowrank[data]')") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:   # datasets raises several types for a wrong directory
        raise ValueError(f"{path}: not a saved dataset ({_first_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise ValueError(f"{path}: holds the splits {sorted(ds)}; name one as "
                             f"{path}#SPLIT" if split is None else
                             f"{path}: no split {split!r}; it holds {sorted(ds)}")
        ds = ds[split]
    columns = list(ds.column_names)
    where = f"{path}: columns"
    t = columns[_column(columns, text_column, TEXT_NAMES, where, "text")]
    y = columns[_column(columns, label_column, LABEL_NAMES, where, "label")]
    names = getattr(ds.features[y], "names", None)   # a ClassLabel names its classes
    for row, record in enumerate(ds.select_columns([t, y])):
        yield _record(record, t, y, f"{path}: row {row}", names)


def _first_line(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def split_of(path) -> tuple[str, str | None]:
    """``("dir", "test")`` for ``dir#test`` (a split of a saved DatasetDict)."""
    text = str(path)
    if "#" in text and not Path(text).exists():
        base, split = text.rsplit("#", 1)
        return base, split
    return text, None


def write_tsv(examples, path) -> Path:
    """Write ``examples`` as ``text<TAB>label`` with a header (tabs in a text become spaces)."""
    out = io.StringIO()
    out.write("text\tlabel\n")
    for e in examples:
        out.write(f"{' '.join(e.text.split())}\t{e.label}\n")
    Path(path).write_text(out.getvalue(), encoding="utf-8")
    return Path(path)
