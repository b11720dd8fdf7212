"""The reward-vs-KL plane: which runs are Pareto-optimal, and which run to pick at a KL budget.

Pure functions on {run name: (kl, score)}; the evaluation stage stores their results in
eval.json and the report draws and tabulates them. A run is dominated when another run is at
least as good on both axes and strictly better on one: a score at least as high with KL at
most as high. So of two runs with equal KL only the higher-scoring one is on the frontier, of
two with equal score only the one with less KL, and identical points are both on it.

KL values are sample-based estimates: a run close to the reference can come out slightly
negative. They are used as measured (clamping would invent ties); the report says so.
"""

from __future__ import annotations

from typing import Iterable

Point = tuple[float, float]  # (kl, score)

DEFAULT_QUANTILES = (0.25, 0.5, 0.75, 1.0)


def dominated_by(points: dict[str, Point]) -> dict[str, str | None]:
    """For each run, a run that dominates it (the highest-scoring such run), or None when it is Pareto-optimal."""
    out: dict[str, str | None] = {}
    for name, (kl, score) in points.items():
        better = [
            (s, -k, other) for other, (k, s) in points.items()
            if other != name and k <= kl and s >= score and (k < kl or s > score)
        ]
        out[name] = max(better)[2] if better else None
    return out


def pareto_frontier(points: dict[str, Point]) -> list[str]:
    """The Pareto-optimal runs, by increasing KL (then name): along it, more KL buys more score."""
    dom = dominated_by(points)
    return sorted((n for n in points if dom[n] is None), key=lambda n: (points[n][0], n))


def best_within(points: dict[str, Point], budget: float) -> str | None:
    """The run a user should pick when KL may be at most `budget`: the highest score with KL <= budget,
    the lower KL on equal scores (then the name, so the pick is deterministic); None when no run fits."""
    fits = [(-score, kl, name) for name, (kl, score) in points.items() if kl <= budget]
    return min(fits)[2] if fits else None


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    low = int(pos)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (pos - low)


def budgets(points: dict[str, Point], configured: Iterable[float] | None = None,
            quantiles: Iterable[float] = DEFAULT_QUANTILES) -> list[tuple[float, str]]:
    """The KL budgets to report, each with how it was chosen: the configured ones, or quantiles of the
    observed KLs (duplicates removed). Sorted by budget."""
    if configured is not None:
        chosen = [(float(b), "configured") for b in configured]
    else:
        kls = [kl for kl, _ in points.values()]
        chosen = [(quantile(kls, q), f"{q:.0%} quantile of the observed KLs") for q in quantiles] if kls else []
    seen: dict[float, str] = {}
    for value, why in chosen:
        seen.setdefault(value, why)
    return sorted(seen.items())


def frontier_summary(points: dict[str, Point], score: str, configured: Iterable[float] | None = None) -> dict:
    """Everything the report shows about the plane: each run's point and whether it is on the frontier
    (or which run dominates it), the frontier in KL order, and the pick at each budget."""
    dom = dominated_by(points)
    picks = []
    for budget, why in budgets(points, configured):
        name = best_within(points, budget)
        picks.append({
            "kl_budget": budget, "basis": why, "pick": name,
            "kl": points[name][0] if name else None, "score": points[name][1] if name else None,
        })
    return {
        "score": score,
        "runs": {n: {"kl": k, "score": s, "on_frontier": dom[n] is None, "dominated_by": dom[n]} for n, (k, s) in points.items()},
        "frontier": pareto_frontier(points),
        "budgets": picks,
    }


def score_key(policies: dict, has_reward_model: bool) -> str | None:
    """The score the plane's vertical axis shows: the reward model's when there is one, else the first judge's."""
    if has_reward_model:
        return "reward_model"
    for r in policies.values():
        for key in r.get("scores", {}):
            return key
    return None


def plane_points(policies: dict, score: str) -> dict[str, Point]:
    """{run: (kl, score)} from eval.json's policies; runs without that score are left out (the caller counts them)."""
    out = {}
    for name, r in policies.items():
        entry = r.get("scores", {}).get(score) or {}
        value = entry.get("mean") if entry.get("n", 1) else None  # n == 0: the judge scored none of its responses
        if value is not None and r.get("kl_mean") is not None:
            out[name] = (float(r["kl_mean"]), float(value))
    return out
