"""GRPO stage: group relative policy optimization with a LoRA policy on one frozen base.

Each step samples `grpo.group_size` responses to each of `grpo.prompts_per_step` prompts with
the policy adapter, scores them with the configured reward sources (judges and reward-model
adapters on the same base, align/rlhf/rewards.py), and takes clipped policy-gradient updates
with advantages relative to the group (minus the group mean, over the group std by default) and
a per-token KL penalty to the reference, the base with adapters disabled (the SFT model). No
value model. Our own implementation on the PPO stage's sampling, scoring and log-prob parts,
not TRL's GRPOTrainer: align/rlhf/group.py says why. Math: align/rlhf/losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.core.config import opt
from align.modeling.methods import resolve_method
from align.rlhf.estimators import GroupRelative
from align.rlhf.options import GroupOptions, GroupStageConfig
from align.stages.registry import Curve, Stage, group_summary_lines, online_checks, register


@dataclass
class GRPOConfig(GroupStageConfig):
    """GRPO: group-relative advantages, KL to the SFT model in the loss; rewards from judges and reward models."""

    grpo: GroupOptions = opt(GroupOptions, "GRPO options (train.max_steps counts steps: sample + update; train.batch_size counts responses).")

    stage = "grpo"


def run(cfg, *, force: bool = False, callbacks=()):
    from align.stages.online_run import run_group_stage

    return run_group_stage(cfg, force=force, callbacks=callbacks)


register(Stage(
    "grpo", GRPOConfig, run, group_summary_lines, checks=online_checks(), resolve=resolve_method, estimator=GroupRelative(), kl_knob="grpo.kl_coef", curves=(Curve("grpo/reward/total", "reward"), Curve("grpo/kl", "KL")),
))
