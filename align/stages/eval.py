"""Evaluation stage: several policies on the same held-out prompts, then the comparison report.

The policies are adapters of one shared base (align/evaluation/policies.py). For every policy,
with the same sampling seed:
  - responses to the held-out prompts, scored by the reward model and the programmatic judges;
  - win rate against the baseline under each judge (ties count half) with a bootstrap 95% interval;
  - KL(policy || reference) from its own samples; response length;
  - perplexity on held-out SFT data (forgetting), implicit-reward accuracy on held-out pairs;
  - degeneration of its responses (distinct-2, share with a repetition loop).
Then every policy is placed on the reward-vs-KL plane: the Pareto frontier and the run to pick at
each KL budget (align/evaluation/frontier.py), and policies whose perplexity rose while a judge
score rose are flagged as over-optimized (align/evaluation/degeneration.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from align.core.config import SEED, DataConfig, ModelConfig, RunConfig, opt
from align.core.errors import ConfigError
from align.evaluation.harness import LmEvalConfig
from align.evaluation.judges import check_judge_specs
from align.stages.registry import Stage, all_stages, register

log = logging.getLogger("align")

RESULTS = "eval.json"
GENERATIONS = "generations.jsonl"


@dataclass
class EvalSampling:
    max_new_tokens: int = opt(48, "Longest response.", min=1)
    temperature: float = opt(1.0, "Sampling temperature; 1.0 keeps the sample-based KL estimate unbiased.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling.", gt=0, max=1)
    seed: int = opt(1234, "Seed of the sampling: the same prompts and draws for every policy.", **SEED)


@dataclass
class EvalConfig(RunConfig):
    """Evaluation of several policies on held-out prompts, and the comparison report."""

    runs: dict[str, str] = opt({}, "Policies to compare: name -> RunDir (sft, dpo, ppo, ...).", nonempty=True)
    baseline: str = opt("sft", "The policy every other one is compared with (win rates, KL reference).")
    reward_run: str | None = opt(None, "Reward-model RunDir: reward scores and its pairwise accuracy.")
    data: DataConfig = opt(DataConfig, "Held-out preference data: its prompts are generated from, its pairs scored.")
    perplexity_data: str | None = opt(
        "bundled:demo-sft", "SFT data whose held-out split measures each policy's perplexity (forgetting check)."
    )
    num_prompts: int = opt(256, "Held-out prompts generated from (all when fewer).", min=1)
    num_pairs: int = opt(128, "Held-out pairs for the implicit-reward and reward-model accuracies.", min=1)
    perplexity_rows: int = opt(64, "Held-out SFT rows for perplexity (perplexity_data: null skips it).", min=1)
    max_length: int = opt(512, "Longest held-out SFT conversation (tokens) in the perplexity; longer ones are cut.", min=2)
    judges: list[str] = opt(["format"], "Programmatic judges (align.evaluation.judges names or module:function).", nonempty=True)
    dpo_beta: float = opt(0.1, "beta of the implicit reward beta * (log p - log p_ref) when a run does not name one.", gt=0)
    bootstrap: int = opt(2000, "Bootstrap resamples of the prompts for the 95% intervals.", min=1)
    batch_size: int = opt(16, "Sequences per forward pass / generation batch.", min=1)
    sampling: EvalSampling = opt(EvalSampling, "How responses are drawn (fixed for every policy).")
    model: ModelConfig = opt(ModelConfig, "dtype / attention / quantization of the shared base.")
    report_dir: str | None = opt(None, "Where report.md/.html and plots go; default: the folder above output_dir.")
    samples_in_report: int = opt(6, "Prompts shown side by side in the report.", min=0)
    kl_budgets: list[float] | None = opt(
        None, "KL budgets (nats per response) at which the report names the best run (highest score with KL <= "
        "budget); null = the 25/50/75/100% quantiles of the observed KLs.", nonempty=True,
    )
    lm_eval: LmEvalConfig = opt(LmEvalConfig, "lm-evaluation-harness benchmarks of every policy, on the shared base "
                                "already loaded (tasks: [] skips them); the report shows them next to the win rates.")
    perplexity_rise: float = opt(
        0.2, "Over-optimization warning: a policy whose held-out perplexity is more than this fraction above the "
        "baseline's (0.2 = 20%) while a judge or reward-model score rose.", gt=0,
    )

    stage = "eval"

    def validate(self) -> None:
        super().validate()
        if self.baseline not in self.runs:
            raise ConfigError(f"baseline: '{self.baseline}' is not one of runs ({', '.join(self.runs)})")
        if not self.data.path:
            raise ConfigError("data.path: required (held-out preference data)")


# --------------------------------------------------------------------------- the steps


def held_out_inputs(cfg: EvalConfig):
    """The held-out preference splits, the prompts to generate from, the pairs to score, the SFT rows for perplexity."""
    from align.core.data import distinct_prompts, load_splits

    splits = load_splits(cfg.data, "preference", seed=0)
    if not splits.eval:
        raise ConfigError(f"data: '{cfg.data.path}' has no held-out split to evaluate on")
    prompts = distinct_prompts(splits.eval, cfg.num_prompts)
    pairs = splits.eval[: cfg.num_pairs]
    sft_rows = load_splits(DataConfig(path=cfg.perplexity_data), "sft", seed=0).eval[: cfg.perplexity_rows] if cfg.perplexity_data else []
    return splits, prompts, pairs, sft_rows


def sample_policy(policies, name: str, prompts, cfg: EvalConfig):
    """The policy's responses (seeded per batch: every policy draws the same way), their KL to the reference and lengths."""
    import torch

    from align.modeling.generation import Sampling, response_logprobs, sample_tokens

    texts, kls, lengths = [], [], []
    s = cfg.sampling
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        seeded = Sampling(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p, seed=s.seed + start)
        with policies.policy(name):
            drawn = sample_tokens(policies.model, policies.tokenizer, chunk, seeded)
            with torch.no_grad():
                logp = response_logprobs(policies.model, drawn.seq, drawn.attn, drawn.n_resp)
        with policies.reference(), torch.no_grad():
            ref = response_logprobs(policies.model, drawn.seq, drawn.attn, drawn.n_resp)
        kls.extend(((logp - ref) * drawn.mask).sum(1).tolist())
        lengths.extend(drawn.mask.sum(1).tolist())
        texts.extend(drawn.responses)
    return texts, kls, lengths


