"""The reward-vs-KL frontier, the degeneration measures and the over-optimization warning, on constructed inputs;
and the report that shows them, written from a hand-made eval.json (no model)."""

from __future__ import annotations

import json

import pytest

from align.evaluation.degeneration import degeneration, distinct_n, overoptimization, repetition_loop
from align.evaluation.frontier import (
    best_within, budgets, dominated_by, frontier_summary, pareto_frontier, plane_points, quantile, score_key,
)

# --------------------------------------------------------------------------- frontier


def test_worked_example():
    #   run   KL    score
    points = {
        "sft": (0.0, 0.10),   # the reference: frontier (nothing has less KL)
        "a": (0.5, 0.40),     # frontier
        "b": (0.8, 0.35),     # dominated by a (less KL, more score)
        "c": (1.2, 0.70),     # frontier
        "d": (2.0, 0.65),     # dominated by c
        "e": (3.0, 0.90),     # frontier: the highest score
    }
    assert pareto_frontier(points) == ["sft", "a", "c", "e"]
    dom = dominated_by(points)
    assert dom["b"] == "a" and dom["d"] in {"c"} and dom["sft"] is None
    assert best_within(points, 0.6) == "a"
    assert best_within(points, 0.79) == "a" and best_within(points, 0.8) == "a"  # b is never the pick
    assert best_within(points, 1.2) == "c"  # the budget is inclusive
    assert best_within(points, 100) == "e"
    assert best_within(points, -0.1) is None
    # Every pick is on the frontier.
    assert all(best_within(points, b) in pareto_frontier(points) for b in (0, 0.5, 0.9, 1.5, 2.5, 3))


def test_dominated_by_names_the_best_dominating_run():
    points = {"x": (1.0, 0.0), "y": (0.5, 0.5), "z": (0.9, 0.8)}
    assert dominated_by(points)["x"] == "z"  # both dominate x; z scores higher


def test_a_single_run_is_the_frontier_and_every_budget_it_fits():
    points = {"only": (0.3, -1.5)}
    assert pareto_frontier(points) == ["only"]
    assert best_within(points, 0.3) == "only" and best_within(points, 0.29) is None
    s = frontier_summary(points, "format")
    assert s["frontier"] == ["only"] and s["runs"]["only"]["on_frontier"]
    assert [b["kl_budget"] for b in s["budgets"]] == [0.3]  # four equal quantiles collapse to one budget
    assert s["budgets"][0]["pick"] == "only"


def test_identical_points_are_both_on_the_frontier_and_the_pick_is_deterministic():
    points = {"b": (0.4, 0.6), "a": (0.4, 0.6), "c": (0.0, 0.1)}
    assert pareto_frontier(points) == ["c", "a", "b"]
    assert best_within(points, 0.5) == "a"  # equal score and KL: by name


def test_equal_kl_keeps_only_the_higher_score():
    points = {"lo": (0.7, 0.2), "hi": (0.7, 0.5), "ref": (0.0, 0.0)}
    assert pareto_frontier(points) == ["ref", "hi"]
    assert dominated_by(points)["lo"] == "hi"


def test_equal_score_keeps_only_the_lower_kl():
    points = {"cheap": (0.2, 0.5), "costly": (0.9, 0.5)}
    assert pareto_frontier(points) == ["cheap"]
    assert best_within(points, 1.0) == "cheap"  # equal scores: the lower KL


def test_negative_kl_estimates_are_used_as_measured():
    # Sample-based KL of a policy near the reference can come out below 0: no clamping, so the
    # slightly "negative" run is not tied with the reference.
    points = {"ref": (0.0, 0.30), "noisy": (-0.02, 0.25), "far": (1.0, 0.9)}
    assert pareto_frontier(points) == ["noisy", "ref", "far"]
    assert best_within(points, -0.01) == "noisy"
    assert best_within(points, 0.0) == "ref"
    picks = budgets(points)
    assert picks[0][0] == pytest.approx(quantile([0.0, -0.02, 1.0], 0.25))  # -0.01
    assert picks[0][0] < 0


