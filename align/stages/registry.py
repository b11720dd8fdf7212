"""The stage registry: each stage module registers itself once, and everything else derives from it.

A stage is one module under `align.stages` that defines its config class, its `run`, and the
summary lines its runs print, and ends with `register(Stage(...))`. The recipes' command line,
the pipeline's stage names, `--keys` and config loading all read the registry, so adding a stage
touches that one module.

Stage modules import only light things at module level (configs, this registry), so loading and
checking a config never waits for torch or TRL; their `run` imports the heavy parts.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from align.core.config import RunConfig, StageConfig, check_values, load_config
from align.core.errors import ConfigError
from align.evaluation.judges import check_judge_specs
from align.modeling.methods import check_method

# Modules of this package that are not stages.
_NOT_STAGES = ("registry", "stage_run", "hf_training", "samples", "online_run", "objective_run")


@dataclass(frozen=True)
class Stage:
    """What the rest of align needs to know about a stage."""

    name: str
    config: type[RunConfig]  # its config dataclass; `config.stage` is `name`
    run: Callable[..., Any]  # run(cfg, *, force=False, callbacks=()) -> RunDir
    summary: Callable[[dict], list[str]]  # the stage's own lines about a finished run's summary
    # Pre-flight checks of a validated config that need more than the config itself (judge specs,
    # PEFT method support), run before anything is written; each raises ConfigError naming the key.
    checks: tuple[Callable[[Any], None], ...] = field(default=())
    # Defaults filled in from other keys (qlora -> 4-bit), applied once and logged; returns the config.
    resolve: Callable[[Any], Any] | None = None

    @property
    def description(self) -> str:
        return (self.config.__doc__ or "").strip().split("\n\n")[0]


_STAGES: dict[str, Stage] = {}
_discovered = False


def register(stage: Stage) -> Stage:
    """Add a stage; its config class must name it (`stage = "<name>"`)."""
    if getattr(stage.config, "stage", None) != stage.name:
        raise ValueError(f"stage {stage.name!r}: its config class {stage.config.__name__} says stage = {stage.config.stage!r}")
    if stage.name in _STAGES and _STAGES[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    _STAGES[stage.name] = stage
    return stage


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

    Idempotent: the recipes, the pipeline (for every stage before the first starts) and each
    stage's `run` call it, so a config built in code is checked the same way as one from a file.
    """
    stage = get_stage(cfg.stage)
    check_values(cfg)  # the schema's ranges, for a config built in code (the loader checked a loaded one)
    for check in stage.checks:
        check(cfg)
    return stage.resolve(cfg) if stage.resolve else cfg


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


def load_stage_config(
    stage: str | type, path: str | Path | None, overrides: dict[str, Any] | None = None,
    override_where: dict[str, str] | None = None,
) -> Any:
    """Load a stage's config (by stage name or config class) the way the recipes do: validate, check, resolve.

    Errors name the key and where it was set: the file and line, or the command line.
    """
    cls = get_stage(stage).config if isinstance(stage, str) else stage
    return load_config(cls, path, overrides, prepare=prepare_config, override_where=override_where)
