"""The stage registry: each stage module registers its record once, and everything else reads the record.

A method is one record (`Stage`): its config class, its `run`, the summary lines its runs print, its
pre-flight checks and resolve step, and what the rest of align needs to know about it:
  kl_knob    the key that pulls the policy towards its reference: what a sweep's `beta` names;
  curves     the training curves of its runs in the evaluation report;
  beta_key   the key of the beta of its implicit reward beta * (log p - log p_ref), for the evaluation;
  objective  an offline method trained on the shared objective run: its loss as an object built from its
             config (align/preference/objectives.py: needs a reference or not, length normalization,
             an NLL term);
  estimator  a group-RL method trained on the shared group loop: its advantage estimator
             (align/rlhf/estimators.py).
The command line, the pipeline's stage names, `--keys`, config loading, the sweep, the report, the
evaluation and the shared runs read the record, so adding a method touches its own module (and, for a
new loss or estimator, that one function or class).

`run_stage` runs a stage: the config's checks and resolve step (`prepare_config`), then the stage's
`run` on the prepared config. Stage modules import only light things at module level (configs, this
registry, the objective and estimator classes), so loading and checking a config never waits for
torch or TRL; their `run` imports the heavy parts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import logging
import pkgutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from align.core.config import RunConfig, StageConfig

from align.core.config_loader import check_values, load_config
from align.core.errors import ConfigError
from align.evaluation.judges import check_judge_specs
from align.modeling.methods import LORA_FAMILY, check_method
from align.preference.objectives import Objective
from align.rlhf.estimators import AdvantageEstimator
from align.rlhf.options import ONLINE_WHY_LORA, check_sources

# Modules of this package that are not stages: the registry and the machinery stages share.
_NOT_STAGES = ("registry", "stage_run", "hf_training", "samples", "online_run", "objective_run")


class Curve(NamedTuple):
    """A training curve of a stage's runs in the evaluation report: a metrics.jsonl key and its label."""

    metric: str
    label: str


@dataclass(frozen=True)
class Stage:
    """What the rest of align needs to know about a stage: one record per method."""

    name: str
    config: type[RunConfig]  # its config dataclass; `config.stage` is `name`
    # run(cfg, *, force=False, callbacks=()) -> RunDir, on a config run_stage has prepared. `callbacks` are
    # TrainerCallback objects: an HF-Trainer stage passes them to its trainer (every hook; online DPO to each
    # round's), the own-loop stages (PPO, GRPO, RLOO) call on_train_end(model=...) once training ended. A stage
    # that trains nothing (eval) takes no callbacks.
    run: Callable[..., Any]
    summary: Callable[[dict], list[str]]  # the stage's own lines about a finished run's summary
    # Pre-flight checks of a validated config that need more than the config itself (judge specs,
    # PEFT method support), run before anything is written; each raises ConfigError naming the key.
    checks: tuple[Callable[[Any], None], ...] = field(default=())
    # Defaults filled in from other keys (qlora -> 4-bit), applied once and logged; returns the config.
    resolve: Callable[[Any], Any] | None = None
    kl_knob: str | None = None  # dotted key pulling the policy towards its reference (a sweep's `beta`)
    curves: tuple[Curve, ...] = ()  # training curves of its runs in the evaluation report
    # Dotted key of the beta of its implicit reward beta * (log p - log p_ref); None: the evaluation's dpo_beta.
    beta_key: str | None = None
    objective: Callable[[Any], Objective] | None = None  # config -> its loss (objective methods)
    estimator: AdvantageEstimator | None = None  # its advantages (group-RL methods)

    @property
    def description(self) -> str:
        return (self.config.__doc__ or "").strip().split("\n\n")[0]

    @property
    def trains(self) -> bool:
        return issubclass(self.config, StageConfig)


_STAGES: dict[str, Stage] = {}
_discovered = False