def implicit_reward_margins(policies, name: str, pairs, batch_size: int) -> list[float]:
    """Per pair: (log p - log p_ref)(chosen) - (log p - log p_ref)(rejected) under the policy."""
    from align.modeling.scoring import completion_logprobs

    prompts = [p["prompt"] for p in pairs]

    def logps(side):
        return completion_logprobs(policies.model, policies.tokenizer, prompts, [p[side] for p in pairs], batch_size)

    with policies.policy(name):
        pol_c, pol_r = logps("chosen"), logps("rejected")
    with policies.reference():
        ref_c, ref_r = logps("chosen"), logps("rejected")
    return [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r)]


def evaluate_policy(policies, name: str, run, prompts, pairs, sft_rows, judges, cfg: EvalConfig):
    """Everything measured for one policy: (results, per-prompt scores by judge, responses)."""
    from align.evaluation.degeneration import degeneration
    from align.evaluation.judges import check_finite_scores
    from align.evaluation.metrics import bootstrap_interval, perplexity
    from align.evaluation.policies import run_beta

    log.info("eval: %s: sampling %d responses, scoring them, perplexity on %d rows, %d pairs", name, len(prompts), len(sft_rows), len(pairs))
    texts, kls, lengths = sample_policy(policies, name, prompts, cfg)
    conversations = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
    scores = {"reward_model": policies.reward_scores(conversations, cfg.batch_size)} if policies.score_head is not None else {}
    for i, judge in enumerate(judges):
        scores[judge.name] = judge.score(prompts, texts)
        check_finite_scores(f"judges[{i}]: judge {judge.name!r}", scores[judge.name], prompts)
    with policies.policy(name):
        ppl = perplexity(policies.model, policies.tokenizer, sft_rows, cfg.max_length, cfg.batch_size)
    margins = implicit_reward_margins(policies, name, pairs, cfg.batch_size)
    record = all_stages().get((run.manifest() or {}).get("stage"))
    beta = run_beta(run, record.beta_key if record else None) or cfg.dpo_beta
    results = {
        "kl_mean": sum(kls) / len(kls),
        "kl_ci95": list(bootstrap_interval(kls, cfg.bootstrap, cfg.sampling.seed)),
        "response_tokens_mean": sum(lengths) / len(lengths),
        **degeneration(texts),
        "perplexity": ppl,
        "implicit_reward_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else None,
        "implicit_reward_margin": beta * sum(margins) / len(margins) if margins else None,
        "scores": {
            k: {"mean": sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v)), "n": sum(x is not None for x in v)}
            for k, v in scores.items() if v is not None
        },
    }
    return results, scores, texts


