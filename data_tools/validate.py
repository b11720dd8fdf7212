"""`align-data validate PATH`: every problem of a canonical preference dataset, one line each
with its row (file:line or row), then a summary. Exit status 0 when clean, 1 when problems
were found (2 when the dataset cannot be read at all).

Checked per row: align's canonical validation (align.core.data.normalize_preference: fields, types,
roles), then align.core.rows.preference_problems (turn order, empty turns, chosen identical to
rejected, scores that are not numbers or rank rejected above chosen): the same code align's
recipes run on the rows they load, dropping and counting what it rejects. Across rows: exact
duplicates and prompts that appear in more than one split. An empty dataset is a problem too.

Unpaired rows (KTO's `{prompt, completion, label}`, as `align-data build --kind unpaired` writes)
are checked by align.core.data.normalize_unpaired and align.core.rows.unpaired_problems (roles,
empty turns); across rows, a response (prompt and completion) that repeats is an exact duplicate
when its label is the same, and a contradiction when it is not.
"""

from __future__ import annotations

import sys

import numpy as np

from align.core.normalize import normalize_preference, normalize_unpaired
from align.core.errors import DataError
from align.core.rows import preference_problems, response_serial, unpaired_problems
from data_tools.clean import pair_digest, prompt_digest
from data_tools.dedup import digest64
from data_tools.dedup import U64Map
from data_tools.readers import iter_splits
from data_tools.sources.base import RowError


def problems(path: str, splits: list[str] | None = None):
    """Yield (where, message) for every problem; returns (rows, split names) at the end."""
    seen_pairs, seen_prompts = U64Map(), U64Map()
    wheres: list[str] = []
    split_names: list[str] = []
    rows = 0
    for split, stream in iter_splits(path, splits):
        split_names.append(split)
        for where, raw in stream:
            rows += 1
            if isinstance(raw, RowError):
                yield where, str(raw).removeprefix(f"{where}: ")
                continue
            unpaired = isinstance(raw, dict) and "completion" in raw and "chosen" not in raw and "rejected" not in raw
            try:
                row = normalize_unpaired(raw, where)[0] if unpaired else normalize_preference(raw, where)
            except DataError as exc:
                yield where, str(exc).removeprefix(f"{where}: ")
                continue
            prompt = row["prompt"]
            found = unpaired_problems(row) if unpaired else preference_problems(row, raw)  # align's own checks
            for _, message in found:
                yield where, message
            if unpaired:  # the label is kept in the low bit of the stored row number
                key = digest64(response_serial(prompt, row["completion"]))
                value = len(wheres) << 1 | row["label"]
            else:
                key, value = pair_digest(prompt, row["chosen"], row["rejected"]), len(wheres) << 1
            first = seen_pairs.get(key, int(seen_pairs.bulk_get(np.array([key], dtype=np.uint64))[0]))
            if first >= 0 and (first ^ value) & 1:
                yield where, f"the same response as {wheres[first >> 1]} with the other label (desirable and undesirable)"
            elif first >= 0:
                yield where, f"exact duplicate of {wheres[first >> 1]}"
            else:
                seen_pairs.put(key, value)
                wheres.append(where)
            pkey = prompt_digest(prompt)
            other = seen_prompts.get(pkey, int(seen_prompts.bulk_get(np.array([pkey], dtype=np.uint64))[0]))
            sid = len(split_names) - 1
            if other < 0:
                seen_prompts.put(pkey, sid)
            elif other != sid:
                yield where, f"prompt also in split '{split_names[other]}' (a prompt belongs to one split)"
            seen_pairs.maybe_merge()
            seen_prompts.maybe_merge()
    return rows, split_names


def validate_command(path: str, splits: list[str] | None = None) -> int:
    found = problems(path, splits)
    bad_rows: set[str] = set()
    count = 0
    while True:
        try:
            where, message = next(found)
        except StopIteration as stop:
            rows, names = stop.value
            break
        print(f"{where}: {message}")
        bad_rows.add(where)
        count += 1
    if rows == 0:
        print(f"{path}: no rows ({', '.join(names) or 'no splits'}): nothing to train on", file=sys.stderr)
        return 1
    if count:
        print(f"{path}: {count} problems in {len(bad_rows)} of {rows} rows ({', '.join(names)})", file=sys.stderr)
        return 1
    print(f"{path}: {rows} rows ({', '.join(names)}), no problems")
    return 0