def register(stage: Stage) -> Stage:
    """Add a stage; its config class must name it (`stage = "<name>"`)."""
    if getattr(stage.config, "stage", None) != stage.name:
        raise ValueError(f"stage {stage.name!r}: its config class {stage.config.__name__} says stage = {stage.config.stage!r}")
    if stage.name in _STAGES and _STAGES[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    for what in ("kl_knob", "beta_key"):
        key = getattr(stage, what)
        if key is not None and not _has_key(stage.config, key):
            raise ValueError(f"stage {stage.name!r}: {what} {key!r} is not a key of {stage.config.__name__}")
    if stage.objective is not None and stage.estimator is not None:
        raise ValueError(f"stage {stage.name!r}: an objective method or a group-RL method, not both")
    _STAGES[stage.name] = stage
    return stage


def _has_key(cls: type, dotted: str) -> bool:
    """Whether a config class has the dotted key (its sections are dataclasses)."""
    head, _, rest = dotted.partition(".")
    fields = {f.name for f in dataclasses.fields(cls)}
    if head not in fields:
        return False
    if not rest:
        return True
    section = typing.get_type_hints(cls)[head]
    return dataclasses.is_dataclass(section) and _has_key(section, rest)


def unregister(name: str) -> None:
    """Remove a stage (tests register throwaway ones)."""
    _STAGES.pop(name, None)


def _discover() -> None:
    """Import every stage module of this package once; each registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if not info.name.startswith("_") and info.name not in _NOT_STAGES:
            importlib.import_module(f"align.stages.{info.name}")


def all_stages() -> dict[str, Stage]:
    """Every registered stage by name."""
    _discover()
    return dict(_STAGES)


def get_stage(name: str) -> Stage:
    stages = all_stages()
    if name not in stages:
        close = difflib.get_close_matches(str(name), list(stages), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown stage '{name}'{hint}; stages: {', '.join(stages)}")
    return stages[name]


def prepare_config(cfg: Any) -> Any:
    """The stage's pre-flight checks, then its resolve step: what a stage runs on.

    Idempotent: config loading, the pipeline (for every stage before the first starts) and run_stage
    call it, so a config built in code is checked the same way as one from a file.
    """
    stage = get_stage(cfg.stage)
    check_values(cfg)  # the schema's ranges, for a config built in code (the loader checked a loaded one)
    for check in stage.checks:
        check(cfg)
    return stage.resolve(cfg) if stage.resolve else cfg


def run_stage(cfg: Any, *, force: bool = False, callbacks=()) -> Any:
    """Run the stage `cfg` is a config of: its checks and resolve step, then its `run`. Returns the RunDir
    (a finished run that matches the config is skipped, unless `force`)."""
    stage = get_stage(cfg.stage)
    cfg = prepare_config(cfg)
    if not stage.trains:
        if callbacks:
            raise ValueError(f"stage {stage.name!r} trains nothing: training callbacks do not apply to it")
        return stage.run(cfg, force=force)
    return stage.run(cfg, force=force, callbacks=callbacks)


def training_checks(methods: tuple[str, ...] | None = None, why: str = "") -> tuple[Callable[[StageConfig], None], ...]:
    """The checks of a training stage: its PEFT method (of `methods`, if it supports only those), its samples
    judge, and that Liger's package is there when asked for."""

    def peft_method(cfg: StageConfig) -> None:
        check_method(cfg, methods, why)

    def samples_judge(cfg: StageConfig) -> None:
        check_judge_specs("samples.judge", [cfg.samples.judge])

    def liger_kernel(cfg: StageConfig) -> None:  # the package only: the device is known once the model is loaded
        if cfg.train.liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError(
                "train.liger_kernel: the liger-kernel package is not installed (pip install 'align[gpu]', "
                "or pip install liger-kernel); or set train.liger_kernel: false"
            )

    return peft_method, samples_judge, liger_kernel, warn_learning_rate


def online_checks() -> tuple[Callable[[StageConfig], None], ...]:
    """The checks of an online stage: a LoRA-family method (the policy and the reward models are adapters of one
    base) and reward sources that resolve."""
    return (*training_checks(LORA_FAMILY, ONLINE_WHY_LORA), lambda cfg: check_sources(cfg.rewards))


_WARNED_RATES: set[tuple[str, float]] = set()


def warn_learning_rate(cfg: StageConfig) -> None:
    """A learning rate above 1 is far outside any sane range (LoRA: about 1e-5 to 1e-3): a warning before
    training, once per stage and value (the checks run again when a stage starts)."""
    lr = cfg.train.learning_rate
    if lr > 1 and (cfg.stage, lr) not in _WARNED_RATES:
        _WARNED_RATES.add((cfg.stage, lr))
        logging.getLogger("align").warning(
            "%s: train.learning_rate: %g is above 1, far outside any sane range (LoRA trains with about 1e-5 to 1e-3): "
            "expect the weights to diverge, which fails the run", cfg.stage, lr,
        )


def fmt(value: Any) -> str:
    """A figure in a summary line: 4 significant digits, n/a when missing."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def before_after(s: dict, label: str, key: str, before: str = "") -> str:
    """`label x (before) -> y` of a held-out figure the summary has as eval_<key>_before and eval_<key>_after."""
    return f"{label} {fmt(s.get(f'eval_{key}_before'))}{f' ({before})' if before else ''} -> {fmt(s.get(f'eval_{key}_after'))}"


def held_out_line(s: dict, *figures: tuple[str, str]) -> str:
    """`  <label> x (step 0) -> y; <label> a -> b; ...`: (label, key) of held-out figures before and after training."""
    first, *rest = figures
    return "  " + "; ".join([before_after(s, *first, "step 0"), *(before_after(s, *figure) for figure in rest)])


def group_summary_lines(s: dict) -> list[str]:
    """A group-RL run's lines: held-out reward before and after, KL to the reference, the adapter kept."""
    from align.rlhf.keep_best import kept_line

    return [f"  {before_after(s, 'held-out reward', 'reward', 'step 0')}, KL to reference {fmt(s.get('eval_kl_after'))}"] + kept_line(s)


def load_stage_config(
    stage: str | type, path: str | Path | None, overrides: dict[str, Any] | None = None,
    override_where: dict[str, str] | None = None,
) -> Any:
    """Load a stage's config (by stage name or config class) the way the recipes do: validate, check, resolve.

    Errors name the key and where it was set: the file and line, or the command line.
    """
    cls = get_stage(stage).config if isinstance(stage, str) else stage
    return load_config(cls, path, overrides, prepare=prepare_config, override_where=override_where)
