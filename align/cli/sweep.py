"""A sweep: one stage run over a grid of values (its KL knob, its learning rate, any key), then optionally an eval.

    python recipes/sweep.py --config recipes/configs/smollm2-135m/dpo.yaml \\
        --values beta=0.05,0.1,0.3 --values lr=1e-4,3e-4 --eval recipes/configs/smollm2-135m/eval.yaml

Each grid point is an ordinary run of the stage (through the registry), in its own RunDir
`<output_dir>/<label=value_...>`, all in one W&B group. `beta` (also `kl`, `kl_coef`) names the
stage's KL knob (its record's kl_knob: dpo.beta for DPO, ppo.kl_coef for PPO, ...), `lr` names
train.learning_rate, and any dotted key of the stage config can be swept as well. Every point's
config is loaded and checked before the first run starts, so a bad value or key costs seconds and
the error names it. A finished run whose config matches is skipped (the stage's own rule), so an
interrupted sweep is rerun with the same command (`--resume` also continues an interrupted run
from its newest checkpoint). DPO-family runs after the first take their reference log-probs from
the on-disk cache (align/preference/ref_cache.py): the sweep logs each run's cache hits.

With `--eval <eval.yaml>` the sweep ends with the eval stage over every run plus the baseline (the
runs' parent_run, the SFT run): win rates, the reward-vs-KL frontier and the pick at each KL budget.

A sweep can also be a YAML file (`values:` at its top level marks one; see SweepConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align.core.config import RunConfig, StageConfig, opt

from align.core.config_loader import check_stage_file, config_file_kind, describe, load_config, parse_overrides, to_yaml
from align.core.errors import AlignError, ConfigError
from align.cli.sweep_grid import SET_BY_SWEEP, Axis, format_value, get, grid, labels, parse_values, resolve_key, run_name
from align.stages.registry import get_stage, load_stage_config, run_stage

log = logging.getLogger("align")

SWEEP_FILE = "sweep.json"
SWEEP_MARK = "align_sweep"


@dataclass
class SweepConfig:
    """A grid of runs of one stage, optionally followed by an evaluation of all of them."""

    name: str | None = opt(None, "Sweep name: the W&B group of every run; default: the output folder's name.")
    stage: str | None = opt(None, "The stage every run is (dpo, simpo, ppo, grpo, ...); default: from the stage YAML's name or first line.")
    config: str | None = opt(None, "The stage's YAML (relative to this file); every grid point overrides it.")
    output_dir: str | None = opt(None, "The sweep's folder: one RunDir per grid point, eval/, the report; default: <stage output_dir>-sweep.")
    values: dict[str, Any] = opt(
        {}, "Swept keys -> list of values: beta (the stage's KL knob), lr (train.learning_rate), or any dotted key.",
        nonempty=True,
    )
    overrides: dict[str, Any] = opt({}, "Dotted key: value overrides applied to every run.")
    eval: str | None = opt(None, "Eval YAML (relative to this file): after the runs, compare them all with the baseline.")
    eval_overrides: dict[str, Any] = opt({}, "Dotted key: value overrides of the eval config (its runs are set by the sweep).")
    resume: bool = opt(False, "Continue interrupted runs from their newest complete checkpoint.")

    def validate(self) -> None:
        if not self.config:
            raise ConfigError("config: required (the stage's YAML)")
        for key, vals in self.values.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"values.{key}: a non-empty list of values, got {vals!r}")


@dataclass
class Point:
    name: str
    values: dict[str, Any]  # dotted key -> the value the run's config holds
    cfg: RunConfig


@dataclass
class Sweep:
    cfg: SweepConfig
    stage: str
    root: Path
    group: str
    axes: list[Axis]
    points: list[Point]
    eval_cfg: RunConfig | None = None
    source: str = "command line"


# --------------------------------------------------------------------------- planning (everything checked, nothing written)


def _stage_of(cfg: SweepConfig, config_path: Path) -> str:
    from align.stages.registry import all_stages

    if cfg.stage:
        get_stage(cfg.stage)  # unknown stage: ConfigError with did-you-mean
        return cfg.stage
    stages = all_stages()
    if config_path.stem in stages:
        return config_path.stem
    try:
        first = config_path.read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        first = []
    match = re.match(r"#\s*python\s+\S*recipes/(\w+)\.py\b", first[0]) if first else None
    if match and match.group(1) in stages:
        return match.group(1)
    raise ConfigError(f"stage: required (--stage or stage:): {config_path.name} does not name a stage")


def plan(cfg: SweepConfig, stage_overrides: dict[str, Any], base_dir: Path, source: str = "command line",
         where: dict[str, str] | None = None) -> Sweep:
    """Every run's config loaded and checked, and the eval's, before anything is written.

    `stage_overrides`: keys set for every run; `where`: where each of them and each `values` key
    was given (error messages name it); `base_dir`: what `config` and `eval` are relative to.
    """
    from align.core.artifacts import check_output_dir, folder_kind

    where = where or {}
    config_path = Path(cfg.config) if Path(cfg.config).is_absolute() else base_dir / cfg.config
    if not config_path.is_file():
        raise ConfigError(f"{source}: config: {config_path}: config file not found")
    sweep_file = Path(source) if _is_sweep_file(Path(source)) else Path()  # `source` is the stage YAML on a command line
    check_stage_file(config_path, sweep_file, f"{source}: config", "sweep")
    stage = _stage_of(cfg, config_path)
    stage_cls = get_stage(stage).config
    if not issubclass(stage_cls, StageConfig):
        raise ConfigError(f"stage: {stage} is not a training stage; a sweep runs a training stage (then --eval)")
    for key in stage_overrides:
        if key in SET_BY_SWEEP:
            raise ConfigError(f"{where.get(key, 'command line')}: {key}: set by the sweep for every run (output_dir: the sweep's folder)")

    keys: dict[str, Axis] = {}
    for name, vals in cfg.values.items():
        here = where.get(f"values.{name}", f"--values {name}")
        key = resolve_key(stage, name, where=here)
        if key in keys:
            raise ConfigError(f"{here}: {key} is swept twice ({keys[key].where} too)")
        dup = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
        if dup is not None or vals.count(None) > 1:
            raise ConfigError(f"{here}: the value {dup!r} is given twice")
        keys[key] = Axis(key, "", tuple(vals), here)
    short = labels(list(keys))
    axes = [dataclasses.replace(a, label=short[k]) for k, a in keys.items()]

    given_root = {"output_dir": cfg.output_dir} if cfg.output_dir else {}
    probe = load_stage_config(stage, config_path, {**stage_overrides, **given_root}, override_where=where)  # the base config alone
    root = Path(cfg.output_dir) if cfg.output_dir else Path(f"{probe.output_dir.rstrip('/')}-sweep")
    if folder_kind(root) in ("run", "legacy", "file"):
        raise ConfigError(f"output_dir: {root} is {'a file' if folder_kind(root) == 'file' else 'an align run dir'}; "
                          "a sweep's folder holds one run dir per grid point: choose another")
    _check_sweep_file(root)
    group = cfg.name or root.resolve().name

    points, seen = [], {}
    for combo in grid(axes):
        overrides = {**stage_overrides, **{a.key: v for a, v in combo}}
        at = {**where, **{a.key: a.where for a, _ in combo}}
        # The folder name comes from the typed values the config holds (1e-4 and 0.0001 are one value).
        point_cfg = load_stage_config(stage, config_path, {**overrides, "output_dir": str(root / "_")}, override_where=at)
        typed = [(a, get(point_cfg, a.key)) for a, _ in combo]
        name = run_name([(a.label, v) for a, v in typed])
        if name in seen:
            a, x, y = next(((a, x, y) for (a, x), (_, y) in zip(seen[name], combo) if x != y), (combo[0][0], "", ""))
            raise ConfigError(f"{a.where}: {x!r} and {y!r} are the same value ({a.label}={format_value(get(point_cfg, a.key))})")
        seen[name] = combo
        extra = {"output_dir": str(root / name), "wandb.group": group, "wandb.name": f"{group}-{name}", "resume": cfg.resume}
        point_cfg = load_stage_config(stage, config_path, {**overrides, **extra}, override_where={**at, **{k: "sweep" for k in extra}})
        check_output_dir(root / name, key=f"output_dir of run {name}")
        points.append(Point(name, {a.key: v for a, v in typed}, point_cfg))

    sweep = Sweep(cfg, stage, root, group, axes, points, source=source)
    if cfg.eval:
        sweep.eval_cfg = _eval_config(sweep, base_dir)
    return sweep


def _eval_config(sweep: Sweep, base_dir: Path):
    """The eval over every run plus the baseline: the runs' parent (the SFT run), else the eval YAML's baseline run."""
    cfg = sweep.cfg
    path = Path(cfg.eval) if Path(cfg.eval).is_absolute() else base_dir / cfg.eval
    if not path.is_file():
        raise ConfigError(f"eval: {path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None  # the loader below names the problem and its line
    raw = raw if isinstance(raw, dict) else {}
    baseline_name = cfg.eval_overrides.get("baseline", raw.get("baseline", get_stage("eval").config.baseline))
    parents = {getattr(p.cfg, "parent_run", None) for p in sweep.points}
    parent = parents.pop() if len(parents) == 1 else None
    yaml_runs = raw.get("runs") if isinstance(raw.get("runs"), dict) else {}
    baseline = parent or yaml_runs.get(baseline_name)
    if not baseline:
        raise ConfigError(f"{path}: runs.{baseline_name}: the baseline's RunDir is needed (the sweep's runs have no parent_run)")
    if any(p.name == baseline_name for p in sweep.points):
        raise ConfigError(f"{path}: baseline: '{baseline_name}' is also the name of a sweep run")
    runs = {baseline_name: str(baseline), **{p.name: str(sweep.root / p.name) for p in sweep.points}}
    overrides = {**cfg.eval_overrides, "runs": runs, "output_dir": str(sweep.root / "eval"), "wandb.group": sweep.group}
    return load_stage_config("eval", path, overrides, override_where={
        **{k: f"eval.{k} override" for k in cfg.eval_overrides}, "runs": "sweep", "output_dir": "sweep", "wandb.group": "sweep"})


def _check_sweep_file(root: Path) -> None:
    import json

    path = root / SWEEP_FILE
    if path.exists():
        try:
            ours = SWEEP_MARK in json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise ConfigError(f"output_dir: {path} exists and was not written by align's sweep; it is never replaced")


# --------------------------------------------------------------------------- running


def ref_cache_figures(summary: dict) -> tuple[int, int] | None:
    """(hits, misses) of the reference cache in a run's summary (top level, or a stage's fast-path section)."""
    for section in (summary, *(v for v in summary.values() if isinstance(v, dict))):
        if "ref_cache_hits" in section:
            return int(section["ref_cache_hits"]), int(section.get("ref_cache_misses") or 0)
    return None


def _record(sweep: Sweep, outcomes: list[dict], eval_dir: Path | None = None) -> None:
    from align.core.files import atomic_write_json

    sweep.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.root / SWEEP_FILE, {
        SWEEP_MARK: 1, "name": sweep.group, "stage": sweep.stage,
        "axes": [{"key": a.key, "label": a.label, "values": list(a.values)} for a in sweep.axes],
        "runs": outcomes, "eval": str(eval_dir) if eval_dir else None,
    })


def run_sweep(sweep: Sweep, force: bool = False) -> tuple[list[dict], Path | None]:
    """Run every grid point (finished matching runs are skipped), then the eval; returns each run's outcome and the eval dir."""
    from align.core.artifacts import RunDir

    outcomes: list[dict] = []
    log.info("sweep %s: %d %s runs (%s) in %s", sweep.group, len(sweep.points), sweep.stage,
             " x ".join(f"{a.key} {list(a.values)}" for a in sweep.axes), sweep.root)
    for i, point in enumerate(sweep.points, 1):
        before = RunDir(Path(point.cfg.output_dir)).manifest() or {}
        log.info("== sweep %s: run %d/%d: %s", sweep.group, i, len(sweep.points), point.name)
        run_dir = run_stage(point.cfg, force=force)
        after = run_dir.manifest() or {}
        skipped = bool(before) and before.get("run_id") == after.get("run_id")
        outcome = {"name": point.name, "values": point.values, "output_dir": str(run_dir.path), "run_id": after.get("run_id"),
                   "status": after.get("status"), "skipped": skipped}
        cache = ref_cache_figures(after.get("summary") or {})
        if cache is not None:
            outcome.update(ref_cache_hits=cache[0], ref_cache_misses=cache[1])
            log.info("sweep: %s: reference log-probs: %d from the cache, %d computed%s", point.name, cache[0], cache[1],
                     " (finished earlier)" if skipped else "")
        outcomes.append(outcome)
        _record(sweep, outcomes)
    later = [o for o in outcomes[1:] if "ref_cache_hits" in o]
    if later:
        reused = [o for o in later if o["ref_cache_hits"] > 0]
        log.info("sweep: reference cache: %d of %d runs after the first reused it (%d hits, %d computed)", len(reused), len(later),
                 sum(o["ref_cache_hits"] for o in later), sum(o["ref_cache_misses"] for o in later))
        for o in later:
            if o["ref_cache_hits"] == 0:
                log.warning("sweep: %s computed every reference log-prob (dpo.ref_cache off, or other data, base or precision?)", o["name"])
    eval_dir = None
    if sweep.eval_cfg is not None:
        log.info("== sweep %s: eval of %d runs and the baseline", sweep.group, len(sweep.points))
        eval_dir = run_stage(sweep.eval_cfg, force=force).path
        _record(sweep, outcomes, eval_dir)
    return outcomes, eval_dir


