"""PEFT adapters: the LoRA config a stage trains, and merging an adapter into its base.

Merging always starts from a fresh load of the base exactly as training saw it
(quantized bases are loaded quantized, then dequantized), adds the saved adapter and
writes full-precision safetensors. The next stage re-quantizes when its config asks
for 4-bit, so "SFT (QLoRA) -> merge -> DPO (QLoRA)" keeps one code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from align.artifacts import atomic_dir

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig

    from align.config import LoraConfig, ModelConfig
    from align.models import ModelRef


def lora_config(cfg: "LoraConfig", task_type: str = "CAUSAL_LM") -> "PeftLoraConfig":
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type=task_type,
    )


def merge_adapter(base: "ModelRef", model_cfg: "ModelConfig", adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """Write base + adapter as one full-precision safetensors model (atomically)."""
    from peft import PeftModel

    from align.models import load_model

    model = load_model(base, model_cfg)
    if model_cfg.quantization != "none":
        model = model.dequantize()
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
