"""Rows to training examples: converted one by one, and every row cut to or dropped by max_length counted.

A stage's `convert(row)` returns (example or None to drop, whether it was truncated); nothing is
dropped silently: the counts are logged and go to the run's manifest.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from align.core.data import Splits
from align.core.errors import DataError
from align.core.tracking import is_main_process

log = logging.getLogger("align")


def convert_rows(rows, convert) -> tuple[list[dict], int, int]:
    """`convert(row) -> (example or None, truncated)` over rows: (kept examples, rows truncated, rows dropped)."""
    kept, truncated, dropped = [], 0, 0
    for row in rows:
        example, was_truncated = convert(row)
        truncated += was_truncated
        if example is None:
            dropped += 1
        else:
            kept.append(example)
    return kept, truncated, dropped


def to_datasets(splits: Splits, convert, stage: str, max_length: int, drop_reason: str):
    """Convert both splits row by row into datasets, counting rows cut to and dropped by max_length.

    `convert(row)` returns (example or None to drop, whether it was truncated). Nothing is
    dropped silently: the counts are logged and returned for the manifest.
    """
    from datasets import Dataset

    stats: dict[str, int] = {}
    out = {}
    for name, rows in (("train", splits.train), ("eval", splits.eval)):
        shown = tqdm(rows, desc=f"preparing {stage} {name}", disable=not rows or not is_main_process(), leave=False)
        kept, truncated, dropped = convert_rows(shown, convert)
        stats[f"{name}_truncated"] = truncated
        stats[f"{name}_dropped"] = dropped
        if truncated or dropped:
            log.warning("%s %s: %d rows cut to max_length=%d, %d dropped (%s)", stage, name, truncated, max_length, dropped, drop_reason)
        out[name] = Dataset.from_list(kept) if kept else None
    if out["train"] is None:
        raise DataError(f"data.path '{splits.source}': no training row is left within max_length={max_length} ({drop_reason})")
    return out["train"], out["eval"], stats
