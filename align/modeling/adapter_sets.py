"""Saved adapters as the command line gives them (`align merge/generate/export/combine/push/lm-eval`): an adapter
folder or a run dir resolved to its adapter and the base it was trained on, several adapters of one base loaded
as a set, and weighted combinations of LoRA adapters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from align.core.artifacts import RunDir, mark_output
from align.core.errors import ConfigError
from align.core.files import atomic_dir
from align.modeling.adapters import peft_type, read_adapter_config

log = logging.getLogger("align")

if TYPE_CHECKING:
    from align.core.config import ModelConfig
    from align.modeling.models import ModelRef


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
    from align.core.config import ModelConfig
    from align.core.config_loader import config_from_dict
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
