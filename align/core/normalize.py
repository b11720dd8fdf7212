"""Raw rows to canonical rows: SFT, preference, unpaired (KTO) and prompt rows, checked field by field.

Canonical rows are TRL's conversational formats (align/core/data.py says which inputs are accepted).
Any malformed row raises a DataError naming its place (file:line, or split and row) and the field.
Also here: merging the unpaired rows that several pairs share, and KTO's class-balance weights.
"""

from __future__ import annotations

import json
from typing import Any

from align.core.errors import DataError

ROLES = ("system", "user", "assistant")


def _maybe_json(value: Any) -> Any:
    """CSV/Parquet store conversations as JSON strings."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _messages(value: Any, where: str, name: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    value = _maybe_json(value)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}': expected a non-empty list of messages, got {_kind(value)}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{name}[{i}]': expected a message mapping, got {_kind(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(f"{where}: field '{name}[{i}].{key}' missing")
        if msg["role"] not in roles:
            raise DataError(f"{where}: field '{name}[{i}].role': {msg['role']!r} is not one of {', '.join(roles)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: field '{name}[{i}].content': expected a string, got {_kind(msg['content'])}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return type(value).__name__


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: field '{key}' missing")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field '{key}': expected a string, got {_kind(row[key])}")
    return row[key]


def instruction_user_content(instruction: str, input_text: str | None) -> str:
    """An Alpaca-style row's user turn; its `input` renders under '### Input:'."""
    if input_text and input_text.strip():
        return f"{instruction}\n\n### Input:\n{input_text}"
    return instruction


