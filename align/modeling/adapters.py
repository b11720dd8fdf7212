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

import logging

from align.core.artifacts import RunDir, mark_output

from align.core.files import atomic_dir
from align.core.errors import ConfigError
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


# --------------------------------------------------------------------------- adapters on disk


@dataclass(frozen=True)
class AdapterSource:
    """A saved adapter and the base it was trained on (with the dtype/quantization it saw)."""

    adapter_dir: Path
    base: "ModelRef"
    model_cfg: "ModelConfig"
    run: RunDir | None  # the RunDir it came from, if any


# Model settings a run dir's config.yaml may carry over to `align merge/generate/export/combine`: how
# to load the base as it was trained. Never trust_remote_code: code runs only when the user asks.
_CARRIED_MODEL_KEYS = ("dtype", "attn_implementation", "quantization", "chat_template")


def resolve_adapter(spec: str | Path, base: str | None = None, trust_remote_code: bool = False) -> AdapterSource:
    """An adapter given as a RunDir (its adapter/) or an adapter folder; `base` overrides its recorded base.

    A RunDir names its base in manifest.json and its model settings in config.yaml; a bare
    adapter folder names its base in adapter_config.json (base_model_name_or_path). What a run dir
    says is data: its dtype, attention, quantization and chat template are used, but remote code
    runs only with `trust_remote_code=True` from the user (`--trust-remote-code`), whatever the
    run's config.yaml says.
    """
    from align.core.config import ModelConfig, config_from_dict
    from align.modeling import models

    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    candidate = RunDir(path)
    run = candidate if candidate.is_run_dir() else None
    recorded = None
    saved: dict = {}
    if run is not None:
        manifest = run.manifest() or {}
        if not (run.adapter_dir / "adapter_config.json").is_file():
            method = (run.config().get("peft") or {}).get("method")
            hint = f" (peft.method {method}: the trained model is {run.merged_dir})" if method == "full" else ""
            raise ConfigError(f"{path}: this run has no adapter/{hint}")
        adapter_dir = run.adapter_dir
        read_adapter_config(adapter_dir)
        recorded = (manifest.get("base_model") or {}).get("location")
        if recorded is not None and not isinstance(recorded, str):
            raise ConfigError(f"{run.manifest_path}: base_model.location must be a string")
        model_section = run.config().get("model") or {}
        if not isinstance(model_section, dict):
            raise ConfigError(f"{path}/config.yaml: 'model' must be a mapping")
        saved = {k: v for k, v in model_section.items() if k in _CARRIED_MODEL_KEYS}
        if model_section.get("trust_remote_code") is True and not trust_remote_code:
            log.warning(
                "%s was trained with model.trust_remote_code: true; a run dir cannot turn remote code on: its base "
                "loads with the built-in code (pass --trust-remote-code if you trust %s)", path, recorded,
            )
    elif (path / "adapter_config.json").is_file():
        adapter_dir = path
        recorded = read_adapter_config(path).get("base_model_name_or_path")
    else:
        raise ConfigError(f"{path}: neither a RunDir with adapter/ nor an adapter folder (no adapter_config.json)")
    model_cfg = config_from_dict(ModelConfig, {**saved, "trust_remote_code": trust_remote_code}, f"{path}/config.yaml (model)")
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
# PEFT inits whose adapter only means something on the base PEFT changed for it (a residual, a quantization).
_BASE_BOUND_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def check_combinable_init(source: AdapterSource, config: dict, combination_type: str) -> None:
    """Refuse adapters whose start a weighted combination would get wrong, naming the adapter and why.

    - PEFT-format PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapters (init_lora_weights says so): they belong on the
      base PEFT rewrote for them, not on this one;
    - LoftQ (align): each carries its base's quantization error, which weights other than one would scale;
    - PiSSA/OLoRA saved by align: standard LoRAs [A; A0], [B, -B0]; cat and svd sum their updates exactly,
      but linear multiplies summed factors, and the starts (the large principal part of W) no longer cancel.
    """
    from align.modeling.lora_init import saved_init

    raw = config.get("init_lora_weights")
    if isinstance(raw, str) and raw.lower().startswith(_BASE_BOUND_INITS):
        raise ConfigError(
            f"combine: {source.adapter_dir} is a PEFT {raw} adapter (adapter_config.json init_lora_weights), defined on "
            "the residual base PEFT made for it; convert it to a standard LoRA first (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    section = source.run.config().get("lora") if source.run is not None else None
    init = saved_init(source.adapter_dir) or (section.get("init") if isinstance(section, dict) else None)
    init = init if isinstance(init, str) else "default"  # a run dir is data: anything else means PEFT's default
    if init == "loftq":
        raise ConfigError(
            f"combine: {source.adapter_dir} was trained with lora.init loftq: it starts at its 4-bit base's quantization "
            "error, which a weighted combination would scale or mix away; combine adapters of other inits"
        )
    if combination_type == "linear" and init.startswith(("pissa", "olora")):
        raise ConfigError(
            f"combine: --type linear cannot combine {source.adapter_dir} (lora.init {init}): it is saved as [A; A0], "
            "[B, -B0], and weighting A and B separately leaves the start's cross terms, which are large; use --type cat "
            "(the exact weighted sum) or svd"
        )


def combine_adapters(sources: list[AdapterSource], weights: list[float], combination_type: str, out_dir: Path) -> Path:
    """Weighted combination of LoRA adapters of one base, saved as a new standard adapter (atomically).

    linear: A and B are each a weighted sum (equal ranks; the product mixes cross terms);
    cat: A and B are stacked, so the update is exactly sum(w_i * B_i A_i) at rank sum(r_i);
    svd: that exact sum truncated back to the largest rank by SVD.
    """
    import dataclasses
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
        config = read_adapter_config(s.adapter_dir)
        if config.get("use_dora"):
            raise ConfigError(f"combine: {s.adapter_dir} is a DoRA adapter; its magnitude vectors are not combined by PEFT, so the result would be wrong")
        if config.get("modules_to_save"):
            raise ConfigError(f"combine: {s.adapter_dir} also trains whole modules ({config['modules_to_save']}, e.g. a reward head); those cannot be weighted")
        check_combinable_init(s, config, combination_type)
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
        mark_output(tmp, "combine")
    return out_dir
