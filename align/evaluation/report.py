"""The comparison report: report.md and report.html with PNG plots, from an evaluation RunDir.

Everything comes from files on disk: the evaluation's eval.json and generations.jsonl,
and each policy run's manifest and metrics.jsonl (training curves, the PPO reward/KL
trajectory). Which curves a run gets is its stage record's (the eval stage hands them in).
The same tables and images go to W&B when a tracker is given.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from align.core.artifacts import RunDir

from align.core.files import atomic_write_text
from align.evaluation.degeneration import describe_warning


def _metrics(run: RunDir) -> list[dict]:
    if not run.metrics_path.is_file():
        return []
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines() if line.strip()]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# --------------------------------------------------------------------------- plots


def _plot_reward_vs_kl(results: dict, runs: dict[str, RunDir], path: Path, y_key: str, frontier: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_frontier = set((frontier or {}).get("frontier") or [])
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for name, r in results["policies"].items():
        y = r["scores"].get(y_key, {}).get("mean")
        if y is None:
            continue
        if name in on_frontier:  # a frontier run: a star with a dark edge
            ax.scatter([r["kl_mean"]], [y], s=140, marker="*", edgecolors="black", linewidths=0.8, zorder=4)
        else:
            ax.scatter([r["kl_mean"]], [y], s=50, alpha=0.75, zorder=3)
        flagged = name in (results.get("overoptimization") or {})
        ax.annotate(name + (" (over-optimized?)" if flagged else ""), (r["kl_mean"], y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8, color="#a00" if flagged else "black")
        run = runs.get(name)
        if run is not None and (run.manifest() or {}).get("stage") == "ppo" and y_key == "reward_model":
            curve = [(row["eval/kl"], row["eval/reward"], row["_step"]) for row in _metrics(run) if "eval/kl" in row]
            if len(curve) > 1:
                ax.plot([c[0] for c in curve], [c[1] for c in curve], "--", alpha=0.6, label=f"{name} during training")
    if frontier and len(frontier.get("frontier") or []) > 0:
        pts = [(frontier["runs"][n]["kl"], frontier["runs"][n]["score"]) for n in frontier["frontier"]]
        # The frontier as a step: up to the next frontier run's KL the best reachable score is the last one's.
        xs, ys = [pts[0][0]], [pts[0][1]]
        for kl, score in pts[1:]:
            xs += [kl, kl]
            ys += [ys[-1], score]
        ax.plot(xs, ys, "-", color="black", linewidth=1.2, alpha=0.7, zorder=2, label="Pareto frontier (stars)")
        for b in frontier.get("budgets") or []:
            ax.axvline(b["kl_budget"], color="grey", linestyle=":", linewidth=0.8, zorder=1)
    ax.set_xlabel("KL(policy || reference), nats per response (dotted: KL budgets)")
    ax.set_ylabel("reward-model score" if y_key == "reward_model" else f"{y_key} judge score")
    ax.set_title("Reward vs KL on held-out prompts")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_win_rates(results: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = results["baseline"]
    bars = []
    for name, r in results["policies"].items():
        for judge, w in (r.get(f"win_rate_vs_{baseline}") or {}).items():
            if w:
                bars.append((f"{name}\n{judge}", w["win_rate"], w["ci95"]))
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(bars)), 4))
    xs = range(len(bars))
    heights = [b[1] for b in bars]
    errors = [[b[1] - b[2][0] for b in bars], [b[2][1] - b[1] for b in bars]]
    ax.bar(xs, heights, yerr=errors, capsize=6, color="#4c72b0")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs), [b[0] for b in bars])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {baseline} (ties = 1/2), 95% CI")
    ax.set_title("Win rates on held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def training_curve_panels(stages: dict[str, RunDir], curves: dict[str, Sequence[tuple[str, str]]]) -> list[tuple[str, list]]:
    """(title, [(step, value), ...]) of every (run, curve) with at least two points; `curves`: stage name ->
    (metrics.jsonl key, label), from the stage records."""
    panels = []
    for name, run in stages.items():
        rows = _metrics(run)
        kind = (run.manifest() or {}).get("stage")
        for key, label in curves.get(kind, ()):
            points = [(r["_step"], r[key]) for r in rows if key in r]
            if len(points) > 1:
                panels.append((f"{name}: {label}", points))
    return panels


def _plot_training_curves(stages: dict[str, RunDir], path: Path, curves: dict[str, Sequence[tuple[str, str]]]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = training_curve_panels(stages, curves)
    if not panels:
        return False
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3 * rows_n), squeeze=False)
    for ax, (title, points) in zip(axes.flat, panels):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- tables


def _policy_table(results: dict) -> tuple[list[str], list[list[str]]]:
    baseline = results["baseline"]
    judges = sorted({j for r in results["policies"].values() for j in r["scores"]})
    benchmark_columns, benchmarks = _benchmark_cells(results)
    header = ["policy", *[f"{j} score" for j in judges], *[f"win rate vs {baseline} ({j})" for j in judges], *benchmark_columns,
              "KL to reference", "response tokens", "distinct-2", "responses with a loop", "SFT perplexity",
              "implicit-reward acc.", "over-optimization"]
    rows = []
    for name, r in results["policies"].items():
        wins = r.get(f"win_rate_vs_{baseline}") or {}
        cells = [name]
        cells += [_fmt(r["scores"].get(j, {}).get("mean")) for j in judges]
        for j in judges:
            w = wins.get(j)
            cells.append(f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] ({w['wins']}/{w['ties']}/{w['losses']})" if w else "-")
        cells += [benchmarks.get((name, column), "-") for column in benchmark_columns]
        flagged = (results.get("overoptimization") or {}).get(name)
        cells += [_fmt(r["kl_mean"]), _fmt(r["response_tokens_mean"], 1), _fmt(r.get("distinct_2")), _fmt(r.get("loop_share"), 2),
                  _fmt(r["perplexity"]), _fmt(r["implicit_reward_accuracy"]),
                  f"WARNING: perplexity +{flagged['perplexity_rise']:.0%}" if flagged else "-"]
        rows.append(cells)
    return header, rows


def _benchmark_cells(results: dict) -> tuple[list[str], dict[tuple[str, str], str]]:
    """lm-evaluation-harness columns (`<task> <metric>`) and each policy's cell (value +- stderr)."""
    rows = (results.get("lm_eval") or {}).get("rows") or []
    columns = list(dict.fromkeys(f"{r['task']} {r['metric']}" for r in rows))
    cells = {(r["model"], f"{r['task']} {r['metric']}"): _fmt(r["value"]) + (f" ± {_fmt(r['stderr'])}" if r["stderr"] is not None else "")
             for r in rows}
    return columns, cells


