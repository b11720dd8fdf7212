"""RLOO stage: REINFORCE with a leave-one-out baseline, a LoRA policy on one frozen base.

Each step samples `rloo.group_size` responses to each of `rloo.prompts_per_step` prompts with
the policy adapter and scores them with the configured reward sources (judges and reward-model
adapters on the same base, align/rlhf/rewards.py). By default the KL to the reference (the base
with adapters disabled: the SFT model) is subtracted from each response's reward, and a
response's advantage is its reward minus the mean reward of the other responses to the same
prompt (Ahmadian et al. 2024). No value model. Shares its implementation with the GRPO stage
(align/rlhf/group.py, which says why it is not TRL's RLOOTrainer); math in align/rlhf/losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.core.config import opt
from align.modeling.methods import resolve_method
from align.rlhf.estimators import LeaveOneOut
from align.rlhf.options import ADVANTAGE_SCALES, GroupOptions, GroupStageConfig
from align.stages.registry import Curve, Stage, group_summary_lines, online_checks, register


@dataclass
class RLOOOptions(GroupOptions):
    """GroupOptions with RLOO's defaults: the KL (k1, summed per response) in the reward, no std scaling."""

    kl_coef: float = opt(0.05, "Weight of the KL to the reference (the base with adapters disabled); 0 skips the reference pass.", min=0)
    kl_in: Literal["loss", "reward"] = opt(
        "reward",
        "Where the KL goes: reward = the response's summed KL subtracted from its reward before the baseline (RLOO); "
        "loss = a per-token penalty added to the policy loss (as GRPO).",
    )
    kl_estimator: Literal["k1", "k3"] = opt("k1", "Per-token KL estimate: k1 = log p - log q, k3 = (q/p - 1) - log(q/p) (>= 0).")
    scale_advantages: Literal[ADVANTAGE_SCALES] = opt(  # type: ignore[valid-type]
        "none", "Divide advantages by the std of the rewards of their group, of the whole batch, or not at all (none)."
    )


@dataclass
class RLOOConfig(GroupStageConfig):
    """RLOO: leave-one-out baselines, KL to the SFT model in the reward; rewards from judges and reward models."""

    rloo: RLOOOptions = opt(RLOOOptions, "RLOO options (train.max_steps counts steps: sample + update; train.batch_size counts responses).")

    stage = "rloo"


def run(cfg, *, force: bool = False, callbacks=()):
    from align.stages.online_run import run_group_stage

    return run_group_stage(cfg, force=force, callbacks=callbacks)


register(Stage(
    "rloo", RLOOConfig, run, group_summary_lines, checks=online_checks(), resolve=resolve_method, estimator=LeaveOneOut(), kl_knob="rloo.kl_coef", curves=(Curve("rloo/reward/total", "reward"), Curve("rloo/kl", "KL")),
))
