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


def load_frozen_adapter(peft_model, adapter_dir: Path, name: str):
    """Load a saved LoRA adapter onto `peft_model` under `name`, frozen.

    Also takes a sequence-classification adapter (a reward model): its LoRA weights
    go onto the shared backbone; its `score` head, which has no place in a causal LM,
    is returned as a Linear layer (None when the adapter has no head).
    """
    import torch
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type = peft_model.peft_config[peft_model.active_adapter].task_type
    config.modules_to_save = None
    config.inference_mode = True
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    head_keys = [k for k in weights if k.endswith("score.weight") or k.endswith("score.bias")]
    head_weights = {k.rsplit(".", 1)[1]: weights.pop(k) for k in head_keys}
    peft_model.add_adapter(name, config)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {adapter_dir}: does not fit this base (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    for param_name, param in peft_model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)
    if not head_weights:
        return None
    weight = head_weights["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_weights)
    head.load_state_dict(head_weights)
    head.requires_grad_(False)
    return head
