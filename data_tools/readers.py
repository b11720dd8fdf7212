"""Read input rows one at a time: local JSONL/JSON/CSV/Parquet files (optionally .gz), folders of
them, `save_to_disk` datasets, or a hub dataset id (streamed with `datasets.load_dataset`).

Each row comes with `where`, which errors quote: `file:LINE` for JSONL, JSON and CSV (true line
numbers), `file row N` for Parquet and saved datasets, `hub:ID[split] row N` for the hub (N
counts from 0, as in align.core.data). A row that cannot be read is yielded as a `RowError` instead of
a dict, so the caller decides whether to stop or to skip and count it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from align.core.data import FILE_TYPES, file_stem, file_suffix, open_binary, unsupported_type
from align.core.errors import DataError
from data_tools.sources.base import RowError, kind

RowOrError = tuple[str, Any]


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
        raise DataError(f"{path}: cannot read Parquet: {_first_line(exc)}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=2048):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


READERS = {".jsonl": read_jsonl, ".jsonl.gz": read_jsonl, ".json": read_json, ".json.gz": read_json,
           ".csv": read_csv, ".csv.gz": read_csv, ".parquet": read_parquet}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- datasets


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()


def _iter_arrow(ds, label: str) -> Iterator[RowOrError]:
    i = 0
    for table in ds.with_format("arrow").iter(batch_size=2048):
        for row in table.to_pylist():
            yield f"{label} row {i}", row
            i += 1


def _saved_splits(path: Path, splits: list[str] | None):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        if splits:
            raise DataError(f"{path}: a single saved dataset has no splits; drop --split")
        return [("train", _iter_arrow(loaded, str(path)))]
    return [(split, _iter_arrow(loaded[split], f"{path}[{split}]")) for split in _pick_splits(list(loaded), splits, str(path))]


def _pick_splits(available: list[str], wanted: list[str] | None, label: str) -> list[str]:
    if not wanted:
        return available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise DataError(f"{label}: no split '{missing[0]}' (available: {', '.join(available)})")
    return wanted


def _hub_splits(spec: str, splits: list[str] | None, config: str | None):
    import datasets

    try:
        loaded = datasets.load_dataset(spec, name=config, streaming=True)
    except Exception as exc:  # noqa: BLE001 - network, auth and format errors all mean "cannot load"
        raise DataError(
            f"--input '{spec}': not a local file or directory, and the hub could not provide it: {_first_line(exc)}"
        ) from None

    def rows(split: str) -> Iterator[RowOrError]:
        i = 0
        try:
            for row in loaded[split]:
                yield f"hub:{spec}[{split}] row {i}", row
                i += 1
        except Exception as exc:  # noqa: BLE001 - a stream can fail mid-way (network)
            raise DataError(f"hub:{spec}[{split}] row {i}: reading the stream failed: {_first_line(exc)}") from None

    return [(split, rows(split)) for split in _pick_splits(list(loaded), splits, f"hub:{spec}")]


# --------------------------------------------------------------------------- entry points


def looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith(("/", ".", "~")) and not file_suffix(Path(spec))


def iter_splits(spec: str, splits: list[str] | None = None, config: str | None = None) -> list[tuple[str, Iterator[RowOrError]]]:
    """(split name, rows) for each split of an input: a file (one split named after the file),
    a folder of data files (one split per file stem; `splits` picks stems), a saved dataset, or
    a hub dataset id (`splits` picks splits; default all)."""
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = file_suffix(path)
        if suffix not in READERS:
            raise unsupported_type(path)
        if splits:
            raise DataError(f"{path}: --split applies to folders, saved datasets and hub ids, not to one file")
        return [(file_stem(path), READERS[suffix](path))]
    if path.is_dir():
        if is_saved_dataset(path):
            return _saved_splits(path, splits)
        files = sorted(p for p in path.iterdir() if p.is_file() and file_suffix(p) in READERS)
        if not files:
            raise DataError(f"{path}: no data files and no saved dataset ({FILE_TYPES})")
        chosen = _pick_splits(sorted({file_stem(p) for p in files}), splits, str(path))
        return [(file_stem(p), READERS[file_suffix(p)](p)) for p in files if file_stem(p) in chosen]
    if looks_like_hub_id(spec):
        return _hub_splits(spec, splits, config)
    raise DataError(f"--input '{spec}': no such file or directory")


def iter_rows(spec: str, splits: list[str] | None = None, config: str | None = None) -> Iterator[RowOrError]:
    """Every row of every (selected) split of an input, in order."""
    for _, rows in iter_splits(spec, splits, config):
        yield from rows


def input_size(spec: str) -> int | None:
    """Bytes of a local input (files or folder), for sizing; None for hub ids."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


