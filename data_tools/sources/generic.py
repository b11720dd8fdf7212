"""Generic rated and ranked files, columns named on the command line.

* `ratings`: responses with a score, higher is better.
* `ranked`:  responses with a rank, lower is better (1 = best); repeated ranks are an error.

Two shapes each:
* one row per response (default): `--prompt-col` (prompt), `--response-col` (response) and
  `--score-col` (score) or `--rank-col` (rank); rows are grouped by prompt wherever they are
  in the file;
* one row per prompt: `--responses-col` with a list of responses and `--scores-col` /
  `--ranks-col` with the parallel list of scores / ranks.

Prompts and responses are plain text (one user / assistant message) or lists of messages;
`--system-col` adds a system message, `--id-col` names the id column.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from data_tools.sources.base import (
    Candidate,
    Format,
    Group,
    Item,
    RowError,
    as_number,
    check_unique_ranks,
    json_cell,
    line_ref,
    list_field,
    messages_value,
    number,
    optional_text,
    require,
    short_where,
)


class _Generic(Format):
    ranked = False  # ranks (lower better) instead of scores

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.prompt_col = opts.prompt_col or "prompt"
        self.system_col, self.id_col = opts.system_col, opts.id_col

    def _prompt(self, row: dict, where: str):
        prompt = messages_value(require(row, self.prompt_col, where), where, self.prompt_col, "user")
        if self.system_col:
            system = optional_text(row, self.system_col, where)
            if system is not None:
                prompt = [{"role": "system", "content": system}] + prompt
        return prompt

    def _row_id(self, row: dict, where: str) -> str:
        if self.id_col and row.get(self.id_col) not in (None, ""):
            return str(row[self.id_col])
        return short_where(where)


class _PerResponse(_Generic):
    grouped = True

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.response_col = opts.response_col or "response"
        self.value_col = (opts.rank_col or "rank") if self.ranked else (opts.score_col or "score")

    def parse(self, row: dict, where: str) -> tuple[str, Any]:
        prompt = json_cell(require(row, self.prompt_col, where))
        messages_value(prompt, where, self.prompt_col, "user")  # checked here, where the line is known
        system = optional_text(row, self.system_col, where) if self.system_col else None
        response = messages_value(require(row, self.response_col, where), where, self.response_col, "assistant")
        value = number(row, self.value_col, where)
        rid = str(row[self.id_col]) if self.id_col and row.get(self.id_col) not in (None, "") else line_ref(where)
        key = prompt if isinstance(prompt, str) and system is None else json.dumps([system, prompt], sort_keys=True)
        return key, [where, prompt, system, response, value, rid]

    def group_items(self, records: list[Any]) -> Iterable[Item]:
        if self.ranked:
            check_unique_ranks([(value, where, self.value_col) for where, _, _, _, value, _ in records])
        sign = -1.0 if self.ranked else 1.0
        candidates = [Candidate(resp, sign * value, rid, where) for where, _, _, resp, value, rid in records]
        first_where, prompt, system = records[0][:3]
        messages = messages_value(prompt, first_where, self.prompt_col, "user")
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        return [Group(messages, candidates, id=short_where(first_where), where=first_where, scored=not self.ranked)]


class _PerPrompt(_Generic):
    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.responses_col = opts.responses_col
        self.values_col = (opts.ranks_col or "ranks") if self.ranked else (opts.scores_col or "scores")

    def items(self, row: dict, where: str) -> Iterable[Item]:
        prompt = self._prompt(row, where)
        responses = list_field(row, self.responses_col, where)
        values = list_field(row, self.values_col, where)
        if len(values) != len(responses):
            raise RowError(
                where, self.values_col,
                f"field '{self.values_col}': {len(values)} values for {len(responses)} responses in '{self.responses_col}'",
                "bad_value",
            )
        names = [f"{self.values_col}[{i}]" for i in range(len(values))]
        numbers = [as_number(v, where, n) for v, n in zip(values, names)]
        if self.ranked:
            check_unique_ranks([(v, where, n) for v, n in zip(numbers, names)])
        sign = -1.0 if self.ranked else 1.0
        candidates = [
            Candidate(messages_value(r, where, f"{self.responses_col}[{i}]", "assistant"), sign * v, str(i), where)
            for i, (r, v) in enumerate(zip(responses, numbers))
        ]
        return [Group(prompt, candidates, id=self._row_id(row, where), where=where, scored=not self.ranked)]


_COMMON = {"prompt_col", "system_col", "id_col"}


class Ratings(Format):
    name = "ratings"
    summary = "generic rated responses (one row per response, or lists per prompt); higher score is better"
    option_names = frozenset(_COMMON | {"response_col", "score_col", "responses_col", "scores_col"})


class Ranked(Format):
    name = "ranked"
    summary = "generic ranked responses (one row per response, or lists per prompt); rank 1 is best"
    option_names = frozenset(_COMMON | {"response_col", "rank_col", "responses_col", "ranks_col"})


def make_generic(cls: type[Format], opts) -> Format:
    """The per-response or per-prompt variant of `ratings` / `ranked`, by the options given."""
    from align.core.errors import ConfigError

    ranked = cls is Ranked
    per_prompt = opts.responses_col is not None
    single = ("rank_col" if ranked else "score_col", "response_col")
    listed = ("ranks_col" if ranked else "scores_col",)
    clash = [n for n in (listed if not per_prompt else single) if getattr(opts, n) is not None]
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        raise ConfigError(f"{flag}: only with {'--responses-col' if not per_prompt else 'one row per response (no --responses-col)'}")
    base = _PerPrompt if per_prompt else _PerResponse
    variant = type(cls.__name__, (base,), {"name": cls.name, "summary": cls.summary,
                                            "option_names": cls.option_names, "ranked": ranked,
                                            "yields": "ranks" if ranked else "scores"})
    return variant(opts)
