"""What every input format produces, and the checked field readers they share.

A format turns raw rows into *items*:

* `Pair`  - one prompt with a chosen and a rejected response (hh-rlhf, SHP, PKU, TRL rows);
* `Group` - one prompt with several scored or ranked responses, paired later by the chosen
  strategy (UltraFeedback, HelpSteer, Nectar, OpenAssistant, ratings, ranked, generate);
* `Labeled` - one prompt with one response marked desirable or undesirable (thumbs data; only
  `--kind unpaired` builds take it);
* `Drop`  - a row or response the format leaves out on purpose, with its reason (counted).

A row that cannot be read (missing field, wrong type, duplicate ranks, ...) raises `RowError`,
which names the file and line (or row), the field, and a reason key; `--skip-invalid` counts
it by that reason instead of stopping.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

from align.core.errors import ConfigError
from align.core.pairing import Candidate, Group, Messages, Pair  # noqa: F401 - the items every format builds
from align.core.readers import INVALID_REASONS, RowError, kind  # noqa: F401 - the readers' row errors, which formats raise too

# --------------------------------------------------------------------------- items


@dataclass
class Drop:
    """Something a format leaves out by design (not an error), counted under `reason`."""

    reason: str
    count: int = 1


@dataclass
class Labeled:
    """One response with a desirable (True) / undesirable (False) label: a KTO row."""

    prompt: Messages
    completion: Messages
    label: bool
    id: str
    where: str
    score: float | None = None


Item = Pair | Group | Labeled | Drop


# --------------------------------------------------------------------------- options


@dataclass
class SourceOptions:
    """Format options from the command line; None = not given (each format has its defaults)."""

    prompt_col: str | None = None
    chosen_col: str | None = None
    rejected_col: str | None = None
    response_col: str | None = None
    score_col: str | None = None
    rank_col: str | None = None
    responses_col: str | None = None
    scores_col: str | None = None
    ranks_col: str | None = None
    system_col: str | None = None
    id_col: str | None = None
    chosen_score_col: str | None = None
    rejected_score_col: str | None = None
    uf_score: str | None = None
    shp_min_ratio: float | None = None
    helpsteer_weights: dict[str, float] | None = None
    pku_preference: str | None = None
    pku_require_safe_chosen: bool | None = None
    oasst_lang: list[str] | None = None
    label_col: str | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Format:
    """Base of the input formats.

    Per-row formats implement `items(row, where)`. Formats whose responses to one prompt span
    several rows set `grouped = True` and implement `parse(row, where) -> (key, record)` (checks
    the row and keeps only what pairing needs, as plain lists, dicts, strings and numbers) and
    `group_items(records)`; the builder brings the records of one key together first, wherever
    they are in the input (see data_tools.grouping).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    option_names: ClassVar[frozenset[str]] = frozenset()
    grouped: ClassVar[bool] = False
    # What its items carry: "scores" (ratings, or pairs that may have scores), "ranks" (an order
    # only: no score to hold against --label-threshold), "labels" (thumbs: unpaired rows only).
    yields: ClassVar[str] = "scores"

    def __init__(self, opts: SourceOptions) -> None:
        extra = sorted(set(opts.given()) - self.option_names)
        if extra:
            flags = ", ".join("--" + e.replace("_", "-") for e in extra)
            raise ConfigError(f"{flags}: not an option of --format {self.name}")
        self.opts = opts

    def items(self, row: dict, where: str) -> Iterable[Item]:
        raise NotImplementedError

    def parse(self, row: dict, where: str) -> tuple[str, Any]:
        raise NotImplementedError

    def group_items(self, records: list[Any]) -> Iterable[Item]:
        raise NotImplementedError


def short_where(where: str) -> str:
    """`where` without the folders: 'data/x.jsonl:7' -> 'x.jsonl:7' (ids of rows without one)."""
    return where.rsplit("/", 1)[-1]


def line_ref(where: str) -> str:
    """The line or row part of `where`: 'x.jsonl:7' -> '7', 'x.parquet row 3' -> 'row3'."""
    tail = short_where(where)
    if " row " in tail:
        return "row" + tail.rsplit(" row ", 1)[1]
    return tail.rsplit(":", 1)[-1]


# --------------------------------------------------------------------------- field readers


def require(row: dict, key: str, where: str, field: str | None = None) -> Any:
    name = field or key
    if not isinstance(row, dict) or key not in row or row[key] is None:
        raise RowError(where, name, f"field '{name}' missing", "missing_field")
    return row[key]


def text(row: dict, key: str, where: str, field: str | None = None) -> str:
    value = require(row, key, where, field)
    if not isinstance(value, str):
        name = field or key
        raise RowError(where, name, f"field '{name}': expected a string, got {kind(value)}", "wrong_type")
    return value


def optional_text(row: dict, key: str, where: str) -> str | None:
    """An optional text field; absent, null and "" (an empty CSV cell) all mean not given."""
    if row.get(key) is None or row.get(key) == "":
        return None
    return text(row, key, where)


