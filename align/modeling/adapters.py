"""PEFT adapters: the PEFT config a stage trains, attaching and checking it, merging, loading frozen adapters.

Saved adapters given on a command line (`align merge/generate/export/combine/push`) are
align/modeling/adapter_sets.py.

`peft_config_for(cfg)` is the one place a stage's `peft:` section becomes a PEFT config
(None for full fine-tuning). See align/modeling/methods.py for what each method trains and how its
DPO reference is formed.

Merging always starts from a fresh load of the base exactly as training saw it
(quantized bases are loaded quantized, then dequantized), adds the saved adapter and
writes full-precision safetensors. The next stage re-quantizes when its config asks
for 4-bit, so "SFT (QLoRA) -> merge -> DPO (QLoRA)" keeps one code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import logging

from align.core.artifacts import mark_output
from align.core.errors import ConfigError
from align.core.files import atomic_dir
from align.modeling.methods import LORA_FAMILY

log = logging.getLogger("align")

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftConfig as PeftMethodConfig

    from align.core.config import LoraConfig, ModelConfig, StageConfig
    from align.modeling.models import ModelRef


def lora_config(cfg: "LoraConfig", task_type: str = "CAUSAL_LM", use_dora: bool = False) -> "PeftLoraConfig":
    """PEFT's LoraConfig of a `lora:` section. PiSSA, OLoRA and LoftQ start as PEFT's default and are
    applied by align.modeling.lora_init.initialize once the adapter exists (the base is kept as it is)."""
    from peft import EvaConfig
    from peft import LoraConfig as PeftLoraConfig

    from align.modeling.lora_init import peft_init_value

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=use_dora,
        use_rslora=cfg.rslora,
        init_lora_weights=peft_init_value(cfg.init),
        eva_config=EvaConfig() if cfg.init == "eva" else None,
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


def attach_adapter(model, cfg: "StageConfig", name: str, *, reference: bool = True, base_location: str | None = None):
    """A fresh adapter `name` of the stage's `peft:` config on `model` (a plain model becomes a PeftModel; a PEFT
    model gets one more adapter), with `lora.init` applied; returns the PEFT model. The online stages' way to
    make their trained adapters; `reference=False` for a second trained adapter that does not define the
    DPO reference (PPO's value adapter)."""
    from peft import PeftModel, get_peft_model

    from align.modeling.lora_init import initialize

    config = peft_config_for(cfg, base_location=base_location)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    initialize(model, cfg, name, reference=reference)
    return model


def start_adapter(trainer, cfg: "StageConfig", rows: list[dict], tokenizer) -> None:
    """Finish the adapter a TRL trainer attached from `peft_config_for`, before it trains: `lora.init` (EVA reads
    `rows`), then LoRA+ param groups for the optimizer it will build."""
    from peft import PeftModel

    from align.modeling.lora_init import initialize
    from align.modeling.lora_plus import use_param_groups

    if isinstance(trainer.model, PeftModel):
        initialize(trainer.model, cfg, trainer.model.active_adapter, rows=rows, tokenizer=tokenizer)
    use_param_groups(trainer, cfg)


_TARGETED = ("lora", "qlora", "dora", "vera", "ia3")  # methods that adapt named modules


def check_adapter(cfg: "StageConfig", base: "ModelRef", rows: list[dict], head: str = "causal") -> None:
    """Pre-flight of the adapter a stage will train, before anything is written: its target modules exist in
    the base, and its `lora.init` has what it reads (EVA: training rows with responses; LoftQ: the base's
    full-precision safetensors)."""
    check_target_modules(cfg, base, head)
    if cfg.peft.method not in LORA_FAMILY:
        return
    from align.modeling.lora_init import eva_batches, has_responses

    init = cfg.lora.init
    if init == "eva":
        if not has_responses(rows):
            raise ConfigError(
                "lora.init: eva starts A from the activations of the training rows, and this stage's rows are prompts "
                "alone (an online stage trains on its own samples, which do not exist before the adapter); use default, "
                "gaussian, pissa, olora or loftq"
            )
        from align.modeling.models import load_tokenizer

        eva_batches(rows, load_tokenizer(base, cfg.model), cfg)  # too few tokens: a DataError naming lora.init
    if init == "loftq" and base.is_local and not any(Path(base.location).glob("*.safetensors")):
        raise ConfigError(
            f"lora.init: loftq reads the full-precision weights from the base's safetensors files; {base.location} has none"
        )


def check_target_modules(cfg: "StageConfig", base: "ModelRef", head: str = "causal") -> None:
    """Refuse target modules the base model does not have, before any run dir is written.

    PEFT's own matching runs on an empty copy of the model built from its config on the meta
    device (no weights are read; well under a second), so the rule is exactly the one training
    would apply later, with its error turned into one line naming the key.
    """
    method = cfg.peft.method
    if method not in _TARGETED:
        return
    lora_like = method in ("lora", "qlora", "dora")
    targets = cfg.lora.target_modules if lora_like else getattr(cfg.peft, method).target_modules
    key = "lora.target_modules" if lora_like else f"peft.{method}.target_modules"
    if targets == "all-linear":
        return
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.core.errors import ModelError

    try:
        config = AutoConfig.from_pretrained(base.location, revision=base.revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model '{base.name}': cannot read its config from {base.location}: {first}") from None
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if head == "score":
        config.num_labels = 1
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built empty: the real load checks it
        return
    linear = sorted({name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
    peft_config = peft_config_for(cfg, "SEQ_CLS" if head == "score" else "CAUSAL_LM", base_location=base.location)
    try:
        with torch.device("meta"):
            get_peft_model(model, peft_config)
    except ValueError as exc:  # PEFT's NoMatchingPeftModuleError is one, and so is "not supported"
        text = " ".join(str(exc).split())
        if "Target module" not in text and "target_modules" not in text and "compatible" not in text:
            raise
        reason = "not found in the model" if "not found" in text or "compatible" in text else "not a layer this method adapts"
        raise ConfigError(
            f"{key}: {targets!r}: {reason} ({base.name}); its linear layers are {', '.join(linear)} (or use 'all-linear')"
        ) from None


def adapter_bytes(folder: Path) -> int:
    """Size on disk of the weights in a saved adapter (or model) folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def read_adapter_config(adapter_dir: Path) -> dict:
    """A saved adapter's adapter_config.json, checked to be a mapping with a string peft_type (one-line errors)."""
    import json

    config = Path(adapter_dir) / "adapter_config.json"
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{config}: expected a JSON object, got {type(loaded).__name__}")
    if not isinstance(loaded.get("peft_type"), str):
        raise ConfigError(f"{config}: no 'peft_type' (a PEFT adapter's config names its type, e.g. LORA)")
    base = loaded.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{config}: 'base_model_name_or_path' must be a string, got {type(base).__name__}")
    return loaded


def peft_type(adapter_dir: Path) -> str:
    """The PEFT type (LORA, IA3, PROMPT_TUNING, ...) of a saved adapter."""
    return read_adapter_config(adapter_dir)["peft_type"]


_MERGEABLE_TYPES = ("LORA", "IA3", "VERA")


def merge_adapter(
    base: "ModelRef", model_cfg: "ModelConfig", adapter_dir: Path, out_dir: Path, tokenizer, mark: str | None = None
) -> None:
    """Write base + adapter as one full-precision safetensors model (atomically); `mark` labels a folder
    the user named as align's output (so a later run may replace it).

    Only adapters that change weights merge; prompt and prefix tuning add virtual tokens instead.
    """
    from peft import PeftModel

    from align.modeling.models import load_model

    kind = peft_type(adapter_dir)
    if kind not in _MERGEABLE_TYPES:
        raise ConfigError(
            f"{adapter_dir}: an adapter of PEFT type {kind} cannot be merged into the base: it adds virtual tokens to the input "
            "rather than changing weights; load the base with the adapter instead"
        )
    model = load_model(base, model_cfg)
    if model_cfg.quantization != "none":
        model = model.dequantize()
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if not model_cfg.trust_remote_code and getattr(merged.config, "auto_map", None):
        # The base names code files that did not run (and are not copied): the merged model is the built-in class.
        del merged.config.auto_map
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if mark:
            mark_output(tmp, mark)


def load_frozen_adapter(model, adapter_dir: Path, name: str):
    """Load a saved LoRA adapter onto `model` under `name`, frozen; returns (PEFT model, score head or None).

    `model` is a PEFT model, or a plain model that becomes one with this as its first adapter.
    Also takes a sequence-classification adapter (a reward model): its LoRA weights
    go onto the shared backbone; its `score` head, which has no place in a causal LM,
    is returned as a Linear layer (None when the adapter has no head).
    """
    import torch
    from peft import PeftConfig, PeftModel, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    read_adapter_config(adapter_dir)  # a malformed adapter_config.json is one line, not PEFT's traceback
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.modules_to_save = None
    config.inference_mode = True
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    head_keys = [k for k in weights if k.endswith("score.weight") or k.endswith("score.bias")]
    head_weights = {k.rsplit(".", 1)[1]: weights.pop(k) for k in head_keys}
    if isinstance(model, PeftModel):
        config.task_type = model.peft_config[model.active_adapter].task_type
        peft_model = model
        peft_model.add_adapter(name, config)
    else:
        config.task_type = "CAUSAL_LM"
        peft_model = get_peft_model(model, config, adapter_name=name)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {adapter_dir}: does not fit this base (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    for param_name, param in peft_model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)
    if not head_weights:
        return peft_model, None
    weight = head_weights["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_weights)
    head.load_state_dict(head_weights)
    head.requires_grad_(False)
    return peft_model, head
