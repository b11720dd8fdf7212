"""openbmb/UltraFeedback raw rows: an `instruction` and four `completions`, each with a
`response`, per-aspect `annotations` (Rating "1".."5" or "N/A"), `overall_score` (the critique's
1-10) and `fine-grained_score` (mean of the aspect ratings). Which score ranks the completions
is `--uf-score` (default fine-grained: the overall_score of the first release mis-scored
thousands of completions as 10, fixed upstream in Dec 2023, and the aspect mean tracks quality
more closely). Each completion's `custom_system_prompt` differs per completion, so it is not
part of the shared prompt."""

from __future__ import annotations

from typing import Iterable

from data_tools.sources.base import (
    Candidate,
    Drop,
    Format,
    Group,
    Item,
    RowError,
    as_number,
    assistant,
    list_field,
    mapping_field,
    short_where,
    text,
    user,
)

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
SCORES = ("fine-grained", "overall", "mean-aspects", *ASPECTS)


class UltraFeedback(Format):
    name = "ultrafeedback"
    summary = "openbmb/UltraFeedback raw rows (instruction + completions with ratings)"
    option_names = frozenset({"uf_score"})

    def __init__(self, opts) -> None:
        super().__init__(opts)
        self.score = opts.uf_score or "fine-grained"
        if self.score not in SCORES:
            from align.core.errors import ConfigError

            raise ConfigError(f"--uf-score: {self.score!r} is not one of {', '.join(SCORES)}")

    def items(self, row: dict, where: str) -> Iterable[Item]:
        instruction = text(row, "instruction", where)
        completions = list_field(row, "completions", where)
        candidates, out = [], []
        for i, completion in enumerate(completions):
            name = f"completions[{i}]"
            completion = mapping_field(completion, where, name)
            response = text(completion, "response", where, f"{name}.response")
            score = self._score(completion, where, name)
            if score is None:
                out.append(Drop("response without a score (N/A)"))
                continue
            model = completion.get("model")
            cid = model if isinstance(model, str) and model else str(i)
            candidates.append(Candidate([assistant(response)], score, cid, where))
        out.append(Group([user(instruction)], candidates, id=short_where(where), where=where))
        return out

    def _score(self, completion: dict, where: str, name: str) -> float | None:
        if self.score in ("fine-grained", "overall"):
            key = "fine-grained_score" if self.score == "fine-grained" else "overall_score"
            value = completion.get(key)
            if value is None or value == "N/A":
                if key not in completion:
                    raise RowError(where, f"{name}.{key}", f"field '{name}.{key}' missing", "missing_field")
                return None
            return as_number(value, where, f"{name}.{key}")
        annotations = mapping_field(completion.get("annotations"), where, f"{name}.annotations")
        aspects = ASPECTS if self.score == "mean-aspects" else (self.score,)
        ratings = []
        for aspect in aspects:
            field = f"{name}.annotations.{aspect}.Rating"
            if aspect not in annotations or annotations[aspect] is None:
                raise RowError(where, field, f"field '{field}' missing", "missing_field")
            rating = mapping_field(annotations[aspect], where, f"{name}.annotations.{aspect}").get("Rating")
            if rating is None:
                raise RowError(where, field, f"field '{field}' missing", "missing_field")
            if rating == "N/A":
                continue
            ratings.append(as_number(rating, where, field))
        return sum(ratings) / len(ratings) if ratings else None