# --------------------------------------------------------------------------- command line


def _is_sweep_file(path: Path) -> bool:
    """A sweep YAML has `values:` at its top level (no stage config has that key)."""
    return config_file_kind(path) == "sweep"


def _route(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """key=value overrides -> (sweep keys, eval keys `eval.<key>`, every run's keys)."""
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    own, ev, runs = {}, {}, {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head == "eval" and rest:
            ev[rest] = value
        elif head in fields and (not rest or head in ("values", "overrides", "eval_overrides")):
            own[key] = value
        else:
            runs[key] = value
    return own, ev, runs


def load_sweep(config: str, values: list[str], eval_path: str | None, stage: str | None, overrides: dict[str, Any],
               resume: bool = False) -> Sweep:
    """The sweep of a command line: `--config` is a stage YAML (with --values) or a sweep YAML."""
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"--config: {path}: config file not found")
    own, ev, runs = _route(overrides)
    cli_values = parse_values(values)
    where = {k: "command line" for k in runs}
    if _is_sweep_file(path):
        cfg = load_config(SweepConfig, path, own)
        base_dir = path.parent
        from align.core.config_loader import _yaml_with_lines  # the YAML's line of each values/overrides key, for errors

        _, lines = _yaml_with_lines(path.read_text(encoding="utf-8"), str(path))
        where.update({f"values.{k}": f"{path}:{lines.get(f'values.{k}', '?')}: values.{k}" for k in cfg.values})
        where.update({k: f"{path}:{lines.get(f'overrides.{k}', '?')}: overrides" for k in cfg.overrides if k not in runs})
    else:
        if not cli_values and not any(k.startswith("values") for k in own):
            raise ConfigError(f"--values: required with a stage config ({path.name}), e.g. --values beta=0.05,0.1,0.3")
        cfg = load_config(SweepConfig, None, {"config": str(path.resolve()), "values": cli_values, **own})
        base_dir = Path.cwd()
    if stage:
        cfg.stage = stage
    if eval_path:
        cfg.eval = str(Path(eval_path).resolve())
    if resume:
        cfg.resume = True
    cfg.values = {**cfg.values, **cli_values}
    cfg.overrides = {**cfg.overrides, **runs}
    cfg.eval_overrides = {**cfg.eval_overrides, **ev}
    for key in cli_values:
        where[f"values.{key}"] = f"--values {key}"
    return plan(cfg, cfg.overrides, base_dir, source=str(path), where=where)


def main(argv: list[str] | None = None, prog: str = "recipes/sweep.py") -> int:
    from align.cli.recipes import describe_run, guarded, setup_logging

    p = argparse.ArgumentParser(prog=prog, description=(SweepConfig.__doc__ or "").strip())
    p.add_argument("--config", help="the stage's YAML (with --values), or a sweep YAML")
    p.add_argument("--values", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key and its values: beta (the stage's KL knob), lr, or any dotted key; repeat for a grid")
    p.add_argument("--stage", help="the stage (default: from the YAML's name or its first line)")
    p.add_argument("--eval", dest="eval_config", help="eval YAML: after the runs, compare them all with the baseline")
    p.add_argument("--force", action="store_true", help="rerun runs even if a finished RunDir matches")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their newest complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print every run's resolved config and exit")
    p.add_argument("--keys", action="store_true", help="list the keys of a sweep YAML")
    p.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="every run's keys; eval.<key> for the eval; sweep keys (output_dir, name)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before and after the options
    if args.keys:
        print("\n".join(describe(SweepConfig)))
        return 0
    setup_logging()

    def work() -> int:
        if not args.config:
            raise AlignError("--config: required (e.g. recipes/configs/smollm2-135m/dpo.yaml --values beta=0.05,0.1,0.3)")
        sweep = load_sweep(args.config, args.values, args.eval_config, args.stage, parse_overrides(args.overrides), args.resume)
        if args.print_config:
            for point in sweep.points:
                print(f"# run {point.name}\n{to_yaml(point.cfg)}")
            if sweep.eval_cfg is not None:
                print(f"# eval\n{to_yaml(sweep.eval_cfg)}")
            return 0
        outcomes, eval_dir = run_sweep(sweep, force=args.force)
        lines = [f"\n== sweep {sweep.group}: {len(outcomes)} runs in {sweep.root} =="]
        for o in outcomes:
            lines += describe_run(sweep.stage, Path(o["output_dir"]), name=o["name"], skipped=o["skipped"])
            if "ref_cache_hits" in o:
                lines.append(f"  reference cache: {o['ref_cache_hits']} hits, {o['ref_cache_misses']} computed")
        if eval_dir is not None:
            lines += describe_run("eval", eval_dir)
        print("\n".join(lines))
        return 0

    return guarded(work, debug=args.debug)
