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


@dataclass(frozen=True)
class LoraInit:
    """One value of `lora.init`: where PEFT's init comes in and what it means for the reference and for merging."""

    name: str
    what: str
    # How the fresh adapter relates to the model training starts from:
    #   zero:   B starts at 0, the adapter has no effect (PEFT's own init, nothing else to do);
    #   offset: A and B start at factors of the base weight (PiSSA, OLoRA); PEFT would move them out of the
    #           base (W_res = W - s*B0A0); align keeps W and subtracts s*B0A0 while the adapter is on, and
    #           saves the adapter converted to a standard LoRA of rank 2r (PEFT's PiSSA/OLoRA conversion);
    #   restore: A and B start at the 4-bit quantization error (LoftQ): the model starts at Q + s*B0A0, and
    #           "adapters disabled" gives that model too, so DPO's reference is where training started.
    start: str
    bases: tuple[str, ...]  # model.quantization values the init works with
    dora: bool  # whether it combines with peft.method dora
    needs_responses: bool = False  # it reads the activations of the training rows (EVA)


LORA_INITS: dict[str, LoraInit] = {
    i.name: i
    for i in (
        LoraInit("default", "PEFT's default: A Kaiming-uniform, B zero", "zero", ("none", "4bit", "8bit"), dora=True),
        LoraInit("gaussian", "A Gaussian (std 1/r), B zero", "zero", ("none", "4bit", "8bit"), dora=True),
        LoraInit(
            "eva", "A from the SVD of the layer inputs over training rows, ranks redistributed (PEFT's EVA, rho 2); B zero",
            "zero", ("none", "4bit"), dora=True, needs_responses=True,
        ),
        LoraInit("pissa", "A, B from the principal singular vectors of W (s*BA = its top-r part)", "offset", ("none",), dora=False),
        LoraInit("olora", "A, B from a QR decomposition of W", "offset", ("none", "4bit"), dora=False),
        LoraInit("loftq", "A, B from the SVD of the 4-bit quantization error W - Q", "restore", ("4bit",), dora=False),
    )
}


def lora_init(name: str) -> LoraInit:
    """The record of a `lora.init` value (pissa_niter_<n> is PiSSA's)."""
    return LORA_INITS["pissa" if name.startswith("pissa") else name]


def check_lora_options(cfg: "StageConfig") -> None:
    """Refuse `lora.rslora` / `lora.init` / `lora.plus_ratio` settings that cannot work, naming the key."""
    method, lora = cfg.peft.method, cfg.lora
    if method not in LORA_FAMILY:
        for key, value, default in (("init", lora.init, "default"), ("rslora", lora.rslora, False), ("plus_ratio", lora.plus_ratio, None)):
            if value != default:
                raise ConfigError(
                    f"lora.{key}: applies to LoRA adapters (peft.method lora, qlora or dora), and peft.method is {method}; "
                    f"remove lora.{key} or use one of those methods"
                )
        return
    init = lora_init(lora.init)
    quant = "4bit" if method == "qlora" else cfg.model.quantization
    if method == "dora" and not init.dora:
        raise ConfigError(
            f"lora.init: {lora.init} does not combine with peft.method dora: DoRA rescales each column of W + BA to a "
            "learned magnitude, so the starting factors cannot be taken back out of the update (the reference and the "
            "saved adapter would be wrong); use peft.method lora, or lora.init default, gaussian or eva"
        )
    if quant not in init.bases:
        if init.name == "loftq":
            why = "LoftQ starts the adapter at the error of the 4-bit quantization, so it needs a 4-bit base"
            fix = "use peft.method qlora (or model.quantization: 4bit)"
        elif init.name == "pissa":
            why = "PiSSA takes the SVD of full-precision weights (PEFT refuses quantized ones)"
            fix = "use model.quantization: none, or lora.init olora or loftq with qlora"
        else:
            why = f"align runs it on {' or '.join(init.bases)} bases only"
            fix = "choose another lora.init or model.quantization"
        raise ConfigError(f"lora.init: {lora.init} with a {quant} base (model.quantization / peft.method {method}): {why}; {fix}")


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
    check_lora_options(cfg)
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
