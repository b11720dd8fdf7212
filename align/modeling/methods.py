"""The parameter-efficient methods a stage can train: what each trains, how its DPO reference
is formed, and which combinations work.

Pure data and checks, no torch: a config is validated before anything heavy is imported.
`align.modeling.adapters.peft_config_for` turns a validated config into the PEFT config.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from align.core.errors import ConfigError

if TYPE_CHECKING:
    from align.core.config import StageConfig

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


def check_method(cfg: "StageConfig", allowed: tuple[str, ...] | None = None, why: str = "") -> None:
    """Reject combinations of peft.method with other keys that cannot work, naming the keys and why.

    `allowed`: the methods the stage supports (None: all), `why` says why it supports no others.
    Checks only; `resolve_method` fills in what qlora implies.
    """
    method = cfg.peft.method
    if allowed is not None and method not in allowed:
        raise ConfigError(
            f"peft.method: '{method}' is not supported by the {cfg.stage} stage: {why}; use one of {', '.join(allowed)}"
        )
    quant = cfg.model.quantization
    if method == "qlora" and quant == "8bit":
        raise ConfigError(
            "peft.method: qlora trains LoRA on a 4-bit NF4 base, but model.quantization is 8bit; "
            "set model.quantization: 4bit (or none, which qlora turns into 4bit), or use peft.method: lora"
        )
    if method == "full" and quant != "none":
        raise ConfigError(
            f"peft.method: full trains every weight, and quantized weights (model.quantization: {quant}) cannot be "
            "trained; set model.quantization: none, or use peft.method: qlora"
        )
    if method == "prefix_tuning" and cfg.train.gradient_checkpointing is True:  # auto stays off for it
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


def resolve_method(cfg: "StageConfig") -> "StageConfig":
    """What a method implies for other keys, filled in and logged: qlora loads the base in 4 bits.

    Returns a copy when something changes; the config passed in is left as it is.
    """
    if cfg.peft.method == "qlora" and cfg.model.quantization == "none":
        cfg = copy.deepcopy(cfg)
        cfg.model.quantization = "4bit"
        log.info("peft.method qlora: model.quantization set to 4bit (NF4, double quantization)")
    return cfg
