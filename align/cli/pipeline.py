"""A pipeline: stages run in order, each in `<output_dir>/<stage name>`, one W&B group.

Every stage config is loaded and validated before the first stage starts, so a typo
in the last stage's YAML costs seconds, not a finished SFT run. A stage whose
finished RunDir matches its config, base model, data and parent run is skipped.
Command-line overrides `<stage name>.<key>=value` go to that stage; other keys go
to the pipeline config.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.core.config import PipelineConfig, RunConfig, StageConfig

from align.core.config_loader import check_stage_file, load_config
from align.core.errors import ConfigError
from align.stages.registry import all_stages, get_stage, load_stage_config, run_stage

log = logging.getLogger("align")


@dataclass
class Pipeline:
    cfg: PipelineConfig
    stage_configs: dict[str, tuple[str, RunConfig]]  # name -> (stage kind, resolved config)


def load_pipeline(path: Path, overrides: dict[str, Any] | None = None) -> Pipeline:
    overrides = overrides or {}
    raw = load_config(PipelineConfig, path)  # to learn the stage names
    names = {st.name for st in raw.stages}
    per_stage: dict[str, dict[str, Any]] = {n: {} for n in names}
    own: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in names and rest:
            per_stage[head][rest] = value
        else:
            own[key] = value
    cfg = load_config(PipelineConfig, path, own)
    root = Path(cfg.output_dir)
    known = all_stages()
    for i, st in enumerate(cfg.stages):
        if st.stage not in known:
            close = difflib.get_close_matches(st.stage, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: stages[{i}].stage: unknown stage '{st.stage}'{hint}; stages: {', '.join(known)}")
    configs: dict[str, tuple[str, RunConfig]] = {}
    for i, st in enumerate(cfg.stages):
        stage_overrides: dict[str, Any] = {
            **st.overrides,
            "output_dir": str(root / st.name),
            "wandb.group": cfg.name,
        }
        if cfg.tracking is not None:
            stage_overrides["tracking"] = cfg.tracking
        if cfg.wandb_project is not None:
            stage_overrides["wandb.project"] = cfg.wandb_project
        if cfg.resume and issubclass(known[st.stage].config, StageConfig):  # training stages resume
            stage_overrides["resume"] = True
        if st.parent is not None:
            stage_overrides["parent_run"] = str(root / st.parent)
            stage_overrides["model.name_or_path"] = None
        for key, target in st.links.items():
            stage_overrides[key] = (
                {alias: str(root / name) for alias, name in target.items()} if isinstance(target, dict) else str(root / target)
            )
        # An error in a key the pipeline set names the pipeline file, not the command line.
        where = {key: f"{path} (stages[{i}]{'.overrides' if key in st.overrides else ''})" for key in stage_overrides}
        stage_overrides.update(per_stage[st.name])
        where.update({key: "command line" for key in per_stage[st.name]})
        stage_file = (path.parent / st.config).resolve() if not Path(st.config).is_absolute() else Path(st.config)
        if stage_file.is_file():
            check_stage_file(stage_file, path, f"{path}: stages[{i}].config", "pipeline")
        configs[st.name] = (st.stage, load_stage_config(st.stage, stage_file, stage_overrides, override_where=where))
    return Pipeline(cfg, configs)


def run_pipeline(pipeline: Pipeline, force: bool = False) -> list[tuple[str, str, Path, bool]]:
    """Run every stage; returns (name, stage, run dir, skipped) per stage."""
    from align.core.artifacts import RunDir

    outcomes = []
    for name, (stage, cfg) in pipeline.stage_configs.items():
        before = RunDir(Path(cfg.output_dir)).manifest() or {}
        log.info("== %s (%s) -> %s", name, stage, cfg.output_dir)
        run_dir = run_stage(cfg, force=force)
        after = run_dir.manifest() or {}
        skipped = bool(before) and before.get("run_id") == after.get("run_id")
        outcomes.append((name, stage, run_dir.path, skipped))
    return outcomes
