"""The grid of a sweep (align/cli/sweep.py): swept names resolved to config keys (`beta` is the stage record's KL
knob, `lr` the learning rate), values parsed, and each grid point's run name."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import re
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from align.core.errors import ConfigError
from align.stages.registry import get_stage

KNOB_ALIASES = ("beta", "kl", "kl_coef")
LR_KEY = "train.learning_rate"
LR_ALIASES = ("lr", "learning_rate")
# Set by the sweep for every run; sweeping them would break the one-folder-per-point layout or the group.
SET_BY_SWEEP = ("output_dir", "wandb.group", "wandb.name", "resume")


@dataclass(frozen=True)
class Axis:
    key: str  # the dotted config key
    label: str  # its name in run folder names
    values: tuple  # as given
    where: str  # where it was given, for errors


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a config class -> its type."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_leaf_paths(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


def resolve_key(stage: str, key: str, where: str | None = None) -> str:
    """The dotted config key a swept name stands for: beta/kl/kl_coef -> the stage's KL knob, lr -> the learning rate."""
    from align.stages.registry import all_stages

    record = get_stage(stage)
    cfg_cls = record.config
    where = where or f"--values {key}"
    if key in KNOB_ALIASES and key not in _leaf_paths(cfg_cls):
        if record.kl_knob is None:
            knobs = ", ".join(f"{s.name}: {s.kl_knob}" for s in all_stages().values() if s.kl_knob)
            raise ConfigError(f"{where}: stage {stage} has no KL knob (stages with one: {knobs}); name a config key instead")
        return record.kl_knob
    if key in LR_ALIASES:
        return LR_KEY
    paths = _leaf_paths(cfg_cls)
    if key in SET_BY_SWEEP:
        raise ConfigError(f"{where}: set by the sweep for every run; it cannot be swept")
    if key not in paths:
        names = [*paths, *KNOB_ALIASES, *LR_ALIASES] if record.kl_knob else [*paths, *LR_ALIASES]
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6) or difflib.get_close_matches(
            key.rpartition(".")[2], [p.rpartition(".")[2] for p in paths], n=1, cutoff=0.8)
        if close and close[0] not in names:
            close = [next(p for p in paths if p.rpartition(".")[2] == close[0])]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: not a key of the {stage} config{hint}")
    return key


def parse_values(items: list[str]) -> dict[str, list]:
    """`--values beta=0.05,0.1` -> {"beta": [0.05, 0.1]}: comma-separated YAML scalars, one key per item."""
    out: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--values '{item}': expected key=value1,value2,... (e.g. beta=0.05,0.1,0.3)")
        if key in out:
            raise ConfigError(f"--values {key}: given twice")
        values = []
        for text in raw.split(","):
            text = text.strip()
            if not text:
                raise ConfigError(f"--values {key}: an empty value in '{raw}'")
            try:
                values.append(yaml.safe_load(text))
            except yaml.YAMLError:
                values.append(text)
        out[key] = values
    return out


def format_value(value: Any) -> str:
    """A value as it appears in a run's folder name: short, only [A-Za-z0-9.+-] characters, and distinct for
    distinct values (a float keeps every digit that tells it apart; a string whose characters had to be
    replaced, or that reads as another value's name, gets a short hash of itself)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # repr: the shortest text that reads back exactly
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value) or "empty"
    text = str(value)
    cleaned = re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "empty"
    if isinstance(value, str) and (cleaned != text or text in ("true", "false", "null", "empty")):
        cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return cleaned


def labels(keys: list[str]) -> dict[str, str]:
    """Each swept key's short label: its last part (lr for the learning rate), or the full key where two would clash."""
    short = {k: "lr" if k == LR_KEY else k.rpartition(".")[2] for k in keys}
    clashes = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {k: (k if v in clashes else v) for k, v in short.items()}


def run_name(point: list[tuple[str, Any]]) -> str:
    """`beta=0.1_lr=0.0003`: the labels and values of one grid point."""
    return "_".join(f"{label}={format_value(value)}" for label, value in point)


def grid(axes: list[Axis]) -> list[list[tuple[Axis, Any]]]:
    """Every combination, the last axis varying fastest."""
    return [list(zip(axes, combo)) for combo in itertools.product(*(a.values for a in axes))]


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
