"""Advantage estimators of the group-RL methods as objects: how each response's reward is set against its group's.

An estimator is called on the step's rewards (flat, group by group, NaN where no reward source scored
the response), the group size and the method's `scale_advantages` ("group", "batch" or "none"), and
returns one advantage per response (0 for an unscored one). The shared group loop
(align/rlhf/group.py) calls the one its stage's record names (align/stages/registry.py), so a new
group-RL method is an estimator, a config with a `GroupOptions` section, and a stage module.
The math is in align/rlhf/losses.py; this module stays light (torch loads when an estimator runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class AdvantageEstimator:
    """Per-response advantages from a step's rewards; `name` says which, in logs and error messages."""

    name = "advantage estimator"

    def __call__(self, rewards: "torch.Tensor", group_size: int, scale: str) -> "torch.Tensor":
        raise NotImplementedError


class GroupRelative(AdvantageEstimator):
    """GRPO (Shao et al. 2024): each reward minus the mean of its group, over a std (scale) or not."""

    name = "group-relative (GRPO)"

    def __call__(self, rewards: "torch.Tensor", group_size: int, scale: str) -> "torch.Tensor":
        from align.rlhf.losses import group_advantages

        return group_advantages(rewards, group_size, scale)


class LeaveOneOut(AdvantageEstimator):
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the other rewards of its group."""

    name = "leave-one-out (RLOO)"

    def __call__(self, rewards: "torch.Tensor", group_size: int, scale: str) -> "torch.Tensor":
        from align.rlhf.losses import leave_one_out_advantages

        return leave_one_out_advantages(rewards, group_size, scale)
