"""Checks of one preference row, shared by training and `align-data validate` (one implementation).

A row that passes `align.core.data.normalize_preference` (fields, types, roles) can still be
unfit to train on: turns out of order, an empty turn, chosen identical to rejected, scores that
are not numbers or rank rejected above chosen. `align-data validate` reports these rows; the
recipes' data loading (`load_splits`) drops them and counts them by reason, so a recipe never
trains on a row the validator rejects. `data_tools` imports these functions; align never imports
data_tools. `unpaired_problems` applies the structural rules to an unpaired (KTO) row; `align-data
validate`, `build --kind unpaired` and the KTO recipe's loading (`load_splits(kind="unpaired")`) use it.
"""

from __future__ import annotations

import math
from typing import Any

Messages = list[dict]
ROLES = ("system", "user", "assistant")

# reason key -> what it means (the words of validate's lines and of the recipes' drop counts)
REASONS = {
    "malformed_roles": "malformed roles or turn order",
    "empty_turn": "empty or whitespace-only turn",
    "identical": "chosen identical to rejected",
    "bad_score": "score that is not a finite number",
    "score_order": "score_chosen below score_rejected",
    "exact_duplicate": "exact duplicate of an earlier pair",
}


def role_problem(prompt: Messages, chosen: Messages, rejected: Messages) -> str | None:
    """Why the roles or turn order are malformed, or None."""
    return _roles_problem(prompt, (("chosen", chosen), ("rejected", rejected)))


def _roles_problem(prompt: Messages, responses: tuple[tuple[str, Messages], ...]) -> str | None:
    for name, msgs in (("prompt", prompt), *responses):
        if not msgs:
            return f"'{name}' has no messages"
        for i, m in enumerate(msgs):
            if m["role"] not in ROLES:
                return f"'{name}[{i}].role' is {m['role']!r}, not one of {', '.join(ROLES)}"
    start = 1 if prompt[0]["role"] == "system" else 0
    if start == len(prompt):
        return "'prompt' has only a system message"
    expected = "user"
    for i in range(start, len(prompt)):
        if prompt[i]["role"] != expected:
            article = "an" if expected == "assistant" else "a"
            return f"'prompt[{i}]' is a {prompt[i]['role']} turn where {article} {expected} turn belongs (turns alternate from user)"
        expected = "assistant" if expected == "user" else "user"
    if prompt[-1]["role"] != "user":
        return "'prompt' ends with an assistant turn (the prompt's last turn is the user's)"
    for name, msgs in responses:
        expected = "assistant"
        for i, m in enumerate(msgs):
            if m["role"] != expected:
                article = "an" if expected == "assistant" else "a"
                return f"'{name}[{i}]' is a {m['role']} turn where {article} {expected} turn belongs (a response starts with the assistant)"
            expected = "user" if expected == "assistant" else "assistant"
        if msgs[-1]["role"] != "assistant":
            return f"'{name}' ends with a user turn"
    return None


def empty_problem(prompt: Messages, chosen: Messages, rejected: Messages) -> str | None:
    return _empty_problem((("prompt", prompt), ("chosen", chosen), ("rejected", rejected)))


def _empty_problem(named: tuple[tuple[str, Messages], ...]) -> str | None:
    for name, msgs in named:
        for i, m in enumerate(msgs):
            if not m["content"].strip():
                return f"'{name}[{i}].content' is empty or whitespace"
    return None


def same_response(chosen: Messages, rejected: Messages) -> bool:
    return [(m["role"], m["content"].strip()) for m in chosen] == [(m["role"], m["content"].strip()) for m in rejected]


def score_problems(raw: Any) -> list[tuple[str, str]]:
    """(reason, message) for scores that are not finite numbers, or that rank rejected above chosen."""
    if not isinstance(raw, dict):
        return []
    out: list[tuple[str, str]] = []
    scores = {}
    for key in ("score_chosen", "score_rejected"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            out.append(("bad_score", f"field '{key}': expected a finite number, got {value!r}"))
        else:
            scores[key] = value
    if len(scores) == 2 and scores["score_chosen"] < scores["score_rejected"]:
        out.append(("score_order", f"score_chosen {scores['score_chosen']:g} is below score_rejected {scores['score_rejected']:g}"))
    return out


def preference_problems(row: dict, raw: Any = None) -> list[tuple[str, str]]:
    """Every problem of one normalized preference row (and its raw scores): (reason key, message), in check order."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    out: list[tuple[str, str]] = []
    found = role_problem(prompt, chosen, rejected)
    if found:
        out.append(("malformed_roles", found))
    found = empty_problem(prompt, chosen, rejected)
    if found:
        out.append(("empty_turn", found))
    if same_response(chosen, rejected):
        out.append(("identical", "chosen identical to rejected"))
    out.extend(score_problems(raw))
    return out


def unpaired_problems(row: dict) -> list[tuple[str, str]]:
    """Every problem of one normalized unpaired row ({prompt, completion, label}): the structural
    rules of a pair (roles and turn order, empty turns) applied to its one response."""
    out: list[tuple[str, str]] = []
    found = _roles_problem(row["prompt"], (("completion", row["completion"]),))
    if found:
        out.append(("malformed_roles", found))
    found = _empty_problem((("prompt", row["prompt"]), ("completion", row["completion"])))
    if found:
        out.append(("empty_turn", found))
    return out


def serial(msgs: Messages) -> str:
    """An exact, unambiguous text form of a message list (length-prefixed: no content imitates a boundary)."""
    return "".join(f"{m['role']}:{len(m['content'])}:{m['content']}" for m in msgs)


def pair_serial(prompt: Messages, chosen: Messages, rejected: Messages) -> str:
    """What makes two pairs exact duplicates: the same prompt, chosen and rejected, message by message."""
    return f"{serial(prompt)}|{len(chosen)}|{serial(chosen)}|{serial(rejected)}"


def response_serial(prompt: Messages, completion: Messages) -> str:
    """What makes two unpaired rows the same response: the same prompt and completion (labels aside)."""
    return f"{serial(prompt)}|{serial(completion)}"
