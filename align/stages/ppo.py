"""PPO stage: RLHF with LoRA adapters on one frozen base (the merged SFT model).

The policy and value are trainable LoRA adapters, the reward is the reward run's frozen
adapter and score head, and the reference is the base with adapters disabled: one copy of
the model in memory. The model side is align/rlhf/ppo_model.py, one PPO step and the loop of steps
align/rlhf/ppo.py, the math align/rlhf/losses.py; this module holds the config and the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.core.config import ChildStageConfig, opt
from align.core.errors import ConfigError
from align.modeling.methods import LORA_FAMILY, resolve_method
from align.rlhf.options import KEEP_BEST_HELP
from align.stages.registry import Curve, Stage, fmt, register, training_checks


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


def run(cfg: PPOConfig, *, force: bool = False, callbacks=()):
    from align.core.artifacts import ADAPTER
    from align.core.errors import DataError
    from align.modeling.scoring import check_reward_files
    from align.rlhf import ppo as rl
    from align.rlhf.distributed import launched_size
    from align.stages.online_run import check_prompts_fit, join_processes
    from align.stages.samples import finish_with_samples
    from align.stages.stage_run import finished_parent, open_stage

    rl.check_processes(cfg, launched_size())
    reward_run = finished_parent(cfg.reward_run, key="reward_run")
    if (reward_run.manifest() or {}).get("stage") != "reward":
        raise DataError(f"reward_run: {reward_run.path} is not a reward-model run")
    check_reward_files(reward_run, "reward_run", need_stats=True, stats_hint="rerun the reward stage")
    stage = open_stage(cfg, "prompt", force, inputs={"reward_run": (reward_run.manifest() or {}).get("run_id")})
    join_processes(stage)
    if stage.skipped:
        return stage.run_dir
    check_prompts_fit(stage)
    with stage:
        pvr, summary = rl.train(stage, cfg, reward_run, callbacks)
        outputs = {"adapter": ADAPTER, "value": rl.VALUE}
        finish_with_samples(stage, pvr.model, pvr.tokenizer, summary, outputs, step=cfg.train.max_steps)
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