def write_outputs(stage, cfg: EvalConfig, runs, reward, prompts, results, per_prompt, generations, report) -> Path:
    """eval.json, generations.jsonl, the W&B figures and table, and the report (its path returned)."""
    from align.core.files import atomic_write_json, atomic_write_text
    from align.evaluation.report import write_report

    atomic_write_json(stage.run_dir.path / RESULTS, report)
    lines = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt[-1]["content"]}
        for name in runs:
            row[name] = generations[name][i]
            for judge, values in per_prompt[name].items():
                row[f"{name} {judge}"] = values[i]
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(stage.run_dir.path / GENERATIONS, "\n".join(lines) + "\n")
    flat = {}
    for name, r in results.items():
        flat[f"{name}/kl"] = r["kl_mean"]
        for key in ("distinct_2", "loop_share"):
            if r.get(key) is not None:
                flat[f"{name}/{key}"] = r[key]
        for judge, s in r["scores"].items():
            flat[f"{name}/{judge}"] = s["mean"]
        for judge, w in r.get("win_rate_vs_" + cfg.baseline, {}).items():
            if w:
                flat[f"{name}/win_rate_{judge}"] = w["win_rate"]
    if report.get("lm_eval"):
        from align.evaluation.harness import COLUMNS, flat_metrics

        rows = report["lm_eval"]["rows"]
        flat.update(flat_metrics(rows))
        stage.tracker.log_table("lm_eval", COLUMNS, [[r[c] for c in COLUMNS] for r in rows], step=0)
    stage.tracker.log(flat, step=0)
    shown = prompts[: cfg.samples_in_report * 4]
    stage.tracker.log_samples("generations", ["prompt", *runs], [[p[-1]["content"], *(generations[n][i] for n in runs)] for i, p in enumerate(shown)], step=0)
    report_dir = Path(cfg.report_dir) if cfg.report_dir else stage.run_dir.path.parent
    curves = {name: record.curves for name, record in all_stages().items()}
    written = write_report(stage.run_dir.path, runs, reward, report_dir, cfg.samples_in_report, tracker=stage.tracker, curves=curves)
    log.info("eval: report written to %s", written["markdown"])
    return Path(written["markdown"]).resolve()


def plane(cfg: EvalConfig, results: dict, has_reward_model: bool) -> dict:
    """The reward-vs-KL frontier with the pick at each KL budget, and the over-optimization warnings."""
    from align.evaluation.degeneration import overoptimization
    from align.evaluation.frontier import frontier_summary, plane_points, score_key

    key = score_key(results, has_reward_model)
    frontier = frontier_summary(plane_points(results, key), key, cfg.kl_budgets) if key else None
    return {"frontier": frontier, "perplexity_rise": cfg.perplexity_rise,
            "overoptimization": overoptimization(results, cfg.baseline, cfg.perplexity_rise)}