def normalize_sft(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    if "messages" in row:
        messages = _messages(row["messages"], where, "messages")
    elif "prompt" in row and "completion" in row:
        prompt, completion = _maybe_json(row["prompt"]), _maybe_json(row["completion"])
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        else:
            messages = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
    elif "chosen" in row and "prompt" in row:
        # A preference row trains SFT on its chosen answer (as HuggingFaceH4's `train_sft` splits
        # do), so one built preference dataset feeds both SFT and DPO; load_splits notes it.
        pair = normalize_preference(row, where)
        messages = pair["prompt"] + pair["chosen"]
    elif "instruction" in row and "output" in row:
        input_text = _text(row, "input", where) if row.get("input") is not None else None
        user = instruction_user_content(_text(row, "instruction", where), input_text)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
    else:
        raise DataError(
            f"{where}: field 'messages' missing (an SFT row has 'messages', 'prompt'+'completion', "
            f"'prompt'+'chosen' (a preference row), or 'instruction'+'output'; found: {', '.join(map(repr, row)) or 'nothing'})"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages': no assistant turn to train on")
    return {"messages": messages}


def normalize_preference(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: field '{key}' missing (a preference row has 'prompt', 'chosen', 'rejected')")
    prompt, chosen, rejected = _maybe_json(row.get("prompt")), _maybe_json(row["chosen"]), _maybe_json(row["rejected"])
    if prompt is None:
        # Implicit prompt: the shared message prefix of the two conversations.
        chosen = _messages(chosen, where, "chosen")
        rejected = _messages(rejected, where, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the completion starts with an assistant turn
            n -= 1
        if n == 0 or n == len(chosen) or n == len(rejected):
            raise DataError(f"{where}: field 'prompt' missing and chosen/rejected share no prompt prefix")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt, str):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: field 'chosen'/'rejected': with a text prompt they must be strings too")
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    else:
        prompt = _messages(prompt, where, "prompt")
        chosen = _messages(chosen, where, "chosen") if not isinstance(chosen, str) else [{"role": "assistant", "content": chosen}]
        rejected = (
            _messages(rejected, where, "rejected") if not isinstance(rejected, str) else [{"role": "assistant", "content": rejected}]
        )
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the last message must be from the user, got {prompt[-1]['role']!r}")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}[0].role': a response starts with an assistant turn, got {msgs[0]['role']!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _response(value: Any, where: str, name: str) -> list[dict]:
    value = _maybe_json(value)
    msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, where, name)
    if msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}[0].role': a response starts with an assistant turn, got {msgs[0]['role']!r}")
    return msgs


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # CSV and Parquet often store labels as 0/1
        return bool(value)
    raise DataError(f"{where}: field 'label': expected true/false (or 1/0), got {value!r}")


def _score(row: dict, key: str, where: str, threshold: float) -> bool:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        missing = "missing" if value is None else f"expected a number, got {value!r}"
        raise DataError(
            f"{where}: field '{key}' {missing}; kto.score_threshold labels responses by their score "
            "(leave it null to label pairs by side, chosen desirable and rejected undesirable)"
        )
    return float(value) >= threshold


def normalize_unpaired(row: Any, where: str, score_threshold: float | None = None) -> list[dict]:
    """Unpaired rows (prompt, completion, label) from one input row, in row order.

    - `{"prompt", "completion", "label"}`: TRL's unpaired format, as is (text or messages);
    - `{"prompt", "completion", "score"}`: label = score >= score_threshold (a rated response);
    - a preference pair: two rows, chosen desirable and rejected undesirable; with score_threshold,
      each response labelled by its own score_chosen / score_rejected >= score_threshold instead
      (align-data writes those scores for rated sources).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    if "chosen" in row or "rejected" in row:
        pair = normalize_preference(row, where)
        if score_threshold is None:
            labels = (True, False)
        else:
            labels = (_score(row, "score_chosen", where, score_threshold), _score(row, "score_rejected", where, score_threshold))
        return [
            {"prompt": pair["prompt"], "completion": pair[side], "label": label}
            for side, label in zip(("chosen", "rejected"), labels)
        ]
    if "completion" not in row or row["completion"] is None:
        raise DataError(
            f"{where}: field 'completion' missing (an unpaired row has 'prompt', 'completion' and 'label'; "
            f"found: {', '.join(map(repr, row)) or 'nothing'})"
        )
    prompt = normalize_prompt({"prompt": row.get("prompt")}, where)["prompt"] if row.get("prompt") is not None else None
    if prompt is None:
        raise DataError(f"{where}: field 'prompt' missing (an unpaired row has 'prompt', 'completion' and 'label')")
    if row.get("label") is not None:
        label = _label(row["label"], where)
    elif "score" in row and score_threshold is not None:
        label = _score(row, "score", where, score_threshold)
    else:
        hint = " (a row with 'score' needs kto.score_threshold)" if "score" in row else ""
        raise DataError(f"{where}: field 'label' missing{hint}")
    return [{"prompt": prompt, "completion": _response(row["completion"], where, "completion"), "label": label}]


def merge_unpaired(groups: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """Flatten the unpaired rows of each input row; a response several pairs share is kept once.

    With several pairs per prompt (align-data's best-vs-each or all-pairs) a response recurs: its
    copies are merged, and a response labelled both ways (chosen in one pair, rejected in another)
    is dropped, having no single label. Rows given as unpaired rows (one per input row) are kept as
    they are. Both counts go to the notes.
    """
    rows: list[dict] = []
    labels: dict[str, list[bool]] = {}  # (prompt, completion) of a pair's response -> its labels
    index: dict[str, int] = {}
    for group in groups:
        from_pair = len(group) == 2  # a pair gives two rows, an unpaired row one
        for row in group:
            if not from_pair:
                rows.append(row)
                continue
            key = json.dumps([row["prompt"], row["completion"]], sort_keys=True, ensure_ascii=False)
            if key not in labels:
                labels[key], index[key] = [], len(rows)
                rows.append(row)
            labels[key].append(row["label"])
    repeats = sum(len(v) - 1 for v in labels.values())
    mixed = {index[k] for k, v in labels.items() if len(set(v)) > 1}
    notes = []
    if repeats:
        notes.append(f"{repeats} repeated responses of pairs merged (a response in several pairs counts once)")
    if mixed:
        notes.append(f"{len(mixed)} responses dropped: desirable in one pair and undesirable in another (no single label)")
    return [r for i, r in enumerate(rows) if i not in mixed], notes


# The KTO paper (Ethayarajh et al. 2024, sec. 4.2) keeps
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in this range.
KTO_WEIGHT_RATIO = (1.0, 4 / 3)


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float] | None:
    """(desirable_weight, undesirable_weight) that bring the weighted ratio of desirable to undesirable
    rows into KTO_WEIGHT_RATIO: (1, 1) when it already is; otherwise the minority side is weighted up
    and the majority kept at 1, as in the paper's example (1:10 -> desirable_weight 10 to 13.33), aiming
    at the middle of the range (7/6) so the 2-decimal rounding stays inside it. None without both labels."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return None
    ratio = n_desirable / n_undesirable
    low, high = KTO_WEIGHT_RATIO
    if low <= ratio <= high:
        return 1.0, 1.0
    middle = (low + high) / 2
    if ratio < low:
        return round(middle / ratio, 2), 1.0
    return 1.0, round(ratio / middle, 2)


def kto_balance_note(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """A line for a KTO run whose weighted balance falls outside KTO_WEIGHT_RATIO, with the weights
    that would bring it in (kto_weights); None when it is inside, or when a label is missing."""
    suggested = kto_weights(n_desirable, n_undesirable)
    if suggested is None:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = KTO_WEIGHT_RATIO
    if low <= ratio <= high:
        return None
    return (
        f"{n_desirable} desirable and {n_undesirable} undesirable training rows: weighted ratio {ratio:.2f}, outside the "
        f"paper's [{low:g}, {high:.3g}]; kto.desirable_weight={suggested[0]:g} kto.undesirable_weight={suggested[1]:g} would bring it in"
    )


def normalize_prompt(row: Any, where: str) -> dict:
    """A prompt to sample from: `prompt` (messages or text) of any row, or an SFT conversation
    up to its last assistant turn; an optional `answer` (text or list) is kept as the reference
    of the `answer` judge."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _maybe_json(row["prompt"])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
    elif "messages" in row:
        messages = normalize_sft(row, where)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        if not prompt:
            raise DataError(f"{where}: field 'messages': no turn before the assistant's to use as a prompt")
    else:
        raise DataError(f"{where}: field 'prompt' missing (a prompt row has 'prompt', or 'messages')")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the last message must be from the user, got {prompt[-1]['role']!r}")
    out = {"prompt": prompt}
    if row.get("answer") is not None:  # the reference of the verifiable-answer judge (online stages)
        answer = _maybe_json(row["answer"])
        answer = [answer] if isinstance(answer, str) else answer
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str) for a in answer):
            raise DataError(f"{where}: field 'answer': expected a string or a non-empty list of strings, got {_kind(row['answer'])}")
        out["answer"] = answer
    return out
