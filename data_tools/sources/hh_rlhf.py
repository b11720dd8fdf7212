"""Anthropic/hh-rlhf: `chosen` and `rejected` are whole transcripts
("\\n\\nHuman: ...\\n\\nAssistant: ..."); the turns they share are the (multi-turn) prompt."""

from __future__ import annotations

from typing import Iterable

from data_tools.sources.base import Drop, Format, Item, Pair, parse_transcript, short_where, split_shared_prefix, text


class HHRLHF(Format):
    name = "hh-rlhf"
    summary = "Anthropic HH-RLHF transcripts (chosen/rejected with Human:/Assistant: turns)"

    def items(self, row: dict, where: str) -> Iterable[Item]:
        chosen_text = text(row, "chosen", where)
        rejected_text = text(row, "rejected", where)
        chosen, rejected = parse_transcript(chosen_text), parse_transcript(rejected_text)
        if chosen is None or rejected is None:
            return [Drop("transcript without Human:/Assistant: turns")]
        split = split_shared_prefix(chosen, rejected)
        if split is None:
            return [Drop("chosen and rejected share no prompt")]
        prompt, chosen_rest, rejected_rest = split
        return [Pair(prompt, chosen_rest, rejected_rest, id=short_where(where), where=where)]
