"""PEFT adapters: the PEFT config a stage trains, merging, loading frozen adapters, combining.

`peft_config_for(cfg)` is the one place a stage's `peft:` section becomes a PEFT config
(None for full fine-tuning). See align/modeling/methods.py for what each method trains and how its
DPO reference is formed.

Merging always starts from a fresh load of the base exactly as training saw it
(quantized bases are loaded quantized, then dequantized), adds the saved adapter and
writes full-precision safetensors. The next stage re-quantizes when its config asks
for 4-bit, so "SFT (QLoRA) -> merge -> DPO (QLoRA)" keeps one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from align.core.artifacts import RunDir, atomic_dir
from align.core.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftConfig as PeftMethodConfig

    from align.core.config import LoraConfig, ModelConfig, StageConfig
    from align.modeling.models import ModelRef


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
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


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


# --------------------------------------------------------------------------- adapters on disk


@dataclass(frozen=True)
class AdapterSource:
    """A saved adapter and the base it was trained on (with the dtype/quantization it saw)."""

    adapter_dir: Path
    base: "ModelRef"
    model_cfg: "ModelConfig"
    run: RunDir | None  # the RunDir it came from, if any


def resolve_adapter(spec: str | Path, base: str | None = None) -> AdapterSource:
    """An adapter given as a RunDir (its adapter/) or an adapter folder; `base` overrides its recorded base.

    A RunDir names its base in manifest.json and its model settings in config.yaml; a bare
    adapter folder names its base in adapter_config.json (base_model_name_or_path).
    """
    import dataclasses
    import json

    from align.modeling import models
    from align.core.config import ModelConfig

    path = Path(spec)
    run = RunDir(path) if (path / "manifest.json").is_file() else None
    model_cfg = ModelConfig()
    recorded = None
    if run is not None:
        manifest = run.manifest() or {}
        if not (run.adapter_dir / "adapter_config.json").is_file():
            method = (run.config().get("peft") or {}).get("method")
            hint = f" (peft.method {method}: the trained model is {run.merged_dir})" if method == "full" else ""
            raise ConfigError(f"{path}: this run has no adapter/{hint}")
        adapter_dir = run.adapter_dir
        recorded = (manifest.get("base_model") or {}).get("location")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        saved = {k: v for k, v in (run.config().get("model") or {}).items() if k in known}
        model_cfg = dataclasses.replace(ModelConfig(), **saved)
    elif (path / "adapter_config.json").is_file():
        adapter_dir = path
        recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    else:
        raise ConfigError(f"{path}: neither a RunDir with adapter/ nor an adapter folder (no adapter_config.json)")
    name = base or recorded
    if not name:
        raise ConfigError(f"{path}: the adapter does not name its base model; pass --base")
    return AdapterSource(adapter_dir, models.resolve(name), model_cfg, run)


def base_identity(source: AdapterSource) -> str:
    """What makes two bases the same: the content hash of local weights, the commit of a hub model."""
    from align.modeling.models import content_hash

    return content_hash(source.base)


def check_same_base(sources: dict[str, AdapterSource]) -> None:
    ids = {name: base_identity(s) for name, s in sources.items()}
    if len(set(ids.values())) > 1:
        listing = "; ".join(f"{name}: {sources[name].base.location}" for name in ids)
        raise ConfigError(
            f"adapters trained on different bases ({listing}); an adapter only means something on its own base "
            "(pass --base to force one)"
        )


class AdapterSet:
    """One base in memory with several named adapters; generate with any one of them, or with none."""

    BASE = "base"  # the name that selects the base with every adapter off

    def __init__(self, base: "ModelRef", adapters: dict[str, Path], model_cfg: "ModelConfig"):
        from peft import PeftModel

        from align.modeling import models

        if not adapters:
            raise ConfigError("--adapter: at least one adapter (name=path) is required")
        if self.BASE in adapters:
            raise ConfigError(f"--adapter: '{self.BASE}' is reserved for the base model; name the adapter otherwise")
        kinds = {name: peft_type(path) for name, path in adapters.items()}
        if len(set(kinds.values())) > 1:
            listing = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
            raise ConfigError(f"--adapter: {listing}: one base holds adapters of a single PEFT type; generate with each type separately")
        self.tokenizer = models.load_tokenizer(base, model_cfg)
        model = models.load_model(base, model_cfg)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self.names = names

    def generate(self, prompts: list[list[dict]], adapter: str, sampling=None) -> list[str]:
        """Responses of one adapter (or of the base: adapter 'base') to chat prompts."""
        import contextlib

        from align.modeling.generation import generate

        if adapter != self.BASE and adapter not in self.names:
            raise ConfigError(f"adapter '{adapter}': not loaded (loaded: {', '.join(self.names)}, or '{self.BASE}')")
        if adapter == self.BASE:
            context = self.model.disable_adapter()
        else:
            self.model.set_adapter(adapter)
            context = contextlib.nullcontext()
        with context:
            return generate(self.model, self.tokenizer, prompts, sampling=sampling)


COMBINATION_TYPES = ("linear", "cat", "svd")


def combine_adapters(sources: list[AdapterSource], weights: list[float], combination_type: str, out_dir: Path) -> Path:
    """Weighted combination of LoRA adapters of one base, saved as a new standard adapter (atomically).

    linear: A and B are each a weighted sum (equal ranks; the product mixes cross terms);
    cat: A and B are stacked, so the update is exactly sum(w_i * B_i A_i) at rank sum(r_i);
    svd: that exact sum truncated back to the largest rank by SVD.
    """
    import dataclasses
    import json
    import os

    from peft import PeftModel

    from align.modeling import models

    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"--type: expected one of {', '.join(COMBINATION_TYPES)}, got {combination_type!r}")
    if len(sources) < 2:
        raise ConfigError("combine: give at least two adapters")
    if len(weights) != len(sources):
        raise ConfigError(f"--weights: {len(weights)} weights for {len(sources)} adapters")
    configs = []
    for s in sources:
        kind = peft_type(s.adapter_dir)
        if kind != "LORA":
            raise ConfigError(f"combine: {s.adapter_dir} is of PEFT type {kind}; only LoRA adapters combine (their A/B matrices are what is weighted)")
        config = json.loads((s.adapter_dir / "adapter_config.json").read_text())
        if config.get("use_dora"):
            raise ConfigError(f"combine: {s.adapter_dir} is a DoRA adapter; its magnitude vectors are not combined by PEFT, so the result would be wrong")
        if config.get("modules_to_save"):
            raise ConfigError(f"combine: {s.adapter_dir} also trains whole modules ({config['modules_to_save']}, e.g. a reward head); those cannot be weighted")
        configs.append(config)
    ranks = sorted({c["r"] for c in configs})
    if combination_type == "linear" and len(ranks) > 1:
        raise ConfigError(f"--type linear: needs adapters of one rank, got ranks {ranks}; use --type cat or svd")
    check_same_base({str(s.adapter_dir): s for s in sources})
    # The combination only reads LoRA weights: the base is loaded unquantized whatever it trained on.
    model_cfg = dataclasses.replace(sources[0].model_cfg, quantization="none")
    model = models.load_model(sources[0].base, model_cfg)
    names = [f"a{i}" for i in range(len(sources))]
    peft_model = PeftModel.from_pretrained(model, str(sources[0].adapter_dir), adapter_name=names[0])
    for name, s in zip(names[1:], sources[1:]):
        peft_model.load_adapter(str(s.adapter_dir), adapter_name=name)
    peft_model.add_weighted_adapter(names, list(weights), "combined", combination_type=combination_type)
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), selected_adapters=["combined"])
        # PEFT saves a non-default adapter into a subfolder named after it; a standard adapter sits at the top.
        for item in (tmp / "combined").iterdir():
            os.replace(item, tmp / item.name)
        (tmp / "combined").rmdir()
        lines = [
            "# Combined LoRA adapter",
            "",
            f"- Base model: {sources[0].base.name}",
            f"- Combination: {combination_type} (PEFT add_weighted_adapter)",
            "",
            "| source adapter | weight |",
            "| --- | ---: |",
            *[f"| {s.run.path if s.run else s.adapter_dir} | {w:g} |" for s, w in zip(sources, weights)],
            "",
        ]
        (tmp / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return out_dir
