"""Thumbs-up / thumbs-down feedback: one row per response with a binary label (`--kind unpaired`).

Columns, when not named on the command line (the first one present in the row is read):
* prompt:     `--prompt-col` (default `prompt`): text or a list of messages;
* response:   `--response-col`, else `completion` (TRL's unpaired format, e.g. trl-lib/kto-mix-14k)
  or `response` (chat feedback logs);
* label:      `--label-col`, else `label` (TRL), `thumbs_up`, or `thumbs_down` (read inverted);
* `--system-col` adds a system message, `--id-col` names the id column.

Label values: true/false, 1/0, 1/-1 (a +1/-1 rating, as Open WebUI exports), and the words
up/down, thumbs_up/thumbs_down, like/dislike, good/bad, positive/negative, desirable/undesirable,
yes/no (any case), or the emoji. Anything else (a 1-5 rating, say) is an error that points to
`--format ratings --label-threshold`.
"""

from __future__ import annotations

from typing import Iterable

from data_tools.sources.base import (
    Format,
    Item,
    Labeled,
    RowError,
    kind,
    messages_value,
    optional_text,
    require,
    short_where,
)

RESPONSE_COLUMNS = ("completion", "response")
LABEL_COLUMNS = (("label", False), ("thumbs_up", False), ("thumbs_down", True))  # (column, inverted)
_WORDS = {
    True: ("true", "1", "+1", "up", "thumbs_up", "thumbs-up", "thumbsup", "like", "good", "positive", "desirable", "yes", "👍"),
    False: ("false", "0", "-1", "down", "thumbs_down", "thumbs-down", "thumbsdown", "dislike", "bad", "negative",
            "undesirable", "no", "👎"),
}
WORDS = {word: label for label, words in _WORDS.items() for word in words}


def thumbs_label(value, where: str, name: str) -> bool:
    """A binary label from the values feedback data uses (see the module docstring)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in WORDS:
        return WORDS[value.strip().lower()]
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):  # numpy scalars from parquet
        return thumbs_label(value.item(), where, name)
    shown = repr(value) if isinstance(value, (str, int, float)) else kind(value)
    raise RowError(
        where, name,
        f"field '{name}': expected a thumbs label (true/false, 1/0, 1/-1, up/down, good/bad, ...), got {shown} "
        "(for ratings on a scale use --format ratings with --label-threshold)",
        "bad_value",
    )


class Thumbs(Format):
    name = "thumbs"
    summary = "thumbs-up/down rows (prompt, completion or response, label / thumbs_up); --kind unpaired only"
    option_names = frozenset({"prompt_col", "response_col", "label_col", "system_col", "id_col"})
    yields = "labels"

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.prompt_col = opts.prompt_col or "prompt"
        self.response_cols = (opts.response_col,) if opts.response_col else RESPONSE_COLUMNS
        self.label_cols = ((opts.label_col, False),) if opts.label_col else LABEL_COLUMNS

    def items(self, row: dict, where: str) -> Iterable[Item]:
        prompt = messages_value(require(row, self.prompt_col, where), where, self.prompt_col, "user")
        if self.opts.system_col:
            system = optional_text(row, self.opts.system_col, where)
            if system is not None:
                prompt = [{"role": "system", "content": system}] + prompt
        response_col = next((c for c in self.response_cols if row.get(c) is not None), self.response_cols[0])
        completion = messages_value(require(row, response_col, where), where, response_col, "assistant")
        label_col, inverted = next(((c, inv) for c, inv in self.label_cols if row.get(c) not in (None, "")), self.label_cols[0])
        if row.get(label_col) in (None, ""):
            names = " / ".join(f"'{c}'" for c, _ in self.label_cols)
            raise RowError(where, label_col, f"field {names} missing (the thumbs-up/down label)", "missing_field")
        label = thumbs_label(row[label_col], where, label_col) != inverted
        id_col = self.opts.id_col
        rid = str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else short_where(where)
        return [Labeled(prompt, completion, label, id=rid, where=where)]