def number(row: dict, key: str, where: str, field: str | None = None) -> float:
    """A finite number; numeric strings count (CSV cells, UltraFeedback's string ratings)."""
    name = field or key
    value = require(row, key, where, field)
    if isinstance(value, str) and value.strip() == "":
        raise RowError(where, name, f"field '{name}' missing", "missing_field")
    return as_number(value, where, name)


def as_number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool):
        raise RowError(where, name, f"field '{name}': expected a number, got bool", "wrong_type")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise RowError(where, name, f"field '{name}': expected a number, got string {value!r}", "wrong_type") from None
    elif hasattr(value, "__float__") and not isinstance(value, (list, dict)):  # numpy scalars from parquet
        out = float(value)
    else:
        raise RowError(where, name, f"field '{name}': expected a number, got {kind(value)}", "wrong_type")
    if not math.isfinite(out):
        raise RowError(where, name, f"field '{name}': expected a finite number, got {value!r}", "bad_value")
    return out


def optional_number(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    return as_number(value, where, key)


def boolean(row: dict, key: str, where: str) -> bool:
    value = require(row, key, where)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):  # CSV cells
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RowError(where, key, f"field '{key}': expected true or false, got {kind(value)} {value!r}", "wrong_type")


def choice_int(row: dict, key: str, where: str, allowed: tuple[int, ...]) -> int:
    value = number(row, key, where)
    if value not in allowed:
        raise RowError(where, key, f"field '{key}': expected one of {', '.join(map(str, allowed))}, got {row[key]!r}", "bad_value")
    return int(value)


def json_cell(value: Any) -> Any:
    """CSV and some Parquet exports store lists and objects as JSON strings."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def list_field(row: dict, key: str, where: str, field: str | None = None) -> list:
    name = field or key
    value = json_cell(require(row, key, where, field))
    if not isinstance(value, list):
        raise RowError(where, name, f"field '{name}': expected a list, got {kind(value)}", "wrong_type")
    return value


def mapping_field(value: Any, where: str, name: str) -> dict:
    value = json_cell(value)
    if not isinstance(value, dict):
        raise RowError(where, name, f"field '{name}': expected an object, got {kind(value)}", "wrong_type")
    return value


# --------------------------------------------------------------------------- messages


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _looks_like_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def messages_value(value: Any, where: str, name: str, text_role: str) -> Messages:
    """A field holding either plain text (one `text_role` message) or a list of messages."""
    if isinstance(value, str):
        parsed = json_cell(value)
        if not _looks_like_messages(parsed):
            return [{"role": text_role, "content": value}]
        value = parsed
    if not isinstance(value, list):
        raise RowError(where, name, f"field '{name}': expected a string or a list of messages, got {kind(value)}", "wrong_type")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowError(where, f"{name}[{i}]", f"field '{name}[{i}]': expected a message object, got {kind(msg)}", "wrong_type")
        role = text(msg, "role", where, f"{name}[{i}].role")
        content = text(msg, "content", where, f"{name}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def split_shared_prefix(a: Messages, b: Messages) -> tuple[Messages, Messages, Messages] | None:
    """(prompt, a_rest, b_rest): the longest shared prefix that ends with a user turn.

    Each side keeps at least its last message, so identical conversations come out as
    identical responses (dropped and counted later) rather than vanishing. None when the
    two share no prefix ending in a user turn.
    """
    n = 0
    limit = min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    while n > 0 and a[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        return None
    return a[:n], a[n:], b[n:]


def strip_prefix(prompt: Messages, response: Messages) -> Messages:
    """Some datasets repeat the prompt at the start of each response; cut it off."""
    if len(response) > len(prompt) and response[: len(prompt)] == prompt:
        return response[len(prompt) :]
    return response


# Anthropic-style transcripts: "\n\nHuman: ...\n\nAssistant: ..." (hh-rlhf, Nectar prompts).
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(value: str) -> Messages | None:
    """Messages of a Human/Assistant transcript, contents stripped; None if it has no turn
    markers or text before the first one (left to the malformed-roles count)."""
    if value.startswith(("Human:", "Assistant:")):
        value = "\n\n" + value
    parts = _TRANSCRIPT_TURN.split(value)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [
        {"role": TRANSCRIPT_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def check_unique_ranks(ranks: list[tuple[float, str, str]]) -> None:
    """ranks: (rank, where, field). A repeated rank is an error at its second occurrence."""
    seen: dict[float, tuple[str, str]] = {}
    for rank, where, name in ranks:
        if rank in seen:
            first_where, first_name = seen[rank]
            first = first_name if first_where == where else f"{first_where} ({first_name})"
            raise RowError(
                where,
                name,
                f"field '{name}': rank {rank:g} repeats the rank of {first} (a ranking needs distinct ranks)",
                "duplicate_rank",
            )
        seen[rank] = (where, name)
