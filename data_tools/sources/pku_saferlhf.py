"""PKU-Alignment/PKU-SafeRLHF: a `prompt`, `response_0` / `response_1`, and two labels,
`better_response_id` (more helpful) and `safer_response_id` (more harmless); `--pku-preference`
picks which one decides chosen (default better). `--pku-require-safe-chosen` also drops pairs
whose chosen response is labelled unsafe (`is_response_<i>_safe`)."""

from __future__ import annotations

from typing import Iterable

from align.core.errors import ConfigError
from data_tools.sources.base import Drop, Format, Item, Pair, assistant, boolean, choice_int, short_where, text, user


class PKUSafeRLHF(Format):
    name = "pku-saferlhf"
    summary = "PKU-SafeRLHF rows (response_0/1, better_response_id, safer_response_id)"
    option_names = frozenset({"pku_preference", "pku_require_safe_chosen"})

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.preference = opts.pku_preference or "better"
        if self.preference not in ("better", "safer"):
            raise ConfigError(f"--pku-preference: {self.preference!r} is not one of better, safer")

    def items(self, row: dict, where: str) -> Iterable[Item]:
        prompt = text(row, "prompt", where)
        responses = (text(row, "response_0", where), text(row, "response_1", where))
        pick = choice_int(row, f"{self.preference}_response_id", where, (0, 1))
        if self.opts.pku_require_safe_chosen and not boolean(row, f"is_response_{pick}_safe", where):
            return [Drop("chosen response labelled unsafe (--pku-require-safe-chosen)")]
        rid = short_where(where)
        return [Pair([user(prompt)], [assistant(responses[pick])], [assistant(responses[1 - pick])], rid, where)]
