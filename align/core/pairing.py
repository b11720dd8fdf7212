"""Scored responses -> preference pairs, and the structural checks a pair must pass.

One implementation for every producer of pairs: `align-data build` / `generate` (data_tools)
and the online DPO stage, which pairs its own samples each round.

Strategies (`pair_group(..., strategy)`):
* best-vs-worst: one pair, the best response against the worst;
* best-vs-each:  the best against every response that scores lower;
* all-pairs:     every two responses with different scores, the higher one chosen.

A pair needs chosen score - rejected score >= `min_margin` and > 0: ties are never pairs.
Among equal scores the earlier response in the input counts as first (deterministic). What
is not paired is counted in the `counts` Counter: groups with one response, groups whose
responses all tie, groups where no pair reaches the margin, and the candidate pairs skipped
for a tie or the margin.

Pure Python (no torch): data_tools and configs import it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from align.core.rows import REASONS, preference_problems

Messages = list[dict]

STRATEGIES = ("best-vs-worst", "best-vs-each", "all-pairs")

# Keys of the pairing counter, with the words reports use.
OUTCOMES = {
    "single_response": "prompts with fewer than two responses",
    "all_tied": "prompts whose responses all tie",
    "below_margin": "prompts with no pair reaching --min-margin",
    "skipped_tie": "candidate pairs skipped: tie",
    "skipped_margin": "candidate pairs skipped: below --min-margin",
    "unpaired_responses": "responses in no pair (by the strategy)",
}

@dataclass
class Pair:
    prompt: Messages
    chosen: Messages
    rejected: Messages
    id: str
    where: str
    score_chosen: float | None = None
    score_rejected: float | None = None


@dataclass
class Candidate:
    """One response to a group's prompt. `score`: higher is better (ranks are negated)."""

    messages: Messages
    score: float
    id: str
    where: str


@dataclass
class Group:
    prompt: Messages
    candidates: list[Candidate]
    id: str
    where: str
    # True when scores are real ratings (written as score_chosen/score_rejected);
    # False when they only encode a ranking (nothing meaningful to write).
    scored: bool = True


# --------------------------------------------------------------------------- pairing


def _pair(group: Group, chosen: Candidate, rejected: Candidate) -> Pair:
    return Pair(
        prompt=group.prompt,
        chosen=chosen.messages,
        rejected=rejected.messages,
        id=f"{group.id}:{chosen.id}>{rejected.id}",
        where=group.where,
        score_chosen=chosen.score if group.scored else None,
        score_rejected=rejected.score if group.scored else None,
    )


def pair_group(group: Group, strategy: str, min_margin: float, counts: Counter) -> Iterator[Pair]:
    cands = group.candidates
    if len(cands) < 2:
        counts["single_response"] += 1
        return
    order = sorted(range(len(cands)), key=lambda i: -cands[i].score)  # stable: ties keep input order
    best = cands[order[0]]
    if best.score == min(c.score for c in cands):
        counts["all_tied"] += 1
        return

    def ok(c: Candidate, r: Candidate) -> bool:
        if c.score <= r.score:
            counts["skipped_tie"] += c.score == r.score
            return False
        if c.score - r.score < min_margin:
            counts["skipped_margin"] += 1
            return False
        return True

    if strategy == "best-vs-worst":
        worst = next(cands[i] for i in order if cands[i].score == cands[order[-1]].score)
        if best.score - worst.score < min_margin:
            counts["below_margin"] += 1
            return
        counts["unpaired_responses"] += len(cands) - 2
        yield _pair(group, best, worst)
        return
    if strategy == "best-vs-each":
        pairs = [_pair(group, best, cands[i]) for i in sorted(order[1:]) if ok(best, cands[i])]
    elif strategy == "all-pairs":
        pairs = []
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                a, b = cands[i], cands[j]
                if b.score > a.score:
                    a, b = b, a
                if ok(a, b):
                    pairs.append(_pair(group, a, b))
    else:
        raise ValueError(f"unknown pairing strategy {strategy!r}")
    if not pairs:
        counts["below_margin"] += 1
        return
    used = {id(p.chosen) for p in pairs} | {id(p.rejected) for p in pairs}
    counts["unpaired_responses"] += sum(1 for c in cands if id(c.messages) not in used)
    yield from pairs


# --------------------------------------------------------------------------- structural checks
# The row checks themselves live in align.core.rows (one implementation, shared with training and
# `align-data validate`); a pair is checked by the same rules, minus the score rules.

STRUCTURAL_REASONS = {key: REASONS[key] for key in ("malformed_roles", "empty_turn", "identical")}


def structural_problem(pair: Pair) -> str | None:
    """The key of the first structural rule the pair breaks (see STRUCTURAL_REASONS), or None."""
    row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    problems = preference_problems(row)
    return problems[0][0] if problems else None
