"""The parameter-efficient methods a stage can train: what each trains, how its DPO reference
is formed, and which combinations work.

Pure data and checks, no torch: a config is validated before anything heavy is imported.
`align.adapters.peft_config_for` turns a validated config into the PEFT config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from align.errors import ConfigError

if TYPE_CHECKING:
    from align.config import StageConfig

log = logging.getLogger("align")


@dataclass(frozen=True)
class Method:
    name: str
    trains: str  # what becomes trainable, as a formula over module shapes
    reference: str  # how the DPO implicit reference is formed
    zero_effect_start: bool  # a fresh adapter leaves the model's outputs unchanged: DPO starts at its reference
    mergeable: bool  # the trained change folds into the base weights (merged/, `align merge`)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "full", "every weight", "a frozen copy of the starting weights (one more copy of the model in memory)",
            zero_effect_start=True, mergeable=True,
        ),
        Method(
            "lora", "r*(d_in+d_out) per adapted matrix (A: r x d_in, B: d_out x r; B starts at 0)",
            "the policy with its adapter disabled", zero_effect_start=True, mergeable=True,
        ),
        Method(
            "qlora", "as lora, on a 4-bit NF4 base (double quantization)",
            "the 4-bit base with the adapter disabled", zero_effect_start=True, mergeable=True,
        ),
        Method(
            "dora", "as lora + a magnitude vector of d_out per adapted matrix",
            "the policy with its adapter disabled", zero_effect_start=True, mergeable=True,
        ),
        Method(
            "vera", "lambda_b (d_out) + lambda_d (r) per adapted matrix; the random A and B are shared and frozen",
            "the policy with its adapter disabled (lambda_b starts at 0)", zero_effect_start=True, mergeable=True,
        ),
        Method(
            "ia3", "one vector per target: d_out, or d_in for feed-forward modules (starts at 1)",
            "the policy with its adapter disabled", zero_effect_start=True, mergeable=True,
        ),
        Method(
            "prompt_tuning", "num_virtual_tokens * hidden_size",
            "the base without the virtual tokens; the virtual tokens change the policy from step 0, so DPO "
            "starts away from its reference (step-0 loss is not ln 2)",
            zero_effect_start=False, mergeable=False,
        ),
        Method(
            "prefix_tuning", "num_virtual_tokens * 2 * num_layers * (num_key_value_heads * head_dim)",
            "the base without the prefix; the prefix changes the policy from step 0, so DPO starts away "
            "from its reference (step-0 loss is not ln 2)",
            zero_effect_start=False, mergeable=False,
        ),
    )
}

LORA_FAMILY = ("lora", "qlora", "dora")

# Stages that accept only some methods, and why.
_STAGE_LIMITS = {
    "reward": (
        LORA_FAMILY,
        "the reward adapter and its score head are later loaded next to LoRA adapters on one base "
        "(PPO, evaluation), and PEFT holds adapters of a single type in one model",
    ),
    "ppo": (
        LORA_FAMILY,
        "PPO keeps the policy, value and reward as adapters of one base model; PEFT holds adapters of a "
        "single type in one model and the reward adapter is LoRA",
    ),
}


def validate_method(cfg: "StageConfig") -> None:
    """Reject combinations of peft.method with other keys that cannot work, naming the keys and why.

    `qlora` sets model.quantization to 4bit when it is unset (none), and logs that.
    """
    method = cfg.peft.method
    if cfg.stage in _STAGE_LIMITS:
        allowed, why = _STAGE_LIMITS[cfg.stage]
        if method not in allowed:
            raise ConfigError(
                f"peft.method: '{method}' is not supported by the {cfg.stage} stage: {why}; use one of {', '.join(allowed)}"
            )
    quant = cfg.model.quantization
    if method == "qlora":
        if quant == "8bit":
            raise ConfigError(
                "peft.method: qlora trains LoRA on a 4-bit NF4 base, but model.quantization is 8bit; "
                "set model.quantization: 4bit (or none, which qlora turns into 4bit), or use peft.method: lora"
            )
        if quant == "none":
            cfg.model.quantization = "4bit"
            log.info("peft.method qlora: model.quantization set to 4bit (NF4, double quantization)")
    if method == "full" and quant != "none":
        raise ConfigError(
            f"peft.method: full trains every weight, and quantized weights (model.quantization: {quant}) cannot be "
            "trained; set model.quantization: none, or use peft.method: qlora"
        )
    if method == "prefix_tuning" and cfg.train.gradient_checkpointing:
        raise ConfigError(
            "peft.method: prefix_tuning does not work with train.gradient_checkpointing: true: the prefix lives in the "
            "attention cache, and the recomputed forward appends it a second time (attention shape mismatch); "
            "set train.gradient_checkpointing: false"
        )
    sft = getattr(cfg, "sft", None)
    if method in ("prompt_tuning", "prefix_tuning") and sft is not None and sft.packing:
        raise ConfigError(
            f"peft.method: {method} does not work with sft.packing: true: packed rows are isolated from each other "
            "in attention, so only the first row of a pack would see the virtual tokens; set sft.packing: false"
        )
    _check_options(cfg)


def _check_options(cfg: "StageConfig") -> None:
    p = cfg.peft
    if p.method == "vera":
        if p.vera.r < 1:
            raise ConfigError(f"peft.vera.r: must be at least 1, got {p.vera.r}")
        if not 0 <= p.vera.dropout < 1:
            raise ConfigError(f"peft.vera.dropout: must be in [0, 1), got {p.vera.dropout}")
        if not p.vera.target_modules:
            raise ConfigError("peft.vera.target_modules: at least one module is required")
    if p.method == "ia3":
        if not p.ia3.target_modules:
            raise ConfigError("peft.ia3.target_modules: at least one module is required")
        extra = sorted(set(p.ia3.feedforward_modules) - set(p.ia3.target_modules))
        if extra:
            raise ConfigError(
                f"peft.ia3.feedforward_modules: {extra} not in peft.ia3.target_modules; a feed-forward module is a "
                "target whose input is rescaled, so it must also be a target"
            )
    for name in ("prompt_tuning", "prefix_tuning"):
        n = getattr(p, name).num_virtual_tokens
        if p.method == name and n < 1:
            raise ConfigError(f"peft.{name}.num_virtual_tokens: must be at least 1, got {n}")
