"""Rows already in prompt/chosen/rejected form.

`trl` and `ultrafeedback-binarized` read TRL's preference formats: conversational or plain
text, with an explicit `prompt` or an implicit one (the messages `chosen` and `rejected` share),
optional `score_chosen` / `score_rejected`, and an id from `prompt_id` or `id`.
HuggingFaceH4/ultrafeedback_binarized is such a set: a text `prompt` and `chosen` / `rejected`
conversations that repeat the prompt as their first (user) message; that repeat is cut off.

`pairs` is the same with the columns named on the command line (`--prompt-col`,
`--chosen-col`, `--rejected-col`, `--chosen-score-col`, `--rejected-score-col`, `--system-col`,
`--id-col`).
"""

from __future__ import annotations

from typing import Iterable

from data_tools.sources.base import (
    Drop,
    Format,
    Item,
    Pair,
    RowError,
    messages_value,
    optional_number,
    optional_text,
    require,
    short_where,
    split_shared_prefix,
    strip_prefix,
)


def to_pair(prompt_value, chosen_value, rejected_value, where: str, names: tuple[str, str, str]) -> Pair | Drop:
    p_name, c_name, r_name = names
    chosen = messages_value(chosen_value, where, c_name, "assistant")
    rejected = messages_value(rejected_value, where, r_name, "assistant")
    if prompt_value is None:
        if isinstance(chosen_value, str) and chosen == [{"role": "assistant", "content": chosen_value}]:
            raise RowError(
                where, p_name,
                f"field '{p_name}' missing (plain-text chosen/rejected need an explicit prompt; "
                "an implicit prompt is the messages the two conversations share)",
                "missing_field",
            )
        split = split_shared_prefix(chosen, rejected)
        if split is None:
            return Drop("chosen and rejected share no prompt")
        return Pair(*split, id="", where=where)
    prompt = messages_value(prompt_value, where, p_name, "user")
    chosen, rejected = strip_prefix(prompt, chosen), strip_prefix(prompt, rejected)
    if isinstance(prompt_value, str) and chosen and chosen[0]["role"] != "assistant":
        # ultrafeedback_binarized: a text prompt plus conversations that start with it.
        split = split_shared_prefix(chosen, rejected)
        if split is not None:
            prompt, chosen, rejected = split
    return Pair(prompt, chosen, rejected, id="", where=where)


class PreferenceRows(Format):
    name = "trl"
    summary = "TRL preference rows (prompt/chosen/rejected; conversational or text; implicit prompt)"

    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
               "score_chosen": "score_chosen", "score_rejected": "score_rejected", "system": None}
    id_columns: tuple[str, ...] = ("prompt_id", "id")

    def items(self, row: dict, where: str) -> Iterable[Item]:
        cols = self.columns
        names = (cols["prompt"], cols["chosen"], cols["rejected"])
        item = to_pair(
            row.get(cols["prompt"]),
            require(row, cols["chosen"], where),
            require(row, cols["rejected"], where),
            where,
            names,
        )
        if isinstance(item, Drop):
            return [item]
        if cols["system"]:
            system = optional_text(row, cols["system"], where)
            if system is not None and item.prompt[0]["role"] != "system":
                item.prompt = [{"role": "system", "content": system}] + item.prompt
        if cols["score_chosen"]:
            item.score_chosen = optional_number(row, cols["score_chosen"], where)
        if cols["score_rejected"]:
            item.score_rejected = optional_number(row, cols["score_rejected"], where)
        item.id = next((str(row[c]) for c in self.id_columns if c and row.get(c) not in (None, "")), short_where(where))
        return [item]


class UltraFeedbackBinarized(PreferenceRows):
    name = "ultrafeedback-binarized"
    summary = "HuggingFaceH4/ultrafeedback_binarized rows (prompt, chosen/rejected conversations, scores)"


class Pairs(PreferenceRows):
    name = "pairs"
    summary = "generic pair rows; columns named with --prompt-col/--chosen-col/--rejected-col/..."
    option_names = frozenset(
        {"prompt_col", "chosen_col", "rejected_col", "chosen_score_col", "rejected_score_col", "system_col", "id_col"}
    )

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.columns = {
            "prompt": opts.prompt_col or "prompt",
            "chosen": opts.chosen_col or "chosen",
            "rejected": opts.rejected_col or "rejected",
            "score_chosen": opts.chosen_score_col,
            "score_rejected": opts.rejected_score_col,
            "system": opts.system_col,
        }
        self.id_columns = (opts.id_col,) if opts.id_col else ()
