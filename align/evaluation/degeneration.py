"""Over-optimization made visible: degenerate answers, and a judge score that rises while perplexity climbs.

A policy pushed too far against a judge or reward model finds what the judge rewards and forgets
the rest: its held-out perplexity climbs and its answers repeat themselves. Measured here from
the generated samples, all pure Python:

- distinct-2: unique word bigrams / all word bigrams over every response of the policy (Li et al.
  2016's corpus-level ratio); repetitive policies score low.
- loop share: the share of responses holding an n-gram loop, the same 1-8 token span repeated
  back to back at least `min_repeats` times and covering at least `min_tokens` tokens
  ("Paris. Paris. Paris.", "!!!!!!", "I can help. I can help. I can help."), the typical
  degenerate continuation that runs until max_new_tokens.

Tokens are words and single punctuation marks (`\\w+|[^\\w\\s]`), so loops without spaces count.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """Unique n-grams / n-grams over all texts; None when the texts hold no n-gram at all."""
    grams = [tuple(t[i : i + n]) for t in map(tokens, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_loop(text: str, max_n: int = 8, min_repeats: int = 3, min_tokens: int = 6) -> tuple[str, int] | None:
    """The longest-covering span repeated back to back in `text` as (span, repeats), or None without a loop."""
    toks = tokens(text)
    best: tuple[int, str, int] | None = None
    for n in range(1, max_n + 1):
        i = 0
        while i + 2 * n <= len(toks):
            span = toks[i : i + n]
            repeats = 1
            while toks[i + repeats * n : i + (repeats + 1) * n] == span:
                repeats += 1
            if repeats >= min_repeats and repeats * n >= min_tokens and (best is None or repeats * n > best[0]):
                best = (repeats * n, " ".join(span), repeats)
            i += max(1, (repeats - 1) * n) if repeats > 1 else 1
    return (best[1], best[2]) if best else None


def degeneration(texts: list[str]) -> dict:
    """The degeneration measures of one policy's responses."""
    loops = [repetition_loop(t) for t in texts]
    return {
        "distinct_2": distinct_n(texts, 2),
        "loop_share": sum(x is not None for x in loops) / len(texts) if texts else None,
        "loops": sum(x is not None for x in loops),
    }


def overoptimization(policies: dict, baseline: str, perplexity_rise: float) -> dict[str, dict]:
    """Policies whose held-out perplexity rose more than `perplexity_rise` (a fraction: 0.2 = 20%) over the
    baseline's while at least one judge (or reward-model) score rose: {name: why}, with the degeneration
    figures beside the baseline's. Policies without a perplexity, or a baseline without one, are not judged."""
    base = policies.get(baseline) or {}
    base_ppl = base.get("perplexity")
    if not base_ppl:
        return {}
    flagged = {}
    for name, r in policies.items():
        ppl = r.get("perplexity")
        if name == baseline or ppl is None:
            continue
        rise = ppl / base_ppl - 1
        if rise <= perplexity_rise:
            continue
        rose = {}
        for judge, s in (r.get("scores") or {}).items():
            b = (base.get("scores") or {}).get(judge)
            if b and s.get("n") and b.get("n") and s["mean"] > b["mean"]:
                rose[judge] = [b["mean"], s["mean"]]
        if rose:
            flagged[name] = {
                "perplexity": [base_ppl, ppl], "perplexity_rise": rise, "scores_rose": rose,
                **{k: [base.get(k), r.get(k)] for k in ("distinct_2", "loop_share", "response_tokens_mean")},
            }
    return flagged


def describe_warning(name: str, w: dict) -> str:
    """One line of the report for a flagged policy."""
    def num(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    scores = ", ".join(f"{j} {num(a)} -> {num(b)}" for j, (a, b) in w["scores_rose"].items())
    d2, loops, length = w["distinct_2"], w["loop_share"], w["response_tokens_mean"]
    return (
        f"{name}: held-out perplexity {num(w['perplexity'][0], 2)} -> {num(w['perplexity'][1], 2)} "
        f"(+{w['perplexity_rise']:.0%}) while {scores}; distinct-2 {num(d2[0])} -> {num(d2[1])}, responses with a "
        f"loop {num(loops[0], 2)} -> {num(loops[1], 2)}, response tokens {num(length[0], 1)} -> {num(length[1], 1)}"
    )