def test_quantiles_and_configured_budgets():
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.25) == pytest.approx(1.75)
    assert quantile([5.0], 0.75) == 5.0
    points = {"a": (0.0, 0.0), "b": (1.0, 1.0), "c": (2.0, 0.5)}
    got = budgets(points)
    assert [b for b, _ in got] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert got[1][1] == "50% quantile of the observed KLs"
    assert budgets(points, [2.0, 0.25, 2.0]) == [(0.25, "configured"), (2.0, "configured")]
    s = frontier_summary(points, "rm", [0.25, 5])
    assert [(b["kl_budget"], b["pick"]) for b in s["budgets"]] == [(0.25, "a"), (5.0, "b")]
    assert s["runs"]["c"] == {"kl": 2.0, "score": 0.5, "on_frontier": False, "dominated_by": "b"}


def test_plane_points_skip_runs_without_the_score():
    policies = {
        "sft": {"kl_mean": 0.0, "scores": {"format": {"mean": 0.2, "n": 4}, "rm": {"mean": 0.0, "n": 0}}},
        "dpo": {"kl_mean": 0.4, "scores": {"format": {"mean": 0.6, "n": 4}}},
    }
    assert plane_points(policies, "format") == {"sft": (0.0, 0.2), "dpo": (0.4, 0.6)}
    assert plane_points(policies, "rm") == {}  # n == 0: a mean of nothing is not a score
    assert score_key(policies, has_reward_model=False) == "format"
    assert score_key(policies, has_reward_model=True) == "reward_model"


# --------------------------------------------------------------------------- degeneration


def test_distinct_2_of_repetitive_and_varied_text():
    assert distinct_n(["a b c d"]) == 1.0
    assert distinct_n(["a b a b a b"]) == pytest.approx(2 / 5)  # (a,b),(b,a) of 5 bigrams
    assert distinct_n(["a b", "a b"]) == 0.5  # counted over all responses of the policy
    assert distinct_n(["", "one"]) is None  # no bigram at all
    assert distinct_n(["Paris!!"]) == 1.0  # punctuation marks are tokens: (paris, !), (!, !)


@pytest.mark.parametrize("text, loop", [
    ("Paris. Paris. Paris. Paris.", ("paris .", 4)),
    ("!!!!!!!!", ("!", 8)),
    ("Sure, I can help. I can help. I can help. I can help", ("i can help .", 3)),
    ("ha ha ha", None),                     # 3 tokens: a laugh, not a loop
    ("The capital of France is Paris.", None),
    ("very very good, very very good", None),  # twice is not a loop
    ("", None),
])
def test_repetition_loops(text, loop):
    assert repetition_loop(text) == loop


def test_degeneration_counts_responses_with_a_loop():
    d = degeneration(["The answer is 4.", "4 4 4 4 4 4 4", "Yes. Yes. Yes. Yes.", "Fine."])
    assert d["loops"] == 2 and d["loop_share"] == 0.5
    assert 0 < d["distinct_2"] < 1
    assert degeneration([]) == {"distinct_2": None, "loop_share": None, "loops": 0}


def _policy(ppl, scores, **extra):
    return {"perplexity": ppl, "scores": {k: {"mean": v, "n": 8} for k, v in scores.items()},
            "distinct_2": extra.get("d2", 0.8), "loop_share": extra.get("loops", 0.0), "response_tokens_mean": 20.0}


def test_overoptimization_needs_a_perplexity_rise_and_a_score_rise():
    policies = {
        "sft": _policy(10.0, {"format": 0.2, "reward_model": 0.0}),
        "gamed": _policy(13.0, {"format": 0.9, "reward_model": -0.1}, d2=0.3, loops=0.5),  # +30%, format rose
        "forgot": _policy(14.0, {"format": 0.1, "reward_model": -0.5}),  # +40% but no score rose
        "fine": _policy(11.5, {"format": 0.9, "reward_model": 0.4}),    # +15% only
        "edge": _policy(12.0, {"format": 0.9}),                          # exactly +20%: not more than
    }
    flags = overoptimization(policies, "sft", 0.2)
    assert set(flags) == {"gamed"}
    w = flags["gamed"]
    assert w["perplexity_rise"] == pytest.approx(0.3) and set(w["scores_rose"]) == {"format"}
    assert w["distinct_2"] == [0.8, 0.3] and w["loop_share"] == [0.0, 0.5]
    assert set(overoptimization(policies, "sft", 0.1)) == {"gamed", "fine", "edge"}
    assert overoptimization({"sft": _policy(None, {"format": 0.1}), "x": _policy(50.0, {"format": 1.0})}, "sft", 0.2) == {}


