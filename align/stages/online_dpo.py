"""Online (iterative) DPO stage: rounds of sample -> score -> pair -> DPO, with a LoRA policy on one base.

Round n samples `online.num_samples` responses per prompt from the policy as round n-1 left it
(round 1: the fresh adapter, which is the SFT model), scores them with the reward sources
(judges and reward-model adapters on the same base, align/rlhf/rewards.py), pairs them per prompt
with the pairing and cleaning `align-data generate` uses (align/core/pairing.py), and trains the
same adapter on those pairs with the DPO stage's trainer (align/preference/dpo_setup.py: TRL's DPOTrainer
with the fast path). The reference stays the SFT model (the base with adapters disabled) in every
round. Each round's samples, scores and pairs are kept in rounds/round-<n>/; a checkpoint after a
round holds the adapter, and --resume continues with the next round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from align.core.config import opt
from align.core.pairing import STRATEGIES
from align.preference import dpo_options as options
from align.preference.dpo_options import DPOOptions
from align.modeling.methods import LORA_FAMILY, resolve_method
from align.rlhf.options import ONLINE_WHY_LORA, OnlineStageConfig, check_keep_best, check_sources
from align.stages.registry import Curve, Stage, fmt, register, training_checks

log = logging.getLogger("align")


@dataclass
class OnlineOptions:
    rounds: int = opt(3, "Rounds of sample -> score -> pair -> DPO; round n samples from the policy round n-1 trained.", min=1)
    prompts_per_round: int | None = opt(
        None, "Training prompts sampled per round (a fresh seeded order per pass over them); null = all of them.", min=1
    )
    num_samples: int = opt(4, "Responses sampled per prompt and round, K (at least 2 to make a pair).", min=2)
    max_new_tokens: int = opt(48, "Longest sampled response.", min=1)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling.", gt=0, max=1)
    generation_batch_size: int = opt(16, "Prompts per generation batch, each with its K samples.", min=1)
    pairing: Literal[STRATEGIES] = opt(  # type: ignore[valid-type]
        "best-vs-worst",
        "How a prompt's scored samples become pairs: best-vs-worst (one pair), best-vs-each, all-pairs; ties are never pairs.",
    )
    min_margin: float = opt(0.0, "Smallest chosen - rejected total reward of a pair (pairs need a strictly higher chosen anyway).", min=0)
    eval_prompts: int = opt(16, "Held-out prompts sampled once each for the held-out reward and KL (0 disables).", min=0)
    keep_best_within_kl: float | None = opt(
        None,
        "Keep as the run's adapter/ the adapter of the held-out evaluation (before round 1, every train.eval_steps rounds, "
        "and after the last) with the highest held-out reward whose held-out KL to the reference is at most this budget; "
        "the last adapter stays in the checkpoint of the last round (align/rlhf/keep_best.py). null: the last adapter.",
        gt=0,
    )


@dataclass
class OnlineDPOConfig(OnlineStageConfig):
    """Online DPO: each round pairs the policy's own samples by reward and trains DPO on them; the reference stays the SFT model."""

    online: OnlineOptions = opt(
        OnlineOptions,
        "Rounds and sampling. In this stage train.epochs / train.max_steps apply per round (over that round's pairs), "
        "train.save_steps and train.eval_steps count rounds.",
    )
    dpo: DPOOptions = opt(DPOOptions, "DPO options of each round's training (as in the DPO stage).")

    stage = "online_dpo"

    def validate(self) -> None:
        super().validate()
        options.check(self.dpo)
        check_keep_best(self.online.keep_best_within_kl, self.online.eval_prompts, "online")


