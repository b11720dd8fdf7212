"""PPO stage: RLHF with LoRA adapters on one frozen base (the merged SFT model).

The policy and value are trainable LoRA adapters, the reward is the reward run's frozen
adapter and score head, and the reference is the base with adapters disabled: one copy of
the model in memory. The model side and one PPO step live in align/rlhf/ppo.py, the math in
align/rlhf/losses.py; this module runs the steps, checkpoints them and writes the RunDir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from align.core.config import ChildStageConfig, opt
from align.core.errors import ConfigError
from align.modeling.methods import LORA_FAMILY, resolve_method
from align.rlhf.options import KEEP_BEST_HELP
from align.stages.registry import Curve, Stage, fmt, register, training_checks

log = logging.getLogger("align")


@dataclass
class PPOOptions:
    rollout_batch_size: int = opt(16, "Prompts sampled per PPO step (one rollout batch).", min=1)
    minibatch_size: int = opt(8, "Responses per optimization minibatch; a rollout batch is split into these.", min=1)
    ppo_epochs: int = opt(2, "Passes over each rollout batch.", min=1)
    max_new_tokens: int = opt(32, "Longest sampled response.", min=1)
    temperature: float = opt(1.0, "Sampling temperature of rollouts.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling of rollouts.", gt=0, max=1)
    kl_coef: float = opt(0.05, "Weight of the per-token KL penalty to the reference (initial value when adaptive).", min=0)
    kl_estimator: Literal["k1", "k3"] = opt("k1", "Per-token KL estimate: k1 = log p - log q, k3 = (q/p - 1) - log(q/p).")
    target_kl: float | None = opt(None, "Adapt kl_coef towards this KL per response (null: fixed kl_coef).", gt=0)
    kl_horizon: int = opt(10000, "Responses over which the adaptive KL controller reacts.", min=1)
    gamma: float = opt(1.0, "Discount of GAE.", min=0, max=1)
    lam: float = opt(0.95, "Lambda of GAE.", min=0, max=1)
    clip_range: float = opt(0.2, "Clip of the policy ratio.", gt=0)
    clip_range_value: float = opt(0.2, "Clip of the value update around the rollout values.", gt=0)
    vf_coef: float = opt(0.1, "Weight of the value loss.", gt=0)
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus.", min=0)
    whiten_advantages: bool = opt(True, "Normalize advantages per rollout batch.")
    normalize_rewards: bool = opt(True, "Normalize scores with the reward run's mean and std.")
    reward_clip: float | None = opt(5.0, "Clip (normalized) scores to +-this value (null: no clip).", gt=0)
    missing_eos_penalty: float | None = opt(
        1.0, "Subtracted from the score of a response that hit max_new_tokens without EOS (null: none).", min=0
    )
    value_head_init_std: float = opt(0.0, "Std of the value head's initial weights (0: start at 0).", min=0)
    keep_best_within_kl: float | None = opt(None, KEEP_BEST_HELP, gt=0)


@dataclass
class PPOConfig(ChildStageConfig):
    """PPO against a trained reward model, with policy, value and reward as adapters of one base."""

    reward_run: str | None = opt(None, "Reward-model RunDir whose adapter and score head are the reward.")
    ppo: PPOOptions = opt(PPOOptions, "PPO options (train.max_steps counts PPO steps: rollout + update).")

    stage = "ppo"

    def validate(self) -> None:
        super().validate()
        if not self.reward_run:
            raise ConfigError("reward_run: required (the reward-model RunDir)")
        if self.train.liger_kernel:
            raise ConfigError("train.liger_kernel: applies to the TRL trainers (sft, dpo, reward); PPO runs its own loop")
        p = self.ppo
        if p.rollout_batch_size % p.minibatch_size:
            raise ConfigError(
                f"ppo.minibatch_size: must divide ppo.rollout_batch_size ({p.minibatch_size} does not divide "
                f"{p.rollout_batch_size})"
            )
        if not self.train.max_steps:
            raise ConfigError("train.max_steps: required for PPO (the number of rollout + update steps)")


def optimizer_and_schedule(cfg: PPOConfig, params, model=None):
    """AdamW over the trainable parameters (LoRA+ groups with lora.plus_ratio), with the learning-rate schedule
    counted in optimizer updates."""
    import torch
    from transformers import get_scheduler

    from align.modeling.lora_plus import optimizer_groups

    optimizer = torch.optim.AdamW(optimizer_groups(cfg, params, model), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    updates = cfg.train.max_steps * cfg.ppo.ppo_epochs * (cfg.ppo.rollout_batch_size // cfg.ppo.minibatch_size)
    updates //= cfg.train.gradient_accumulation_steps
    scheduler = get_scheduler(
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * updates), num_training_steps=updates
    )
    return optimizer, scheduler


def train_steps(stage, pvr, cfg: PPOConfig, optimizer, scheduler, kl_ctl, stats, start: int, eval_prompts, keep) -> dict:
    """PPO steps start..max_steps through the RL step loop (align/rlhf/loop.py); the final evaluation.
    `keep` (keep_best.KeepBest) sees every evaluation; with a budget, the kept policy adapter is loaded at the end."""
    from align.rlhf import ppo as rl
    from align.core.checkpoints import CHECKPOINTS
    from align.rlhf.keep_best import adapter_weights, keep_last_then_restore
    from align.rlhf.loop import run_steps

    prompts = [r["prompt"] for r in stage.splits.train]

    def step(i: int) -> dict:
        batch = rl.batch_prompts(prompts, i, cfg.ppo.rollout_batch_size, cfg.train.seed)
        metrics = rl.ppo_step(pvr, cfg, batch, optimizer, scheduler, kl_ctl.value, stats, step=i)
        kl_ctl.update(metrics["ppo/kl"], len(batch))
        return metrics

    def save(done: int):
        finite(pvr, f"after step {done}", stage)
        return rl.save_checkpoint(stage.run_dir.path, done, pvr, optimizer, scheduler, kl_ctl.value, cfg.train.save_total_limit,
                                  extra=keep.save)

    def evaluate() -> dict:
        finite(pvr, f"after step {stage.step or 0}", stage)
        return rl.held_out_reward_and_kl(pvr, eval_prompts, cfg, cfg.train.seed)

    final = run_steps(
        stage, cfg, start=start, total=cfg.train.max_steps, step_fn=step, save_fn=save,
        eval_fn=evaluate if eval_prompts else None, desc="ppo",
        describe=lambda done, m: f"reward {m['ppo/reward_raw']:.3f}, kl {m['ppo/kl']:.3f}, eos {m['ppo/eos_share']:.2f}",
        on_eval=lambda done, metrics: keep.offer(done, metrics, lambda: adapter_weights(pvr.model, "policy")),
    )
    finite(pvr, f"after step {cfg.train.max_steps}", stage)
    last = stage.run_dir.path / CHECKPOINTS / f"checkpoint-{cfg.train.max_steps}"
    keep_last_then_restore(keep, last, lambda: save(cfg.train.max_steps), pvr.model, "policy")
    return final


def finite(pvr, when: str, stage) -> None:
    """The policy and value adapters (and the value head) hold finite weights: checked before every checkpoint,
    evaluation and the final save, so nothing non-finite is kept."""
    from align.core.checkpoints import latest_complete
    from align.core.safeguards import NonFiniteWeightsError, check_finite

    last = lambda: latest_complete(stage.run_dir.path)  # noqa: E731
    pvr.use("policy")
    check_finite(pvr.model, when, last)
    for name, param in pvr.value_head.named_parameters():
        if not param.isfinite().all():
            raise NonFiniteWeightsError(f"non-finite weights {when} (first in value_head.{name}); lower train.learning_rate")


def save_final(stage, pvr):
    """The policy adapter as a standard PEFT adapter (adapter/); the value adapter and head (value/)."""
    from align.core.artifacts import ADAPTER
    from align.core.tracking import is_main_process
    from align.rlhf.loop import save_standard_adapter
    from align.rlhf.ppo import VALUE

    target = stage.run_dir.path / ADAPTER
    if not is_main_process():
        return target
    save_standard_adapter(pvr.model, "policy", target)
    save_standard_adapter(pvr.model, "value", stage.run_dir.path / VALUE, modules={"value_head": pvr.value_head})
    stage.tracker.log_artifact(target, name="ppo-adapter", type="model", metadata={"stage": "ppo", "base_model": stage.base.name})
    return target


def run(cfg: PPOConfig, *, force: bool = False, callbacks=()):
    from align.core.artifacts import ADAPTER
    from align.core.errors import DataError
    from align.modeling import models
    from align.rlhf import losses as P
    from align.rlhf import ppo as rl
    from align.rlhf.distributed import launched_size
    from align.rlhf.keep_best import KeepBest
    from align.rlhf.loop import notify_train_end
    from align.modeling.scoring import check_reward_files, read_stats
    from align.stages.online_run import check_prompts_fit, join_processes
    from align.stages.samples import log_sample_table
    from align.stages.stage_run import finished_parent, open_stage

    rl.check_processes(cfg, launched_size())
    reward_run = finished_parent(cfg.reward_run, key="reward_run")
    if (reward_run.manifest() or {}).get("stage") != "reward":
        raise DataError(f"reward_run: {reward_run.path} is not a reward-model run")
    check_reward_files(reward_run, "reward_run", need_stats=True, stats_hint="rerun the reward stage")
    stage = open_stage(cfg, "prompt", force, inputs={"reward_run": (reward_run.manifest() or {}).get("run_id")})
    join_processes(stage)
    base, splits = stage.base, stage.splits
    if stage.skipped:
        return stage.run_dir
    check_prompts_fit(stage)
    with stage:
        from transformers import set_seed

        set_seed(cfg.train.seed)
        tokenizer = models.load_tokenizer(base, cfg.model)
        pvr = rl.PolicyValueReward(cfg, base, reward_run, tokenizer)
        params = pvr.trainable_parameters()
        counts = models.count_parameters(pvr.model)
        counts["trainable"] = sum(p.numel() for p in params)
        log.info("ppo: %s trainable (policy + value adapters, value head) of %s parameters", f"{counts['trainable']:,}", f"{counts['total']:,}")
        optimizer, scheduler = optimizer_and_schedule(cfg, params, pvr.model)
        stats = read_stats(reward_run)
        kl_ctl = P.AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon)
        keep = KeepBest(cfg.ppo.keep_best_within_kl, "eval/reward")
        start = 0
        if stage.resume_from is not None:
            start, kl_ctl.value = rl.load_checkpoint(stage.resume_from, pvr, optimizer, scheduler)
            keep.load(stage.resume_from)
        eval_prompts = [r["prompt"] for r in splits.eval][: max(cfg.samples.num_prompts, 8)]
        if keep.active and not eval_prompts:
            raise DataError(f"ppo.keep_best_within_kl: needs held-out prompts; data '{splits.source}' has no held-out rows")
        final = train_steps(stage, pvr, cfg, optimizer, scheduler, kl_ctl, stats, start, eval_prompts, keep)
        notify_train_end(callbacks, pvr.model)
        save_final(stage, pvr)
        pvr.use("policy")
        sampled = log_sample_table(stage, pvr.model, tokenizer, "reference", step=cfg.train.max_steps)
        summary = {
            "steps": cfg.train.max_steps,
            "eval_reward_after": final.get("eval/reward"),
            "eval_kl_after": final.get("eval/kl"),
            "parameters": counts,
            **keep.summary(),
            "reward_stats": stats,
            "samples": sampled.get("rows", []),
            **({"judge": sampled["judge"]} if "judge" in sampled else {}),
        }
        stage.finish(summary=summary, outputs={"adapter": ADAPTER, "value": rl.VALUE, "samples": "samples.jsonl"})
    return stage.run_dir


def summary_lines(s: dict) -> list[str]:
    from align.rlhf.keep_best import kept_line

    return [f"  held-out reward {fmt(s.get('eval_reward_after'))}, KL to reference {fmt(s.get('eval_kl_after'))}"] + kept_line(s)


WHY_LORA = (
    "PPO keeps the policy, value and reward as adapters of one base model; PEFT holds adapters of a "
    "single type in one model and the reward adapter is LoRA"
)
register(Stage(
    "ppo", PPOConfig, run, summary_lines, checks=training_checks(LORA_FAMILY, WHY_LORA), resolve=resolve_method,
    kl_knob="ppo.kl_coef", curves=(Curve("ppo/reward_raw", "reward"), Curve("ppo/kl", "KL")),
))