def _frontier_rows(frontier: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The runs on the plane (frontier or dominated by whom) and the pick at each KL budget."""
    score = frontier["score"]
    plane_header = ["run", "KL to reference", f"{score} score", "on the frontier"]
    ordered = sorted(frontier["runs"].items(), key=lambda kv: (kv[1]["kl"], -kv[1]["score"], kv[0]))
    plane_rows = [[name, _fmt(p["kl"]), _fmt(p["score"]), "yes" if p["on_frontier"] else f"no (dominated by {p['dominated_by']})"]
                  for name, p in ordered]
    budget_header = ["KL budget", "chosen as", "pick (best score with KL <= budget)", f"{score} score", "its KL"]
    budget_rows = [[_fmt(b["kl_budget"]), b["basis"], b["pick"] or "none within the budget", _fmt(b["score"]), _fmt(b["kl"])]
                   for b in frontier["budgets"]]
    return plane_header, plane_rows, budget_header, budget_rows


def _compute_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["run", "stage", "wall time (s)", "peak memory (MB)", "trainable params", "trainable %", "steps", "tokens"]
    rows = [
        [name, c["stage"] or "", _fmt(c["wall_time_s"], 0), _fmt(c["peak_memory_mb"], 0),
         f"{c['trainable_parameters']:,}" if c["trainable_parameters"] else "n/a", _fmt(c["trainable_pct"], 2),
         _fmt(c["steps"]), _fmt(c["tokens"], 0)]
        for name, c in results["compute"].items()
    ]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace(chr(10), '<br>')}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- the report


_MD_SIGNATURE = "<!-- report written by align's eval stage; the next evaluation replaces it -->"
_HTML_SIGNATURE = "<title>align report</title>"


def check_report_dir(out_dir: Path) -> None:
    """Refuse, before the evaluation runs, a report folder whose report.md/report.html align did not write."""
    from align.core.errors import ConfigError

    for name, signs in (("report.md", (_MD_SIGNATURE, "# Comparison report:")), ("report.html", (_HTML_SIGNATURE,))):
        path = Path(out_dir) / name
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise ConfigError(f"report_dir: {path} exists and is not a file")
        if path.is_file():
            try:
                head = path.read_text(encoding="utf-8", errors="replace")[:4096]
            except OSError as exc:
                raise ConfigError(f"report_dir: cannot read {path}: {exc}") from None
            if not any(sign in head for sign in signs):
                raise ConfigError(
                    f"report_dir: {path} exists and was not written by align; it is never replaced: set report_dir elsewhere"
                )


@dataclass
class _Report:
    """What report.md, report.html and W&B show: texts, tables (header, rows) and plots."""

    names: list[str]
    intro: str
    rm_line: str
    policies: tuple[list[str], list[list[str]]]
    compute: tuple[list[str], list[list[str]]]
    samples: tuple[list[str], list[list[str]]]
    plots: dict[str, Path]
    frontier_text: str | None = None
    plane: tuple[list[str], list[list[str]]] | None = None
    budgets: tuple[list[str], list[list[str]]] | None = None
    warning_intro: str = ""
    warning_lines: list[str] = field(default_factory=list)


def write_report(eval_dir: Path, runs: dict[str, RunDir], reward: RunDir | None, out_dir: Path, n_samples: int, tracker=None,
                 curves: dict[str, Sequence[tuple[str, str]]] | None = None) -> dict:
    """report.md, report.html and their plots in `out_dir` from an evaluation RunDir (and to W&B with a tracker).

    `curves`: stage name -> (metrics.jsonl key, label) of the training curves its runs get (the stage records').
    """
    results = json.loads((Path(eval_dir) / "eval.json").read_text())
    generations = [json.loads(line) for line in (Path(eval_dir) / "generations.jsonl").read_text().splitlines()]
    out_dir = Path(out_dir)
    frontier = _frontier_of(results)
    plots = _plots(results, runs, reward, out_dir / "report_plots", frontier, curves or {})
    report = _sections(results, generations[:n_samples], frontier, plots)
    _write_markdown(report, frontier is not None, out_dir)
    _write_html(report, frontier is not None, out_dir)
    if tracker is not None and tracker.wandb_run is not None:
        _log_to_wandb(tracker, report)
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "plots": list(plots.values())}


def _frontier_of(results: dict) -> dict | None:
    frontier = results.get("frontier")
    if frontier is None and "frontier" not in results:  # an eval.json from before the frontier existed
        from align.evaluation.frontier import frontier_summary, plane_points, score_key

        key = score_key(results["policies"], results.get("reward_model_accuracy") is not None)
        frontier = frontier_summary(plane_points(results["policies"], key), key) if key else None
    return frontier


def _plots(results: dict, runs: dict[str, RunDir], reward: RunDir | None, plots_dir: Path, frontier: dict | None,
           curves: dict[str, Sequence[tuple[str, str]]]) -> dict[str, Path]:
    plots_dir.mkdir(parents=True, exist_ok=True)
    y_key = frontier["score"] if frontier else "reward_model"
    plots = {}
    _plot_reward_vs_kl(results, runs, plots_dir / "reward_vs_kl.png", y_key, frontier)
    plots["Reward vs KL"] = plots_dir / "reward_vs_kl.png"
    if _plot_win_rates(results, plots_dir / "win_rates.png"):
        plots["Win rates"] = plots_dir / "win_rates.png"
    stages = dict(runs)
    if reward is not None:
        stages["reward"] = reward
    if _plot_training_curves(stages, plots_dir / "training_curves.png", curves):
        plots["Training curves"] = plots_dir / "training_curves.png"
    return plots


def _intro(results: dict) -> str:
    sampling = results["sampling"]
    intro = (
        f"{results['num_prompts']} held-out prompts, responses sampled with temperature {sampling['temperature']}, "
        f"top-p {sampling['top_p']}, up to {sampling['max_new_tokens']} tokens, seed {sampling['seed']} (the same draws "
        f"for every policy). Win rates compare each policy with **{results['baseline']}** prompt by prompt under each "
        "judge (ties count 1/2; wins/ties/losses in brackets), with 95% bootstrap intervals over prompts. KL is "
        "estimated from each policy's own samples against the reference (the SFT model)."
    )
    harness = (results.get("lm_eval") or {}).get("settings")
    if harness:
        shots = "each task's default" if harness["num_fewshot"] is None else harness["num_fewshot"]
        intro += (f" Benchmark columns are lm-evaluation-harness {harness.get('lm_eval')} scores (± standard error), "
                  f"few-shot {shots}, limit {harness['limit'] or 'none'}.")
    return intro


def _sections(results: dict, generations: list[dict], frontier: dict | None, plots: dict[str, Path]) -> _Report:
    names = list(results["policies"])
    rm = results.get("reward_model_accuracy")
    report = _Report(
        names=names, intro=_intro(results),
        rm_line=f"Reward model pairwise accuracy on {results['num_pairs']} held-out pairs: **{rm:.3f}**." if rm is not None else "",
        policies=_policy_table(results), compute=_compute_rows(results),
        samples=(["prompt", *names], [[g["prompt"], *(g.get(n, "") for n in names)] for g in generations]), plots=plots,
        warning_intro=(
            f"Over-optimization warnings (held-out perplexity more than {results.get('perplexity_rise', 0.2):.0%} above "
            f"{results['baseline']}'s while a score rose; read the samples below):"
        ),
        warning_lines=[describe_warning(name, w) for name, w in (results.get("overoptimization") or {}).items()],
    )
    if frontier:
        plane_header, plane_rows, budget_header, budget_rows = _frontier_rows(frontier)
        report.plane, report.budgets = (plane_header, plane_rows), (budget_header, budget_rows)
        left_out = sorted(set(names) - set(frontier["runs"]))
        report.frontier_text = (
            f"Every policy on the plane of its **{frontier['score']}** score against its KL to the reference. A run is on the "
            "Pareto frontier when no other run scores at least as high with at most its KL (and is better in one). "
            "At each KL budget the pick is the highest-scoring run whose KL is within the budget. KL is a sample-based "
            "estimate: values slightly below 0 are noise around a policy that stays at the reference."
            + (f" Not placed (no {frontier['score']} score): {', '.join(left_out)}." if left_out else "")
        )
    return report


def _write_markdown(r: _Report, has_frontier: bool, out_dir: Path) -> None:
    md = [_MD_SIGNATURE, f"# Comparison report: {', '.join(r.names)}", "", r.intro, "", r.rm_line, "", "## Policies", "",
          _md_table(*r.policies), ""]
    for title, path in r.plots.items():
        md += [f"## {title}", "", f"![{title}]({path.relative_to(out_dir)})", ""]
    if has_frontier:
        md += ["## Frontier", "", r.frontier_text, "", _md_table(*r.plane), "", _md_table(*r.budgets), ""]
    md += ["## Compute", "", _md_table(*r.compute), "", "## Samples", ""]
    if r.warning_lines:
        md += [f"**{r.warning_intro}**", "", *[f"- {line}" for line in r.warning_lines], ""]
    md += [_md_table(*r.samples), ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))


def _write_html(r: _Report, has_frontier: bool, out_dir: Path) -> None:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;font-size:14px}th{background:#f3f3f3}img{max-width:100%}.warning{color:#a00}")
    body = [f"<h1>Comparison report: {html.escape(', '.join(r.names))}</h1>",
            f"<p>{html.escape(r.intro).replace('**', '')}</p>", f"<p>{html.escape(r.rm_line).replace('**', '')}</p>",
            "<h2>Policies</h2>", _html_table(*r.policies)]
    for title, path in r.plots.items():
        body += [f"<h2>{html.escape(title)}</h2>", f'<img src="{path.relative_to(out_dir)}" alt="{html.escape(title)}">']
    if has_frontier:
        body += ["<h2>Frontier</h2>", f"<p>{html.escape(r.frontier_text).replace('**', '')}</p>",
                 _html_table(*r.plane), _html_table(*r.budgets)]
    body += ["<h2>Compute</h2>", _html_table(*r.compute), "<h2>Samples</h2>"]
    if r.warning_lines:
        body += [f"<p class='warning'><b>{html.escape(r.warning_intro)}</b></p><ul class='warning'>"
                 + "".join(f"<li>{html.escape(line)}</li>" for line in r.warning_lines) + "</ul>"]
    body += [_html_table(*r.samples)]
    atomic_write_text(out_dir / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>align report</title>"
                      f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _log_to_wandb(tracker, r: _Report) -> None:
    import wandb

    tracker.wandb_run.log({
        "report/policies": wandb.Table(columns=r.policies[0], data=r.policies[1]),
        "report/compute": wandb.Table(columns=r.compute[0], data=r.compute[1]),
        "report/samples": wandb.Table(columns=r.samples[0], data=r.samples[1]),
        **({"report/frontier": wandb.Table(columns=r.budgets[0], data=r.budgets[1])} if r.budgets else {}),
        **{f"report/{title}": wandb.Image(str(path)) for title, path in r.plots.items()},
    })