def train_round(stage, cfg: OnlineDPOConfig, model, tokenizer, pairs: list[dict], step_offset: int, interrupt, timer, callbacks) -> dict:
    """DPO on one round's pairs, continuing the adapter; returns the round's training figures."""
    import shutil

    from datasets import Dataset

    from align.core.checkpoints import latest_complete
    from align.core.safeguards import NonFiniteGuard, NonFiniteWeightsGuard
    from align.preference.dpo_setup import dpo_trainer, fast_path_summary, pair_converter
    from align.modeling.lora_plus import use_param_groups
    from align.rlhf.rounds import restored_forward, stop_on_signal
    from align.core.callbacks import TrackerCallback
    from align.core.examples import convert_rows
    from align.modeling.train_setup import trainer_kwargs

    kept, truncated, dropped = convert_rows(pairs, pair_converter(tokenizer, cfg.train.max_length))
    figures = {"online/pairs_truncated": truncated, "online/pairs_dropped_max_length": dropped, "online/dpo_steps": 0}
    if not kept:
        return figures
    device = str(next(model.parameters()).device)
    scratch = stage.run_dir.path / ".round-trainer"  # the HF trainer's own folder; rounds are checkpointed whole instead
    base_args = trainer_kwargs(cfg, stage.run_dir, device, has_eval=False, model=model.get_base_model(), rows_per_example=2)
    base_args.update(output_dir=str(scratch), save_strategy="no")
    last_checkpoint = lambda: latest_complete(stage.run_dir.path)  # noqa: E731
    guards = [TrackerCallback(stage.tracker, stage, step_offset), NonFiniteGuard(last_checkpoint),
              NonFiniteWeightsGuard(last_checkpoint, step_offset), stop_on_signal(interrupt), timer]
    try:
        with restored_forward(model.get_base_model()):
            trainer = dpo_trainer(cfg, model, tokenizer, Dataset.from_list(kept), None, base_args, [*guards, *callbacks])
            use_param_groups(trainer, cfg)  # LoRA+
            result = trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures.update({"online/dpo_steps": trainer.state.global_step, "online/dpo_loss": result.training_loss})
    figures["fast_path"] = fast_path_summary(trainer)
    return figures


