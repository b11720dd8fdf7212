"""PEFT adapters: the PEFT config a stage trains, merging, loading frozen adapters, combining.

`peft_config_for(cfg)` is the one place a stage's `peft:` section becomes a PEFT config
(None for full fine-tuning). See align/methods.py for what each method trains and how its
DPO reference is formed.

Merging always starts from a fresh load of the base exactly as training saw it
(quantized bases are loaded quantized, then dequantized), adds the saved adapter and
writes full-precision safetensors. The next stage re-quantizes when its config asks
for 4-bit, so "SFT (QLoRA) -> merge -> DPO (QLoRA)" keeps one code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from align.artifacts import atomic_dir
from align.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftConfig as PeftMethodConfig

    from align.config import LoraConfig, ModelConfig, StageConfig
    from align.models import ModelRef


def lora_config(cfg: "LoraConfig", task_type: str = "CAUSAL_LM", use_dora: bool = False) -> "PeftLoraConfig":
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=use_dora,
        bias="none",
        task_type=task_type,
    )


def peft_config_for(cfg: "StageConfig", task_type: str = "CAUSAL_LM", base_location: str | None = None) -> "PeftMethodConfig | None":
    """The PEFT config of the stage's `peft.method`; None for full fine-tuning.

    `base_location` is where the tokenizer of the base lives (prompt tuning initialized from text).
    """
    import peft

    p = cfg.peft
    method = p.method
    if method == "full":
        return None
    if method in ("lora", "qlora", "dora"):  # qlora differs from lora only in the 4-bit base (model.quantization)
        return lora_config(cfg.lora, task_type, use_dora=method == "dora")
    if method == "vera":
        v = p.vera
        return peft.VeraConfig(
            r=v.r,
            target_modules=v.target_modules,
            projection_prng_key=v.projection_prng_key,
            save_projection=v.save_projection,
            d_initial=v.d_initial,
            vera_dropout=v.dropout,
            task_type=task_type,
        )
    if method == "ia3":
        return peft.IA3Config(
            target_modules=list(p.ia3.target_modules), feedforward_modules=list(p.ia3.feedforward_modules), task_type=task_type
        )
    if method == "prompt_tuning":
        t = p.prompt_tuning
        if t.init_text:
            if base_location is None:
                raise ValueError("prompt tuning from init_text needs base_location (its tokenizer)")
            return peft.PromptTuningConfig(
                num_virtual_tokens=t.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=t.init_text,
                tokenizer_name_or_path=base_location,
                task_type=task_type,
            )
        # Embeddings of random vocabulary tokens sit at the scale the model expects; PEFT's
        # "random" init (unit normal) is far larger than SmolLM2's embeddings.
        return peft.PromptTuningConfig(
            num_virtual_tokens=t.num_virtual_tokens, prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB, task_type=task_type
        )
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=p.prefix_tuning.num_virtual_tokens, task_type=task_type)
    raise ValueError(f"unknown peft.method {method!r}")  # the config's Literal makes this unreachable


def adapter_bytes(folder: Path) -> int:
    """Size on disk of the weights in a saved adapter (or model) folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def peft_type(adapter_dir: Path) -> str:
    """The PEFT type (LORA, IA3, PROMPT_TUNING, ...) of a saved adapter."""
    import json

    config = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(config.read_text())["peft_type"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter (no readable adapter_config.json with a peft_type)") from None


_MERGEABLE_TYPES = ("LORA", "IA3", "VERA")


def merge_adapter(base: "ModelRef", model_cfg: "ModelConfig", adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """Write base + adapter as one full-precision safetensors model (atomically).

    Only adapters that change weights merge; prompt and prefix tuning add virtual tokens instead.
    """
    from peft import PeftModel

    from align.models import load_model

    kind = peft_type(adapter_dir)
    if kind not in _MERGEABLE_TYPES:
        raise ConfigError(
            f"{adapter_dir}: a {kind} adapter cannot be merged into the base: it adds virtual tokens to the input "
            "rather than changing weights; load the base with the adapter instead"
        )
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
