"""The policy of an online method: one base in memory with the trainable policy adapter, and what samples from it.

Every online method sets its policy up here, one way: the base loaded once, a fresh policy adapter
attached (`lora.init` applied), the gradient-checkpointing choice (train.gradient_checkpointing; auto
decides by memory) for the loops that run their own backward passes. GRPO, RLOO and online DPO then
load the reward-run sources' adapters next to it, keep only the policy adapter trainable and sample
through the rollout engine (`OnlinePolicy`); PPO adds its value and reward adapters
(align/rlhf/ppo_model.py). The reference is the base with adapters disabled.
"""

from __future__ import annotations

import torch

from align.modeling import models
from align.modeling.adapters import attach_adapter
from align.modeling.train_setup import gradient_checkpointing
from align.rlhf.rewards import Rewards
from align.rlhf.rollout import LocalRollout


def attach_policy(cfg, base, adapter: str, checkpointing: bool = False):
    """The base model with a fresh trainable adapter `adapter`; with `checkpointing`, gradient checkpointing on
    where train.gradient_checkpointing asks for it (activations recomputed in the update's backward;
    generation runs in eval mode, with its cache)."""
    plain = models.load_model(base, cfg.model)
    on = checkpointing and gradient_checkpointing(cfg, plain, str(next(plain.parameters()).device), rows_per_example=1)
    model = attach_adapter(plain, cfg, adapter, base_location=base.location)
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class OnlinePolicy:
    """The base with the policy adapter and the frozen reward adapters; `engine` samples from the policy."""

    def __init__(self, cfg, base, tokenizer, adapter: str, reward_runs, answers, checkpointing: bool = False):
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.model = attach_policy(cfg, base, adapter, checkpointing)
        self.rewards = Rewards(cfg.rewards, model=self.model, tokenizer=tokenizer, runs=reward_runs, answers=answers)
        self.model.set_adapter(adapter)
        for name, param in self.model.named_parameters():  # only the policy adapter trains
            param.requires_grad_(f".{adapter}." in name)
        self.engine = LocalRollout(self.model, tokenizer, lambda: self.model.set_adapter(adapter))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{self.adapter}." in n]
