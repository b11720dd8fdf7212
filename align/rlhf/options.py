"""Config sections of the online methods (online DPO, GRPO, RLOO): reward sources and group options.

Pure config (no torch): stage modules import it at module level, so `--keys` and config
loading stay fast. What the options do at run time is in align/rlhf/rewards.py (reward
sources) and align/rlhf/group.py (group policy gradient).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from align.core.config import ChildStageConfig, opt
from align.core.errors import ConfigError
from align.evaluation.judges import ANSWER, check_judge_spec


@dataclass
class RewardSource:
    """One reward: a judge or a reward-model RunDir, with its weight in the total."""

    judge: str | None = opt(
        None,
        "A judge: format, refusal, length, answer (the data's 'answer' field is the reference), "
        "rm:<reward RunDir> (loads a second model), or package.module:function. Set judge or reward_run, not both.",
    )
    reward_run: str | None = opt(
        None,
        "A reward-model RunDir: its LoRA adapter and score head are loaded onto this stage's base in memory "
        "(no second model); it must have been trained on the same base.",
    )
    weight: float = opt(
        1.0, "Weight of this source in the total reward (negative penalizes).", any_value="any finite non-zero number (checked with the sources)"
    )
    args: dict[str, Any] = opt({}, "Keyword arguments of a built-in judge, e.g. {max_words: 20} for length.")
    normalize: bool = opt(
        True, "reward_run only: standardize scores with the reward run's reward_stats.json ((score - mean) / std)."
    )
    default: float | None = opt(
        None,
        "Score used where the judge does not apply (returns None, e.g. format on a prompt without a format "
        "instruction); null: the source adds nothing there, and a response no source scores is left out and counted.",
        any_value="any score the source could give",
    )
    nonfinite: Literal["error", "default"] = opt(
        "error",
        "A NaN or inf score from the judge: error = the run fails, naming the judge and a prompt; default = scored "
        "with `default` (left unscored when default is null).",
    )
    name: str | None = opt(None, "Name in metrics (reward/<name>); null = the judge's name, or rm<i> for a reward_run.")


def source_names(sources: list[RewardSource]) -> list[str]:
    """The metric name of each source (config only: a judge spec's own name, rm<i> for reward runs)."""
    names = []
    for i, src in enumerate(sources):
        if src.name:
            names.append(src.name)
        elif src.reward_run:
            names.append(f"rm{i}")
        else:
            spec = src.judge.strip()
            names.append("rm" if spec.startswith("rm:") else spec.rpartition(":")[2] if ":" in spec else spec)
    return names


def validate_sources(sources: list[RewardSource], key: str = "rewards") -> None:
    """Checks of the config alone (types are the loader's): one kind per source, weights, names."""
    if not sources:
        raise ConfigError(f"{key}: at least one reward source is required (e.g. [{{judge: format}}] or [{{reward_run: runs/x/reward}}])")
    for i, src in enumerate(sources):
        where = f"{key}[{i}]"
        if bool(src.judge) == bool(src.reward_run):
            raise ConfigError(f"{where}: set exactly one of judge and reward_run")
        if not math.isfinite(src.weight) or src.weight == 0:
            raise ConfigError(f"{where}.weight: must be a finite non-zero number, got {src.weight}")
        if src.args and not src.judge:
            raise ConfigError(f"{where}.args: only a judge takes arguments")
        if src.default is not None and src.reward_run:
            raise ConfigError(f"{where}.default: a reward model scores every response; default applies to judges only")
        if src.nonfinite != "error" and src.reward_run:
            raise ConfigError(f"{where}.nonfinite: applies to judges only; a reward model's NaN or inf score is always an error")
        if src.judge and src.judge.strip() == ANSWER and src.args:
            raise ConfigError(f"{where}.args: judge 'answer' takes no arguments (its references come from the data's 'answer' field)")
    names = source_names(sources)
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"{key}[{i}].name: '{name}' is used by {key}[{names.index(name)}] too; give one of them a name")


def check_sources(sources: list[RewardSource], key: str = "rewards") -> None:
    """Pre-flight check (loads no model): each judge spec resolves; a reward_run is a RunDir."""
    from pathlib import Path

    from align.core.artifacts import RunDir

    for i, src in enumerate(sources):
        if src.judge and src.judge.strip() != ANSWER:
            try:
                check_judge_spec(src.judge)
            except ConfigError as exc:
                raise ConfigError(f"{key}[{i}].judge: {exc}") from None
        if src.reward_run and RunDir(Path(src.reward_run)).manifest() is None:
            # In a pipeline the reward stage may not have run yet: only "is it a RunDir" when it exists.
            if Path(src.reward_run).exists():
                raise ConfigError(f"{key}[{i}].reward_run: {src.reward_run} is not a RunDir")


KEEP_BEST_HELP = (
    "Keep as the run's adapter/ the adapter of the held-out evaluation (before the first step, every train.eval_steps, "
    "and the last) with the highest held-out reward whose held-out KL to the reference is at most this budget; the last "
    "adapter stays in the checkpoint of the last step (align/rlhf/keep_best.py). null: adapter/ is the last adapter."
)


def check_keep_best(budget: float | None, eval_prompts: int, section: str) -> None:
    if budget is not None and eval_prompts == 0:
        raise ConfigError(f"{section}.keep_best_within_kl: needs held-out evaluations; {section}.eval_prompts is 0")


# --------------------------------------------------------------------------- GRPO / RLOO

LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")
ADVANTAGE_SCALES = ("group", "batch", "none")