def run(cfg: OnlineDPOConfig, *, force: bool = False, callbacks=()):
    from align.stages.online_run import open_online_stage

    stage, runs = open_online_stage(cfg, force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        _rounds(stage, cfg, runs, callbacks)
    return stage.run_dir


def _policy(stage, cfg: OnlineDPOConfig, runs):
    """(tokenizer, the base with the policy as PEFT's "default" adapter and the reward adapters, rewards, engine)."""
    from transformers import set_seed

    from align.modeling import models
    from align.modeling.adapters import attach_adapter
    from align.rlhf import loop
    from align.rlhf.rewards import Rewards, answers_of
    from align.rlhf.rollout import LocalRollout

    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    base_model = models.load_model(stage.base, cfg.model)
    # The policy is PEFT's "default" adapter: TRL's DPOTrainer trains that one.
    model = attach_adapter(base_model, cfg, loop.DEFAULT_ADAPTER, base_location=stage.base.location)
    rewards = Rewards(cfg.rewards, model=model, tokenizer=tokenizer, runs=runs, answers=answers_of(stage.splits.train + stage.splits.eval))
    model.set_adapter(loop.DEFAULT_ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(f".{loop.DEFAULT_ADAPTER}." in name)
    return tokenizer, model, rewards, LocalRollout(model, tokenizer, lambda: model.set_adapter(loop.DEFAULT_ADAPTER))


def _rounds(stage, cfg: OnlineDPOConfig, runs, callbacks) -> None:
    import torch

    from align.core.data import distinct_prompts
    from align.core.safeguards import InterruptCallback, Interrupted, check_finite, oom_advice
    from align.core.checkpoints import latest_complete
    from align.core.errors import AlignError
    from align.modeling import models
    from align.rlhf import loop
    from align.rlhf.keep_best import KeepBest, adapter_weights
    from align.rlhf.rounds import pairs_of, sample_round, sampling_for, write_round
    from align.rlhf.ppo import batch_prompts
    from align.rlhf.distributed import world
    from align.rlhf.rewards import UnscoredWatch, held_out_metrics
    from align.core.callbacks import StepTimer

    o, t = cfg.online, cfg.train
    tokenizer, model, rewards, engine = _policy(stage, cfg, runs)
    ranks = world()
    counts = models.count_parameters(model)
    keep = KeepBest(o.keep_best_within_kl, "eval/reward/total", unit="round")
    done_rounds, step, pairs_so_far = 0, 0, 0
    if stage.resume_from is not None:
        state = loop.load_checkpoint(stage.resume_from, model, [loop.DEFAULT_ADAPTER])
        done_rounds, step, pairs_so_far = state["round"], state["step"], state["pairs"]
        keep.load(stage.resume_from)
    prompts = [r["prompt"] for r in stage.splits.train]
    per_round = o.prompts_per_round or len(prompts)
    eval_prompts = distinct_prompts(stage.splits.eval, o.eval_prompts) if o.eval_prompts else []

    def evaluate(round_no: int) -> dict:
        if not eval_prompts:
            return {}
        metrics = held_out_metrics(model, tokenizer, rewards, eval_prompts, sampling_for(o, t.seed), t.seed)
        keep.offer(round_no, metrics, lambda: adapter_weights(model, loop.DEFAULT_ADAPTER))
        return metrics

    def save(round_no: int):
        check_finite(model, f"after round {round_no} (step {step})", lambda: latest_complete(stage.run_dir.path))
        state = {"round": round_no, "pairs": totals["pairs"]}
        return loop.save_checkpoint(stage.run_dir.path, step, model, [loop.DEFAULT_ADAPTER], None, None, state, t.save_total_limit,
                                    extra=keep.save)

    interrupt, timer = InterruptCallback(), StepTimer()
    interrupt.install()
    totals = {"pairs": pairs_so_far}
    watch = UnscoredWatch("online_dpo", cfg.unscored_warning, scored_before=pairs_so_far > 0)
    fast_path = None
    try:
        if done_rounds == 0:
            stage.tracker.log(evaluate(0), step=0)
        for r in range(done_rounds + 1, o.rounds + 1):
            round_prompts = batch_prompts(prompts, r - 1, per_round, t.seed) if o.prompts_per_round else prompts
            samples = sample_round(engine, rewards, round_prompts, o, seed=t.seed, round_no=r)  # every rank: the whole round
            pairs, outcome = pairs_of(samples, o.pairing, o.min_margin, r)
            if ranks.main:
                write_round(stage.run_dir.path, r, samples, pairs)
            metrics = {"online/round": r, "online/prompts": len(round_prompts), "online/pairs": len(pairs),
                       **{f"online/unpaired/{k}": v for k, v in outcome.items()}, **samples.scores.metrics("online/reward")}
            watch.observe(metrics["online/reward/unscored"], len(samples.scores.total), f"round {r}")
            if not pairs:
                log.warning("online_dpo round %d: no pairs (every prompt's samples tied or were unscored); the adapter is unchanged", r)
            if ranks.any(bool(interrupt.signal_name)):  # caught while sampling: the policy is still round r-1's
                interrupt.signal_name = interrupt.signal_name or "SIGTERM"
                raise Interrupted(f"{interrupt.signal_name} before round {r} trained; checkpoint saved in {save(r - 1)}; "
                                  "continue with --resume (resume=true)", exit_code=interrupt.exit_code)
            figures = train_round(stage, cfg, model, tokenizer, pairs, step, interrupt, timer, callbacks) if pairs else {}
            fast_path = figures.pop("fast_path", fast_path)
            if ranks.any(bool(interrupt.signal_name)):
                interrupt.signal_name = interrupt.signal_name or "SIGTERM"
                checkpoint = latest_complete(stage.run_dir.path)
                where = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved (train.save_steps)"
                raise Interrupted(f"{interrupt.signal_name} during round {r}; its training is lost; {where}; "
                                  "continue with --resume (resume=true), which repeats that round", exit_code=interrupt.exit_code)
            step += figures.get("online/dpo_steps", 0)
            totals["pairs"] += len(pairs)
            metrics.update(figures)
            if (t.eval_steps and r % t.eval_steps == 0) or r == o.rounds:
                metrics.update(evaluate(r))
            if ranks.main:
                log.info("online_dpo round %d: %d pairs from %d prompts, sampled reward %.3f, %d DPO steps", r, len(pairs),
                         len(round_prompts), metrics["online/reward/total"], figures.get("online/dpo_steps", 0))
            stage.tracker.log(metrics, step=step)
            if t.save_steps and r % t.save_steps == 0:
                save(r)
        final = metrics if done_rounds < o.rounds else evaluate(o.rounds)
    except torch.cuda.OutOfMemoryError as exc:
        raise AlignError(oom_advice(cfg, step + 1)) from exc
    finally:
        interrupt.uninstall()
    watch.finish()
    model.set_adapter(loop.DEFAULT_ADAPTER)
    check_finite(model, f"after round {o.rounds} (step {step})", lambda: latest_complete(stage.run_dir.path))
    _finish(stage, cfg, model, tokenizer, {"counts": counts, "final": final, "pairs": totals["pairs"], "steps": step,
                                           "timer": timer, "fast_path": fast_path}, keep, lambda: save(o.rounds))


def _finish(stage, cfg: OnlineDPOConfig, model, tokenizer, run: dict, keep, save_last) -> None:
    """The kept adapter (keep_best_within_kl) or the last one as adapter/, samples, summary. `run`: the rounds' figures."""
    from align.core.artifacts import ADAPTER
    from align.core.checkpoints import CHECKPOINTS
    from align.modeling.adapters import adapter_bytes
    from align.rlhf import loop
    from align.rlhf.distributed import world
    from align.rlhf.keep_best import keep_last_then_restore
    from align.stages.samples import log_sample_table

    o, counts, final, step = cfg.online, run["counts"], run["final"], run["steps"]
    keep_last_then_restore(keep, stage.run_dir.path / CHECKPOINTS / f"checkpoint-{step}", save_last, model, loop.DEFAULT_ADAPTER)
    target = stage.run_dir.path / ADAPTER
    if world().main:
        loop.save_standard_adapter(model, loop.DEFAULT_ADAPTER, target)
        stage.tracker.log_artifact(target, name="online_dpo-adapter", type="model", metadata={"stage": "online_dpo", "base_model": stage.base.name})
        counts["adapter_bytes"] = adapter_bytes(target)
    before = loop.logged_at_step(stage.run_dir, 0)
    model.set_adapter(loop.DEFAULT_ADAPTER)
    sampled = log_sample_table(stage, model, tokenizer, "reference", step=step)
    fast_path = run["fast_path"]
    summary = {
        "rounds": o.rounds,
        "pairs": run["pairs"],
        "steps": step,
        "seconds_per_step": run["timer"].seconds_per_step(),
        "eval_reward_before": before.get("eval/reward/total"),
        "eval_reward_after": final.get("eval/reward/total"),
        "eval_kl_after": final.get("eval/kl"),
        "parameters": counts,
        **keep.summary(),
        "samples": sampled.get("rows", []),
        **({"dpo_fast_path": fast_path} if fast_path else {}),
        **({"judge": sampled["judge"]} if "judge" in sampled else {}),
    }
    stage.finish(summary=summary, outputs={"adapter": ADAPTER, "rounds": "rounds", "samples": "samples.jsonl"})


def summary_lines(s: dict) -> list[str]:
    from align.rlhf.keep_best import kept_line

    return [
        f"  {s.get('rounds')} rounds, {s.get('pairs')} on-policy pairs, {s.get('steps')} DPO steps; held-out reward "
        f"{fmt(s.get('eval_reward_before'))} (round 0) -> {fmt(s.get('eval_reward_after'))}, KL to reference {fmt(s.get('eval_kl_after'))}"
    ] + kept_line(s)


register(Stage(
    "online_dpo", OnlineDPOConfig, run, summary_lines,
    checks=(*training_checks(LORA_FAMILY, ONLINE_WHY_LORA), lambda cfg: check_sources(cfg.rewards)), resolve=resolve_method,
    kl_knob="dpo.beta", beta_key="dpo.beta",
    curves=(Curve("online/reward/total", "sampled reward"), Curve("online/dpo_loss", "DPO loss")),
))
