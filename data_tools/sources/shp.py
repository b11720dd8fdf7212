"""stanfordnlp/SHP (and SHP-2): a Reddit post `history` and two top-level comments
`human_ref_A` / `human_ref_B`; `labels` is 1 when A is preferred. `score_A` / `score_B` are the
comments' net upvotes, written as the pair's scores. `score_ratio` (preferred : other, >= 1) is
filtered with `--shp-min-ratio` (the SHP authors suggest 2 or more for cleaner preferences)."""

from __future__ import annotations

from typing import Iterable

from data_tools.sources.base import Drop, Format, Item, Pair, assistant, choice_int, number, optional_number, short_where, text, user


class SHP(Format):
    name = "shp"
    summary = "Stanford SHP rows (history, human_ref_A/B, labels, score_A/B)"
    option_names = frozenset({"shp_min_ratio"})

    def items(self, row: dict, where: str) -> Iterable[Item]:
        history = text(row, "history", where)
        ref_a, ref_b = text(row, "human_ref_A", where), text(row, "human_ref_B", where)
        label = choice_int(row, "labels", where, (0, 1))
        score_a, score_b = number(row, "score_A", where), number(row, "score_B", where)
        chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
        s_chosen, s_rejected = (score_a, score_b) if label == 1 else (score_b, score_a)
        min_ratio = self.opts.shp_min_ratio
        if min_ratio is not None:
            ratio = optional_number(row, "score_ratio", where)
            if ratio is None:  # SHP always carries it; other exports may not
                ratio = s_chosen / s_rejected if s_rejected > 0 else float("inf")
            if ratio < min_ratio:
                return [Drop("score ratio below --shp-min-ratio")]
        post = row.get("post_id")
        ids = (row.get("c_root_id_A"), row.get("c_root_id_B")) if label == 1 else (row.get("c_root_id_B"), row.get("c_root_id_A"))
        pid = f"{post}:{ids[0]}>{ids[1]}" if post and all(ids) else short_where(where)
        return [Pair([user(history)], [assistant(chosen)], [assistant(rejected)], pid, where, s_chosen, s_rejected)]