@dataclass
class GroupOptions:
    """Group policy-gradient options (GRPO and RLOO share them; each stage sets its own defaults)."""

    prompts_per_step: int = opt(8, "Prompts sampled per step; each gets group_size responses.", min=1)
    group_size: int = opt(4, "Responses sampled per prompt, the group whose rewards form the baseline (so at least 2).", min=2)
    epochs: int = opt(
        1,
        "Passes over each rollout batch. Each pass runs micro-batches of train.batch_size responses, an optimizer "
        "update every train.gradient_accumulation_steps of them; with more than one update per step the policy ratio "
        "and its clipping matter.",
        min=1,
    )
    max_new_tokens: int = opt(32, "Longest sampled response.", min=1)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling.", gt=0, max=1)
    kl_coef: float = opt(0.04, "Weight of the KL to the reference (the base with adapters disabled); 0 skips the reference pass.", min=0)
    kl_in: Literal["loss", "reward"] = opt(
        "loss",
        "Where the KL goes: loss = a per-token penalty added to the policy loss (GRPO); reward = the response's "
        "summed KL subtracted from its reward before the advantages (RLOO).",
    )
    kl_estimator: Literal["k1", "k3"] = opt("k3", "Per-token KL estimate: k1 = log p - log q, k3 = (q/p - 1) - log(q/p) (>= 0).")
    kl_bias_correction: bool = opt(
        True,
        "kl_in: loss only. Weight the per-token KL by the policy ratio (value 1 on the sampling policy), so that its "
        "gradient is the unbiased gradient of KL(policy || reference), as TRL's GRPOTrainer does by default "
        "(use_bias_correction_kl). false: the estimator's own gradient (for k3 in expectation the gradient of the "
        "forward KL, which restrains the policy less: the README's GRPO section measures both).",
    )
    clip_range: float = opt(0.2, "Clip of the policy ratio below 1: [1 - clip_range, ...].", gt=0, lt=1)
    clip_range_high: float | None = opt(
        None, "Clip of the policy ratio above 1: [..., 1 + clip_range_high] (DAPO's clip-higher: 0.28); null = clip_range.", gt=0
    )
    loss_aggregation: Literal[LOSS_AGGREGATIONS] = opt(  # type: ignore[valid-type]
        "sequence_mean",
        "How per-token losses become the loss: sequence_mean = mean over each response's tokens, then over responses "
        "(GRPO); token_mean = every token of the update weighs the same (DAPO); fixed_length = summed over tokens and "
        "divided by responses x max_new_tokens (Dr. GRPO, no length bias).",
    )
    scale_advantages: Literal[ADVANTAGE_SCALES] = opt(  # type: ignore[valid-type]
        "group",
        "Divide advantages by the std of the rewards of their group (GRPO), of the whole batch, or not at all (none).",
    )
    missing_eos_penalty: float | None = opt(
        None, "Subtracted from the reward of a response cut at max_new_tokens without EOS (null: none).", min=0
    )
    eval_prompts: int = opt(16, "Held-out prompts sampled (once each) for the held-out reward and KL (0 disables).", min=0)
    keep_best_within_kl: float | None = opt(None, KEEP_BEST_HELP, gt=0)


@dataclass
class OnlineStageConfig(ChildStageConfig):
    """What every online stage has: reward sources scoring the policy's own samples."""

    rewards: list[RewardSource] = opt(
        [],
        "Reward sources, summed with their weights: a list of {judge: ...} or {reward_run: ...} entries, "
        "each with weight (default 1), args, normalize, default, nonfinite, name.",
        any_value="at least one source; checked with the sources (the error shows an example)",
    )
    unscored_warning: float = opt(
        1.0,
        "Warn when at least this share of a step's (online DPO: a round's) sampled responses went unscored (no "
        "source scored them); 1.0 = only when none was. A run in which no response at all was scored fails.",
        gt=0, max=1,
    )

    def validate(self) -> None:
        super().validate()
        validate_sources(self.rewards)


def group_section(cfg) -> tuple[str, GroupOptions]:
    """The name and value of a group-RL config's one GroupOptions section (grpo:, rloo:, whatever its name)."""
    found = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), GroupOptions)]
    if len(found) != 1:
        raise TypeError(f"{type(cfg).__name__}: a group-RL config has one GroupOptions section, found {len(found)}")
    return found[0]


@dataclass
class GroupStageConfig(OnlineStageConfig):
    """A group-RL method (GRPO, RLOO): one section of GroupOptions (any name; each stage sets its own defaults)."""

    def validate(self) -> None:
        super().validate()
        if self.train.liger_kernel:
            raise ConfigError(f"train.liger_kernel: applies to the TRL trainers (sft, dpo, reward, online_dpo); {self.stage.upper()} runs its own loop")
        name, section = group_section(self)
        check_keep_best(section.keep_best_within_kl, section.eval_prompts, name)
        if not self.train.max_steps:
            raise ConfigError(f"train.max_steps: required for {self.stage.upper()} (the number of sample + update steps)")
        rollout = section.prompts_per_step * section.group_size
        per_update = self.train.batch_size * self.train.gradient_accumulation_steps
        if rollout % per_update:
            raise ConfigError(
                f"train.batch_size: train.batch_size * train.gradient_accumulation_steps ({per_update} responses per "
                f"optimizer update) must divide {name}.prompts_per_step * {name}.group_size ({rollout} responses per step)"
            )


# Why the online stages take the LoRA family only (their registration's method check).
ONLINE_WHY_LORA = (
    "the policy and the reward models are adapters of one base model, and the reference is that base with "
    "adapters disabled; PEFT holds adapters of a single type in one model and reward adapters are LoRA"
)

