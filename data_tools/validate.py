"""`align-data validate PATH`: every problem of a canonical preference dataset, one line each
with its row (file:line or row), then a summary. Exit status 0 when clean, 1 when problems
were found (2 when the dataset cannot be read at all).

Checked per row: align's canonical validation (align.core.data.normalize_preference: fields, types,
roles), the cleaning rules that apply to a single row (turn order, empty turns, chosen identical
to rejected), scores that are not numbers or rank rejected above chosen; across rows: exact
duplicates and prompts that appear in more than one split.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from align.core.data import normalize_preference
from align.core.errors import DataError
from align.core.pairing import empty_problem, role_problem, same_response
from data_tools.clean import pair_digest, prompt_digest
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
            try:
                row = normalize_preference(raw, where)
            except DataError as exc:
                yield where, str(exc).removeprefix(f"{where}: ")
                continue
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            for check in (role_problem, empty_problem):
                found = check(prompt, chosen, rejected)
                if found:
                    yield where, found
            if same_response(chosen, rejected):
                yield where, "chosen identical to rejected"
            yield from _score_problems(raw, where)
            key = pair_digest(prompt, chosen, rejected)
            first = seen_pairs.get(key, int(seen_pairs.bulk_get(np.array([key], dtype=np.uint64))[0]))
            if first >= 0:
                yield where, f"exact duplicate of {wheres[first]}"
            else:
                seen_pairs.put(key, len(wheres))
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


def _score_problems(raw: dict, where: str):
    scores = {}
    for key in ("score_chosen", "score_rejected"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            yield where, f"field '{key}': expected a finite number, got {value!r}"
        else:
            scores[key] = value
    if len(scores) == 2 and scores["score_chosen"] < scores["score_rejected"]:
        yield where, f"score_chosen {scores['score_chosen']:g} is below score_rejected {scores['score_rejected']:g}"


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
    if count:
        print(f"{path}: {count} problems in {len(bad_rows)} of {rows} rows ({', '.join(names)})", file=sys.stderr)
        return 1
    print(f"{path}: {rows} rows ({', '.join(names)}), no problems")
    return 0
