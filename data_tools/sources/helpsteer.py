"""nvidia/HelpSteer and HelpSteer2: one row per (prompt, response) with five 0-4 ratings,
`helpfulness`, `correctness`, `coherence`, `complexity`, `verbosity`. Rows are grouped by prompt,
each response is scored as the weighted sum of its ratings (`--helpsteer-weights`, default
helpfulness=1), and the group is paired. HelpSteer2's multi-turn prompts separate earlier
turns with "<extra_id_1>Assistant" / "<extra_id_1>User" lines; they become messages."""

from __future__ import annotations

import re
from typing import Any, Iterable

from align.core.errors import ConfigError
from data_tools.sources.base import Candidate, Format, Group, Item, Messages, assistant, number, short_where, text

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def parse_prompt(value: str) -> Messages:
    parts = _TURN.split(value)
    messages = [{"role": "user", "content": parts[0].strip()}]
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": role.lower(), "content": content.strip()})
    return messages


class HelpSteer(Format):
    name = "helpsteer"
    summary = "nvidia/HelpSteer(2) rows (prompt, response, five 0-4 attribute ratings), grouped by prompt"
    option_names = frozenset({"helpsteer_weights"})
    grouped = True

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.weights = opts.helpsteer_weights or {"helpfulness": 1.0}
        unknown = sorted(set(self.weights) - set(ATTRIBUTES))
        if unknown:
            raise ConfigError(f"--helpsteer-weights: unknown attribute {unknown[0]!r} (attributes: {', '.join(ATTRIBUTES)})")
        if not any(self.weights.values()):
            raise ConfigError("--helpsteer-weights: every weight is 0")

    def parse(self, row: dict, where: str) -> tuple[str, Any]:
        prompt = text(row, "prompt", where)
        response = text(row, "response", where)
        score = sum(w * number(row, attr, where) for attr, w in self.weights.items() if w)
        return prompt, [where, prompt, response, score]

    def group_items(self, records: list[Any]) -> Iterable[Item]:
        first_where, prompt = records[0][0], records[0][1]
        candidates = [Candidate([assistant(resp)], score, str(i), where) for i, (where, _, resp, score) in enumerate(records)]
        return [Group(parse_prompt(prompt), candidates, id=short_where(first_where), where=first_where)]
