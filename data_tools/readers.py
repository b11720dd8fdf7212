"""Read input rows one at a time: local JSONL/JSON/CSV/Parquet files (optionally .gz), folders of
them, `save_to_disk` datasets, or a hub dataset id (streamed with `datasets.load_dataset`).

Files are read by align's one file reader (align/core/readers.py: `file:LINE` for JSONL, JSON and
CSV, `file row N` for Parquet); saved datasets give `path row N`, the hub `hub:ID[split] row N` (N
counts from 0). A row that cannot be read is yielded as a `RowError` instead of a dict, so the
caller decides whether to stop or to skip and count it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from align.core.errors import DataError
from align.core.readers import FILE_TYPES, READERS, RowOrError, file_stem, file_suffix, first_line, unsupported_type

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
            f"--input '{spec}': not a local file or directory, and the hub could not provide it: {first_line(exc)}"
        ) from None

    def rows(split: str) -> Iterator[RowOrError]:
        i = 0
        try:
            for row in loaded[split]:
                yield f"hub:{spec}[{split}] row {i}", row
                i += 1
        except Exception as exc:  # noqa: BLE001 - a stream can fail mid-way (network)
            raise DataError(f"hub:{spec}[{split}] row {i}: reading the stream failed: {first_line(exc)}") from None

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


