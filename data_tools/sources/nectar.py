"""berkeley-nest/Nectar: `prompt` is a transcript ("\\n\\nHuman: ... \\n\\nAssistant: ") and
`answers` holds seven {answer, model, rank} with rank 1 the best. Pairs carry no scores (a rank
is not a rating); repeated ranks within a row are an error."""

from __future__ import annotations

from typing import Iterable

from data_tools.sources.base import (
    Candidate,
    Drop,
    Format,
    Group,
    Item,
    as_number,
    assistant,
    check_unique_ranks,
    list_field,
    mapping_field,
    parse_transcript,
    require,
    short_where,
    text,
)


class Nectar(Format):
    name = "nectar"
    summary = "berkeley-nest/Nectar rows (transcript prompt + answers with rank)"
    yields = "ranks"

    def items(self, row: dict, where: str) -> Iterable[Item]:
        prompt_text = text(row, "prompt", where)
        answers = list_field(row, "answers", where)
        candidates, ranks = [], []
        for i, answer in enumerate(answers):
            name = f"answers[{i}]"
            answer = mapping_field(answer, where, name)
            response = text(answer, "answer", where, f"{name}.answer")
            rank = as_number(require(answer, "rank", where, f"{name}.rank"), where, f"{name}.rank")
            ranks.append((rank, where, f"{name}.rank"))
            model = answer.get("model")
            candidates.append(Candidate([assistant(response)], -rank, model if isinstance(model, str) and model else str(i), where))
        check_unique_ranks(ranks)
        prompt = parse_transcript(prompt_text)
        if prompt is None:
            return [Drop("transcript without Human:/Assistant: turns")]
        # The transcript ends with an empty "Assistant:" turn: the slot the answers fill.
        if prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
            prompt = prompt[:-1]
        return [Group(prompt, candidates, id=short_where(where), where=where, scored=False)]
