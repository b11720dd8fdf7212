"""Optimizer parameter groups of a stage: LoRA+ (`lora.plus_ratio`) gives B matrices a larger learning rate.

One rule for every stage, the same as PEFT's `create_loraplus_optimizer`: a trainable parameter
goes with B (learning rate plus_ratio x lr) when its name has `lora_B` or it is one-dimensional
(DoRA magnitudes, biases), every other one with A (lr); weight decay where the trainer applies it.
The TRL trainers get the groups through `use_param_groups(trainer, cfg)`; the online stages' own
loops build AdamW on `optimizer_groups(cfg, params, model)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from align.core.errors import ConfigError
from align.modeling.methods import LORA_FAMILY

if TYPE_CHECKING:
    from align.core.config import StageConfig


def plus_ratio(cfg: "StageConfig") -> float | None:
    """The stage's LoRA+ ratio, None when it trains with one learning rate."""
    return cfg.lora.plus_ratio if cfg.peft.method in LORA_FAMILY else None


def is_b_side(name: str, param: torch.Tensor) -> bool:
    return "lora_B" in name or param.ndim == 1


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float, ratio: float | None,
    decay: set[str] | None = None,
) -> list[dict]:
    """Trainable parameters in AdamW groups, each with its lr and weight_decay; empty groups left out.

    `ratio`: LoRA+ (None: one learning rate); `decay`: names that take weight decay (None: all).
    """
    groups: dict[tuple[float, float], list] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        rate = lr * ratio if ratio is not None and is_b_side(name, param) else lr
        wd = weight_decay if decay is None or name in decay else 0.0
        groups.setdefault((rate, wd), []).append(param)
    return [{"params": params, "lr": rate, "weight_decay": wd} for (rate, wd), params in groups.items()]


def optimizer_groups(cfg: "StageConfig", params: list[torch.nn.Parameter], model=None) -> list[dict]:
    """`params` (an online stage's trainable parameters) in groups for torch.optim.AdamW; `model` names them
    (parameters it does not hold, e.g. a value head, count as A side)."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    named = [(names.get(id(p), ""), p) for p in params]
    return param_groups(named, cfg.train.learning_rate, cfg.train.weight_decay, plus_ratio(cfg))


def use_param_groups(trainer, cfg: "StageConfig") -> None:
    """Have an HF/TRL trainer build its optimizer (its own class and settings) on the LoRA+ groups of the
    model it builds it for; nothing changes without lora.plus_ratio.

    The groups are made when the trainer creates its optimizer (an optimizer factory in
    `optimizer_cls_and_kwargs`), so they hold the parameters it trains, also once FSDP or DeepSpeed
    has wrapped the model.
    """
    ratio = plus_ratio(cfg)
    if ratio is None:
        return
    try:
        from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401 - the Trainer takes factories
    except ImportError:
        raise ConfigError(
            "lora.plus_ratio: this transformers' Trainer takes no optimizer factory (transformers.trainer_optimizer); "
            "upgrade transformers, or remove lora.plus_ratio"
        ) from None
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)

    def build(model, **optimizer_kwargs):
        decay = set(trainer.get_decay_parameter_names(model))
        groups = param_groups(model.named_parameters(), trainer.args.learning_rate, trainer.args.weight_decay, ratio, decay)
        return optimizer_cls(groups, **optimizer_kwargs)

    trainer.optimizer_cls_and_kwargs = (lambda: build, kwargs)