def run(cfg: EvalConfig, *, force: bool = False):
    from align.core.progress import progress
    from align.core.tracking import is_main_process
    from align.evaluation.harness import score_policies
    from align.evaluation.judges import load_judge
    from align.evaluation.metrics import compute_table, win_rate
    from align.evaluation.policies import check_adapter_types, load_policies, shared_base
    from align.modeling.models import ModelRef
    from align.stages.stage_run import StageRun, finished_parent

    runs = {name: finished_parent(path, key=f"runs.{name}") for name, path in cfg.runs.items()}
    reward = finished_parent(cfg.reward_run, key="reward_run") if cfg.reward_run else None
    splits, prompts, pairs, sft_rows = held_out_inputs(cfg)
    location = shared_base(runs, reward)
    check_adapter_types(runs, reward)
    inputs = {name: (run.manifest() or {}).get("run_id") for name, run in runs.items()}
    inputs["reward"] = (reward.manifest() or {}).get("run_id") if reward else None
    stage = StageRun(cfg, base=ModelRef(location, location, True), splits=splits, force=force, inputs=inputs)
    if not stage.skipped:
        from align.evaluation.report import check_report_dir

        check_report_dir(Path(cfg.report_dir) if cfg.report_dir else stage.run_dir.path.parent)
    if stage.skipped:
        log.info("eval: skipped: the finished evaluation in %s matches its config and runs", stage.run_dir.path)
        return stage.run_dir
    with stage:
        policies = load_policies(runs, reward, cfg.model)
        judges = [load_judge(spec) for spec in cfg.judges]
        results, generations, per_prompt = {}, {}, {}
        for name in progress(runs, desc="evaluating policies"):
            results[name], per_prompt[name], generations[name] = evaluate_policy(
                policies, name, runs[name], prompts, pairs, sft_rows, judges, cfg
            )
        for name in runs:
            results[name]["win_rate_vs_" + cfg.baseline] = {
                judge: win_rate(per_prompt[name][judge], per_prompt[cfg.baseline][judge], cfg.bootstrap, cfg.sampling.seed)
                for judge in per_prompt[name]
            } if name != cfg.baseline else {}
        benchmarks = score_policies(policies, list(runs), cfg.lm_eval) if cfg.lm_eval.tasks else None
        reward_accuracy = None
        if policies.score_head is not None:
            chosen = policies.reward_scores([p["prompt"] + p["chosen"] for p in pairs], cfg.batch_size)
            rejected = policies.reward_scores([p["prompt"] + p["rejected"] for p in pairs], cfg.batch_size)
            reward_accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        report = {
            **plane(cfg, results, policies.score_head is not None),
            "baseline": cfg.baseline,
            "num_prompts": len(prompts),
            "num_pairs": len(pairs),
            "sampling": cfg.sampling.__dict__,
            "reward_model_accuracy": reward_accuracy,
            "policies": results,
            "compute": compute_table(runs, reward),
            "lm_eval": benchmarks,
        }
        outputs = {"results": RESULTS, "generations": GENERATIONS}
        if is_main_process():
            outputs["report"] = str(write_outputs(stage, cfg, runs, reward, prompts, results, per_prompt, generations, report))
        stage.finish(summary={
            "reward_model_accuracy": reward_accuracy, "policies": results,
            "frontier": report["frontier"], "overoptimization": report["overoptimization"],
            "lm_eval": benchmarks["rows"] if benchmarks else None,
        }, outputs=outputs)
    return stage.run_dir


def summary_lines(s: dict) -> list[str]:
    lines = []
    for name, r in (s.get("policies") or {}).items():
        wins = {j: w for key, v in r.items() if key.startswith("win_rate_vs_") for j, w in v.items() if w}
        shown = "; ".join(f"{j} {w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" for j, w in wins.items())
        lines.append(f"  {name}: KL {r['kl_mean']:.3f}" + (f"; win rate {shown}" if shown else " (baseline)"))
    frontier = s.get("frontier")
    if frontier and frontier.get("frontier"):
        lines.append(f"  frontier ({frontier['score']} vs KL): {', '.join(frontier['frontier'])}")
        picks = [f"KL <= {b['kl_budget']:.3g}: {b['pick'] or 'none'}" for b in frontier.get("budgets", [])]
        if picks:
            lines.append("  best run at " + "; ".join(picks))
    for name, w in (s.get("overoptimization") or {}).items():
        lines.append(f"  over-optimization warning: {name}: perplexity +{w['perplexity_rise']:.0%} while "
                     f"{', '.join(w['scores_rose'])} rose")
    for row in s.get("lm_eval") or []:
        stderr = f" +- {row['stderr']:.3g}" if row.get("stderr") is not None else ""
        lines.append(f"  lm-eval {row['model']}: {row['task']} {row['metric']} {row['value']:.4g}{stderr}")
    if s.get("reward_model_accuracy") is not None:
        lines.append(f"  reward model accuracy on held-out pairs: {s['reward_model_accuracy']:.3f}")
    return lines


def check_judges(cfg: EvalConfig) -> None:
    check_judge_specs("judges", cfg.judges)


def check_lm_eval_tasks(cfg: EvalConfig) -> None:
    """The harness is installed and knows every task, before anything loads (only when benchmarks are asked for)."""
    if cfg.lm_eval.tasks:
        from align.evaluation.harness import task_manager

        task_manager(cfg.lm_eval)


register(Stage("eval", EvalConfig, run, summary_lines, checks=(check_judges, check_lm_eval_tasks)))