# --------------------------------------------------------------------------- the report


def _eval_dir(tmp_path, policies, frontier=True, warnings=None):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    results = {
        "baseline": "sft", "num_prompts": 2, "num_pairs": 2, "reward_model_accuracy": None,
        "sampling": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 1},
        "policies": policies, "compute": {n: {"stage": None, "wall_time_s": None, "peak_memory_mb": None,
                                              "trainable_parameters": None, "trainable_pct": None, "steps": None,
                                              "tokens": None} for n in policies},
        "perplexity_rise": 0.2, "overoptimization": warnings or {},
    }
    if frontier:
        results["frontier"] = frontier_summary(plane_points(policies, "format"), "format", [0.5])
    (eval_dir / "eval.json").write_text(json.dumps(results))
    (eval_dir / "generations.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", **{n: f"answer {i} of {n}" for n in policies}}) + "\n" for i in range(2)))
    return eval_dir


def _report_policy(kl, score, ppl, d2=0.9, loops=0.0):
    return {"kl_mean": kl, "kl_ci95": [kl, kl], "response_tokens_mean": 12.0, "distinct_2": d2, "loop_share": loops,
            "loops": 0, "perplexity": ppl, "implicit_reward_accuracy": None, "implicit_reward_margin": None,
            "scores": {"format": {"mean": score, "n": 2}}}


def test_report_marks_the_frontier_and_flags_over_optimization_next_to_the_samples(tmp_path):
    from align.core.artifacts import RunDir
    from align.evaluation.report import write_report

    policies = {"sft": _report_policy(0.0, 0.2, 10.0), "beta=0.3": _report_policy(0.3, 0.5, 10.5),
                "beta=0.1": _report_policy(0.6, 0.4, 11.0), "beta=0.01": _report_policy(1.5, 0.95, 19.0, d2=0.2, loops=1.0)}
    warnings = overoptimization(policies, "sft", 0.2)
    assert set(warnings) == {"beta=0.01"}
    eval_dir = _eval_dir(tmp_path, policies, warnings=warnings)
    runs = {n: RunDir(tmp_path / "missing" / n) for n in policies}
    written = write_report(eval_dir, runs, None, tmp_path, n_samples=2)
    md = written["markdown"].read_text()
    page = written["html"].read_text()
    assert (tmp_path / "report_plots" / "reward_vs_kl.png").stat().st_size > 1000
    frontier = md[md.index("## Frontier"):md.index("## Compute")]
    assert "| beta=0.1 | 0.600 | 0.400 | no (dominated by beta=0.3) |" in frontier
    assert "| beta=0.01 | 1.500 | 0.950 | yes |" in frontier and "| sft | 0.000 | 0.200 | yes |" in frontier
    assert "| 0.500 | configured | beta=0.3 | 0.500 | 0.300 |" in frontier
    samples = md[md.index("## Samples"):]
    assert samples.index("Over-optimization warnings") < samples.index("| prompt |")
    assert "beta=0.01: held-out perplexity 10.00 -> 19.00 (+90%) while format 0.200 -> 0.950" in samples
    assert "distinct-2 0.900 -> 0.200" in samples
    policy_table = md[md.index("## Policies"):md.index("## Reward vs KL")]
    assert "distinct-2" in policy_table and "WARNING: perplexity +90%" in policy_table
    assert "<h2>Frontier</h2>" in page and "Over-optimization warnings" in page and "dominated by beta=0.3" in page


def test_report_of_an_older_eval_json_computes_the_frontier(tmp_path):
    from align.core.artifacts import RunDir
    from align.evaluation.report import write_report

    policies = {"sft": _report_policy(0.0, 0.2, 10.0), "dpo": _report_policy(0.4, 0.6, 10.1)}
    eval_dir = _eval_dir(tmp_path, policies, frontier=False)
    md = write_report(eval_dir, {n: RunDir(tmp_path / n) for n in policies}, None, tmp_path, 1)["markdown"].read_text()
    assert "## Frontier" in md and "50% quantile of the observed KLs" in md
    assert "Over-optimization warnings" not in md
