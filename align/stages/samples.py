"""The sample table at the end of a stage: greedy generations on held-out prompts before and after
training, scored by `samples.judge` when one is set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from align.core.data import Splits, distinct_prompts
from align.core.tracking import is_main_process

if TYPE_CHECKING:
    from align.stages.stage_run import StageRun


def held_out_prompts(splits: Splits, n: int) -> list[list[dict]]:
    """The first n distinct held-out prompts (preference prompts, or SFT turns before the last answer).

    None without held-out data: training prompts would flatter the model.
    """
    return distinct_prompts(splits.eval, n)


def _sample_prompts(stage: StageRun) -> list[list[dict]]:
    samples = stage.cfg.samples
    if not is_main_process():  # generation involves no other rank; only the main one reports it
        return []
    return held_out_prompts(stage.splits, samples.num_prompts) if samples.num_prompts > 0 else []


def reference_generations(stage: StageRun, model, tokenizer) -> list[str]:
    """Greedy generations of the sample prompts from `model` as it is now (before training)."""
    from align.modeling.generation import generate

    return generate(model, tokenizer, _sample_prompts(stage), stage.cfg.samples.max_new_tokens)


def log_sample_table(stage: StageRun, model, tokenizer, before_label: str, step: int, before: list[str] | None = None) -> dict[str, Any]:
    """Greedy generations on held-out prompts with the adapter off (before) and on (after).

    `before`: generations taken before training (full fine-tuning, which has no adapter to switch off).
    Returns the rows and, when `samples.judge` is set, the judge's mean score before and after.
    """
    from align.modeling.generation import generate

    samples = stage.cfg.samples
    prompts = _sample_prompts(stage)
    if not prompts:
        return {}
    if before is None:
        with model.disable_adapter():
            before = generate(model, tokenizer, prompts, samples.max_new_tokens)
    after = generate(model, tokenizer, prompts, samples.max_new_tokens)
    columns = ["prompt", before_label, stage.stage]
    rows = [[p[-1]["content"], b, a] for p, b, a in zip(prompts, before, after)]
    out: dict[str, Any] = {}
    if samples.judge:
        from align.evaluation.judges import check_finite_scores, load_judge

        judge = load_judge(samples.judge)
        scores_before, scores_after = judge.score(prompts, before), judge.score(prompts, after)
        for scores in (scores_before, scores_after):
            check_finite_scores(f"samples.judge: judge {judge.name!r}", scores, prompts)
        columns += [f"{judge.name} ({before_label})", f"{judge.name} ({stage.stage})"]
        rows = [r + [sb, sa] for r, sb, sa in zip(rows, scores_before, scores_after)]
        applied = [(b, a) for b, a in zip(scores_before, scores_after) if b is not None and a is not None]
        if applied:
            out["judge"] = {
                "name": judge.name,
                "n": len(applied),
                "before_label": before_label,
                "before": sum(b for b, _ in applied) / len(applied),
                "after": sum(a for _, a in applied) / len(applied),
            }
            stage.tracker.log(
                {f"judge/{judge.name}/{before_label}": out["judge"]["before"], f"judge/{judge.name}/{stage.stage}": out["judge"]["after"]},
                step=step,
            )
    stage.tracker.log_samples("samples", columns, rows, step=step)
    out["rows"] = [dict(zip(columns, r)) for r in rows]
    return out


def finish_with_samples(stage: "StageRun", model, tokenizer, summary: dict, outputs: dict[str, str], step: int) -> None:
    """An own-loop stage's end: the sample table (adapter off, then on) and its judge's means into the summary, then
    the run marked finished with its outputs and samples.jsonl."""
    sampled = log_sample_table(stage, model, tokenizer, "reference", step=step)
    summary["samples"] = sampled.get("rows", [])
    if "judge" in sampled:
        summary["judge"] = sampled["judge"]
    stage.finish(summary=summary, outputs={**outputs, "samples": "samples.jsonl"})
