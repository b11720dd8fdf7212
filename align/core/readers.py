"""The one file reader of align and align-data: local JSONL, JSON, CSV and Parquet files (optionally .gz), row by row.

Each row comes with `where`, which errors quote: `file:LINE` for JSONL, JSON and CSV (true line
numbers: the line a JSON row or a CSV record starts on, counting a multi-line CSV cell's lines),
`file row N` for Parquet (N counts from 0). A row that cannot be read is yielded as a `RowError`
instead of a dict, so the caller decides: the recipes' data loading (align/core/data.py) stops at
it, `align-data` (data_tools/) may skip and count it by its reason. CSV cells are text here; the
recipes read typed columns (`typed_csv_columns`). Saved datasets and hub datasets are read by their
callers with `datasets`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from align.core.errors import DataError

# The file types align-data and the recipes both read: gzip too, except Parquet, which compresses inside the file.
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")
FILE_TYPES = f"align-data and the recipes read {', '.join(FILE_SUFFIXES)}"

# Reason keys of unreadable rows (RowError.reason), with the words align-data's report uses: the readers' own and
# those of align-data's formats (data_tools/sources/).
INVALID_REASONS = {
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "malformed JSON line",
    "invalid_csv": "malformed CSV record",
    "not_a_mapping": "row is not an object",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "bad_value": "value out of range",
    "duplicate_rank": "ranking with duplicate ranks",
}


class RowError(DataError):
    """One unreadable row: `where` (file:line or row), the offending `field`, a `reason` key."""

    def __init__(self, where: str, field: str | None, message: str, reason: str) -> None:
        assert reason in INVALID_REASONS, reason
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: {message}")


RowOrError = tuple[str, Any]  # (where, a row dict or the RowError that stands for it)


def file_suffix(path: Path) -> str:
    """The data file type of a path: one of FILE_SUFFIXES (the longest that matches), or "" for none."""
    name = Path(path).name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def file_stem(path: Path) -> str:
    """A data file's name without its type: the split it holds in a folder of split files (train.jsonl.gz -> train)."""
    path = Path(path)
    return path.name[: len(path.name) - len(file_suffix(path))] if file_suffix(path) else path.stem


def unsupported_type(path: Path) -> DataError:
    path = Path(path)
    shown = "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix
    return DataError(f"{path}: unsupported file type '{shown}' ({FILE_TYPES})")


def open_binary(path: Path):
    """A data file opened for reading bytes, decompressed when it ends in .gz."""
    import gzip

    return gzip.open(path, "rb") if Path(path).name.lower().endswith(".gz") else open(path, "rb")


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _decode(raw: bytes, where: str) -> str | RowError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError(where, None, f"invalid UTF-8 at byte {exc.start} of the line", "invalid_utf8")


def read_jsonl(path: Path) -> Iterator[RowOrError]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if isinstance(line, RowError):
                yield where, line
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield where, RowError(where, None, f"malformed JSON: {exc.msg} (column {exc.colno})", "invalid_json")
                continue
            if not isinstance(row, dict):
                yield where, RowError(where, None, f"expected a JSON object, got {kind(row)}", "not_a_mapping")
                continue
            yield where, row


def read_json(path: Path) -> Iterator[RowOrError]:
    """A JSON array of objects, element by element, each with the line it starts on."""
    with open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {exc.start} (a .json file is read whole; use JSONL to skip bad lines)") from None
    decoder = json.JSONDecoder()
    pos, line = 0, 1
    n = len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, msg: str):
        raise DataError(f"{path}:{text.count(chr(10), 0, p) + 1}: malformed JSON: {msg}")

    pos = skip_ws(pos)
    if pos >= n or text[pos] != "[":
        fail(pos, "a .json dataset is an array of row objects")
    pos = skip_ws(pos + 1)
    counted = 0
    first = True
    while True:
        if pos < n and text[pos] == "]" :
            break
        if not first:
            if pos >= n or text[pos] != ",":
                fail(pos, "expected ',' or ']' between rows")
            pos = skip_ws(pos + 1)
        first = False
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line}"
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            fail(exc.pos, exc.msg)
        if isinstance(row, dict):
            yield where, row
        else:
            yield where, RowError(where, None, f"expected a JSON object, got {kind(row)}", "not_a_mapping")
        pos = skip_ws(pos)
    if skip_ws(pos + 1) < n:
        fail(pos + 1, "extra data after the array")


class _LineCounter:
    """Feeds csv.reader decoded lines and remembers the current line number and bad bytes."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path, self.line = f, path, 0
        self.bad: RowError | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        self.line += 1
        decoded = _decode(raw, f"{self.path}:{self.line}")
        if isinstance(decoded, RowError):
            self.bad = self.bad or decoded
            return "\n"  # the record is reported as invalid; the reader keeps going
        return decoded


def read_csv(path: Path) -> Iterator[RowOrError]:
    with open_binary(path) as f:
        lines = _LineCounter(f, path)
        reader = csv.reader(lines)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:1: malformed CSV header: {exc}") from None
        if lines.bad is not None:
            raise DataError(str(lines.bad))
        while True:
            start = lines.line + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield f"{path}:{start}", RowError(f"{path}:{start}", None, f"malformed CSV: {exc}", "invalid_csv")
                continue
            where = f"{path}:{start}"
            if lines.bad is not None:
                bad, lines.bad = lines.bad, None
                yield bad.where, bad
                continue
            if not cells or cells == [""]:
                continue
            if len(cells) != len(header):
                yield where, RowError(where, None, f"malformed CSV: {len(cells)} cells for {len(header)} columns", "invalid_csv")
                continue
            yield where, dict(zip(header, cells))


def read_parquet(path: Path) -> Iterator[RowOrError]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read Parquet: {first_line(exc)}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=2048):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


READERS = {".jsonl": read_jsonl, ".jsonl.gz": read_jsonl, ".json": read_json, ".json.gz": read_json,
           ".csv": read_csv, ".csv.gz": read_csv, ".parquet": read_parquet}


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def read_file(path: Path) -> Iterator[RowOrError]:
    """Every row of a data file (a type of FILE_SUFFIXES), in order."""
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in READERS:
        raise unsupported_type(path)
    return READERS[suffix](path)


def typed_csv_columns(rows: list[RowOrError]) -> list[RowOrError]:
    """CSV rows with typed columns, as pandas and `datasets` read CSV: a column whose every non-empty cell reads
    as an integer holds ints, else as a number floats, else as true/false bools; an empty cell is None."""
    rows_ok = [row for _, row in rows if isinstance(row, dict)]
    columns = {key for row in rows_ok for key in row}
    convert = {key: _column_type([row.get(key) for row in rows_ok]) for key in columns}
    out = []
    for where, row in rows:
        if isinstance(row, dict):
            row = {k: (None if v == "" else convert[k](v)) for k, v in row.items()}
        out.append((where, row))
    return out


def _column_type(cells: list[str | None]):
    filled = [c for c in cells if c not in ("", None)]
    for convert in (int, float, _bool):
        try:
            for cell in filled:
                convert(cell)
        except ValueError:
            continue
        return convert if filled else str
    return str


def _bool(cell: str) -> bool:
    lowered = cell.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(cell)
    return lowered == "true"
