"""Methods comparison: the same SFT (and DPO) run with each PEFT method, and a table of the results.

Every method runs the same stage YAMLs with the same steps, data and seed; only `peft.method`
and the per-method overrides (typically the learning rate) differ. DPO starts from the SFT
config's base model for every method, so its figures compare methods, not SFT outcomes.
Each stage runs in its own process by default, so its peak memory is its own. Finished runs
that match their config are skipped, so an interrupted comparison continues where it stopped.

The table (comparison.md, comparison.json, and a W&B table) has, per method: trainable
parameters and their share, adapter size on disk, peak memory and seconds per step of each
stage, the final held-out SFT loss, and the DPO held-out reward accuracy.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.core.artifacts import RunDir

from align.core.files import atomic_write_json, atomic_write_text
from align.core.config import PEFT_METHODS, RunConfig, StageConfig, opt
from align.core.config_loader import describe, load_config, parse_overrides, to_yaml
from align.core.errors import AlignError, ConfigError
from align.core.tracking import Tracker
from align.stages.registry import get_stage, load_stage_config, run_stage

log = logging.getLogger("align")

TABLE = "comparison.md"


@dataclass
class CompareConfig(RunConfig):
    """The same SFT (and DPO) run with each PEFT method, same steps and seed, and a table comparing them."""

    output_dir: str | None = opt(None, "Runs go to <output_dir>/<method>/{sft,dpo}; the table to comparison.md (required).")
    methods: list[Literal[PEFT_METHODS]] = opt(list(PEFT_METHODS), "Methods to compare, in table order.", nonempty=True)  # type: ignore[valid-type]
    sft_config: str = opt("sft.yaml", "The SFT stage YAML every method runs, relative to this file.")
    dpo_config: str | None = opt(
        "dpo.yaml",
        "The DPO stage YAML, relative to this file; null = SFT only. DPO starts from the SFT config's base model "
        "(the same for every method), not from each method's SFT run: prompt and prefix tuning have no merged model.",
    )
    dpo_methods: list[Literal[PEFT_METHODS]] | None = opt(  # type: ignore[valid-type]
        None, "Methods that also run DPO; null = all of methods (every method has a DPO reference, see README); [] = none.",
        any_value="any subset of methods, [] included (checked against methods)",
    )
    overrides: dict[str, Any] = opt({}, "Dotted overrides for both stages of every method (train.max_steps: 8).")
    sft_overrides: dict[str, Any] = opt({}, "Dotted overrides for the SFT stage only.")
    dpo_overrides: dict[str, Any] = opt({}, "Dotted overrides for the DPO stage only.")
    method_overrides: dict[str, Any] = opt(
        {}, "Per method, dotted overrides for both its stages, e.g. {full: {train.learning_rate: 2.0e-5}}."
    )
    isolate: bool = opt(True, "Run each stage in its own process, so its peak memory is its own (and a crash stays local).")

    stage = "compare"

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: required (where the runs and the table go)")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: a method is listed twice ({self.methods})")
        for m in self.dpo_methods or []:
            if m not in self.methods:
                raise ConfigError(f"dpo_methods: '{m}' is not one of methods ({', '.join(self.methods)})")
        for m, extra in self.method_overrides.items():
            if m not in PEFT_METHODS:
                close = difflib.get_close_matches(str(m), PEFT_METHODS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"method_overrides.{m}: not a PEFT method{hint}")
            if not isinstance(extra, dict):
                raise ConfigError(f"method_overrides.{m}: expected a mapping of dotted keys, got {type(extra).__name__}")


def _dotted(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{train: {max_steps: 1}} and {train.max_steps: 1} both -> {"train.max_steps": 1}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_configs(cfg: CompareConfig, config_path: Path | None) -> dict[str, dict[str, StageConfig]]:
    """{method: {"sft": SFTConfig, "dpo": DPOConfig}}, all validated before anything runs."""
    here = config_path.parent if config_path else Path.cwd()
    root = Path(cfg.output_dir)
    dpo_methods = cfg.dpo_methods if cfg.dpo_methods is not None else cfg.methods
    out: dict[str, dict[str, StageConfig]] = {}
    for method in cfg.methods:
        shared = {
            **_dotted(cfg.overrides),
            **_dotted(cfg.method_overrides.get(method, {})),
            "peft.method": method,
            "tracking": cfg.tracking,
            "wandb.project": cfg.wandb.project,
            "wandb.entity": cfg.wandb.entity,
            "wandb.group": cfg.wandb.group,
            "wandb.mode": cfg.wandb.mode,
        }
        sft_cfg = load_stage_config(
            "sft", here / cfg.sft_config,
            {**_dotted(cfg.sft_overrides), **shared, "output_dir": str(root / method / "sft"), "wandb.name": f"{method}-sft"},
        )
        out[method] = {"sft": sft_cfg}
        if cfg.dpo_config and method in dpo_methods:
            out[method]["dpo"] = load_stage_config(
                "dpo", here / cfg.dpo_config,
                {
                    **_dotted(cfg.dpo_overrides), **shared,
                    # The same base for every method: prompt and prefix tuning leave no merged SFT model.
                    "parent_run": None,
                    "model.name_or_path": sft_cfg.model.name_or_path,
                    "model.revision": sft_cfg.model.revision,
                    "output_dir": str(root / method / "dpo"),
                    "wandb.name": f"{method}-dpo",
                },
            )
    return out


def _run_stage(stage: str, stage_cfg: StageConfig, config_file: Path, isolate: bool, force: bool) -> None:
    """Run one stage; a failure is recorded in its RunDir (and the table), not raised."""
    atomic_write_text(config_file, f"# python -m align {stage} --config {config_file}\n" + to_yaml(stage_cfg))
    if isolate:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "align", stage, "--config", str(config_file)] + (["--force"] if force else [])
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            log.warning("compare: %s of %s exited with status %d", stage, stage_cfg.peft.method, rc)
        return
    try:
        run_stage(stage_cfg, force=force)
    except Exception as exc:  # noqa: BLE001 - one method failing must not stop the comparison
        log.warning("compare: %s of %s failed: %s", stage, stage_cfg.peft.method, exc)


COLUMNS = [
    "method", "trainable params", "trainable %", "adapter on disk (MB)",
    "SFT peak memory (MB)", "SFT s/step", "SFT held-out loss", "DPO peak memory (MB)", "DPO s/step",
    "DPO step-0 loss", "DPO reward accuracy", "status",
]


def _row(method: str, runs: dict[str, RunDir]) -> list[Any]:
    def summary(stage: str) -> dict:
        run = runs.get(stage)
        return ((run.manifest() or {}).get("summary") or {}) if run else {}

    sft, dpo = summary("sft"), summary("dpo")
    params = sft.get("parameters") or dpo.get("parameters") or {}
    statuses = {stage: (run.status or "not run") for stage, run in runs.items()}
    status = "ok" if all(s == "finished" for s in statuses.values()) else "; ".join(f"{k} {v}" for k, v in statuses.items())
    return [
        method,
        params.get("trainable"),
        params.get("trainable_pct"),
        round(params["adapter_bytes"] / 2**20, 3) if "adapter_bytes" in params else None,
        sft.get("peak_memory_mb"),
        sft.get("seconds_per_step"),
        sft.get("eval_loss_after"),
        dpo.get("peak_memory_mb"),
        dpo.get("seconds_per_step"),
        dpo.get("eval_loss_before"),
        dpo.get("eval_rewards/accuracies_after"),
        status,
    ]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[list[Any]], cfg: CompareConfig, configs: dict[str, dict[str, StageConfig]]) -> str:
    first = next(iter(configs.values()))
    sft = first["sft"]
    steps = [f"SFT {sft.train.max_steps} steps of batch {sft.train.batch_size}"]
    if "dpo" in first:
        steps.append(f"DPO {first['dpo'].train.max_steps} steps of batch {first['dpo'].train.batch_size}")
    lines = [
        "# PEFT methods compared",
        "",
        f"Base `{sft.model.name_or_path}`; SFT data `{sft.data.path}`"
        + (f", DPO data `{first['dpo'].data.path}`" if "dpo" in first else "")
        + f"; {', '.join(steps)}; seed {sft.train.seed}. Peak memory is the stage process's peak resident set "
        "(CUDA: peak allocated); seconds per step exclude evaluation. DPO starts from the same base for every method; "
        "its step-0 loss is ln 2 = 0.6931 where a fresh adapter has no effect.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" if c in ("method", "status") else "---:" for c in COLUMNS) + " |",
        *["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows],
        "",
    ]
    return "\n".join(lines)


def run_comparison(cfg: CompareConfig, config_path: Path | None, force: bool = False) -> tuple[Path, list[list[Any]]]:
    configs = stage_configs(cfg, config_path)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (method, stages) in enumerate(configs.items(), start=1):
        log.info("compare: method %d/%d: %s (%s)", i, len(configs), method, " + ".join(stages))
        for stage, stage_cfg in stages.items():
            _run_stage(stage, stage_cfg, root / method / f"{stage}.yaml", cfg.isolate, force)
        rows.append(_row(method, {stage: RunDir(Path(c.output_dir)) for stage, c in stages.items()}))
    table = root / TABLE
    atomic_write_text(table, markdown(rows, cfg, configs))
    atomic_write_json(root / "comparison.json", [dict(zip(COLUMNS, row)) for row in rows])
    tracker = Tracker.for_config(RunDir(root), cfg, name="compare-methods")
    try:
        tracker.log_table("methods", COLUMNS, rows, step=0)
    finally:
        tracker.finish()
    return table, rows


def main(argv: list[str] | None = None, prog: str = "recipes/compare_methods.py") -> int:
    from align.cli.recipes import guarded, setup_logging

    p = argparse.ArgumentParser(prog=prog, description=(CompareConfig.__doc__ or "").strip())
    p.add_argument("--config", help="comparison YAML (e.g. recipes/configs/smollm2-135m/compare_methods.yaml)")
    p.add_argument("--force", action="store_true", help="rerun stages even when a finished run matches")
    p.add_argument("--print-config", action="store_true", help="print every stage config the comparison runs and exit")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default, valid range and help")
    p.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override keys (methods=[lora,ia3], overrides.train.max_steps=2)")
    args = p.parse_args(argv)
    if args.keys:
        print("\n".join(describe(CompareConfig)))
        return 0
    setup_logging()

    def work() -> int:
        if not args.config:
            raise AlignError("--config: required (e.g. recipes/configs/smollm2-135m/compare_methods.yaml)")
        path = Path(args.config)
        cfg = load_config(CompareConfig, path, parse_overrides(args.overrides))
        if args.print_config:
            for method, stages in stage_configs(cfg, path).items():
                for stage, stage_cfg in stages.items():
                    print(f"# {method} {stage}\n{to_yaml(stage_cfg)}")
            return 0
        table, rows = run_comparison(cfg, path, force=args.force)
        print(Path(table).read_text(encoding="utf-8"))
        print(f"table: {table} (and comparison.json; W&B table 'methods')")
        return 0 if all(row[-1] == "ok" for row in rows) else 1

    return guarded(work, debug=args.debug)

