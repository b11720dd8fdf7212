"""Command-line entry points of the recipes: parse config + overrides, run, summarize.

Bad input (AlignError) prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from align.core.config import PipelineConfig

from align.core.config_loader import describe, parse_overrides, to_yaml
from align.core.errors import AlignError


def setup_logging() -> None:
    """align's own progress lines on stderr; libraries keep their own logging."""
    log = logging.getLogger("align")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[align] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # bitsandbytes says on every CPU import that an optional kernels package is missing: harmless.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from the HF stack
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=False, help="YAML config of this recipe")
    p.add_argument("--force", action="store_true", help="run even if a finished RunDir matches")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its newest complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--keys", action="store_true", help="list every config key with its type, default, valid range and help")
    p.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (nested keys with dots)")
    return p


def example_config(name: str) -> str:
    """Where a first config comes from, for `--config: required` messages."""
    return f"`align configs copy smollm2-135m ./c`, then --config ./c/{name}.yaml"


def _with_resume(args) -> dict:
    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = True
    return overrides


def _close_progress_bars() -> None:
    """Close the progress bars a stage stopped inside: an open bar holds its line, and the error would be glued to it."""
    bars = set()
    for module in ("tqdm.std", "tqdm.asyncio", "tqdm.auto"):  # tqdm.auto's class may keep its own set
        bars.update(getattr(getattr(sys.modules.get(module), "tqdm", None), "_instances", ()))
    for bar in bars:
        bar.close()


def guarded(work, debug: bool = False, command: str | None = None) -> int:
    """Run `work()`; bad input is one line on stderr and exit status 2, Ctrl-C is 130.

    A library error inside a stage (StageRun marked the run failed and gave the exception its
    `align_stage_failure` line) is that one line, exit status 1. With `command` set, any other
    exception is one line too (exit status 1); without, it is a bug and keeps its traceback.
    `debug`: every error also prints its full traceback.
    """
    try:
        return work()
    except AlignError as exc:
        _close_progress_bars()
        if debug:
            traceback.print_exception(exc)
        one_line = " ".join(str(exc).split("\n"))  # user text inside a message may hold newlines
        print(f"{getattr(exc, 'label', 'error')}: {one_line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        failure = getattr(exc, "align_stage_failure", None)
        _close_progress_bars()
        if failure:
            if debug:
                traceback.print_exception(exc)
            print(f"error: {failure}", file=sys.stderr)
            return 1
        if command is None or debug:
            raise
        from align.core.redaction import redact_text

        text = " ".join(str(exc).split())
        cause = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        print(f"error: {command} failed: {redact_text(cause)[:300]} (--debug prints the traceback)", file=sys.stderr)
        return 1


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, command, prog: str) -> int:
    """Parse `argv` (a --debug flag added to `parser`), then `command(args)` guarded: every error is one line."""
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(lambda: command(args), debug=args.debug, command=prog)


def recipe_main(stage_name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """One stage: `align <stage> ...` and `recipes/<stage>.py ...` both land here."""
    from align.stages.registry import get_stage, load_stage_config, run_stage

    stage = get_stage(stage_name)
    args = _parser(prog or f"recipes/{stage_name}.py", stage.description).parse_args(argv)
    if args.keys:
        print("\n".join(describe(stage.config)))
        return 0
    setup_logging()

    def work() -> int:
        if not args.config:
            raise AlignError(f"--config: required (e.g. {example_config(stage_name)})")
        cfg = load_stage_config(stage_name, args.config, _with_resume(args))
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        run_dir = run_stage(cfg, force=args.force)
        print("\n".join(describe_run(stage_name, run_dir.path)))
        return 0

    return guarded(work, debug=args.debug)


def pipeline_main(argv: list[str] | None = None, prog: str = "recipes/pipeline.py") -> int:
    args = _parser(prog, "Run the stages of a pipeline in order; finished matching stages are skipped.").parse_args(argv)
    if args.keys:
        print("\n".join(describe(PipelineConfig)))
        return 0
    setup_logging()

    def work() -> int:
        if not args.config:
            raise AlignError(f"--config: required (e.g. {example_config('pipeline')})")
        from align.cli.pipeline import load_pipeline, run_pipeline

        pipeline = load_pipeline(Path(args.config), _with_resume(args))
        if args.print_config:
            for name, (_, cfg) in pipeline.stage_configs.items():
                print(f"# stage {name}\n{to_yaml(cfg)}")
            return 0
        outcomes = run_pipeline(pipeline, force=args.force)
        lines = [f"\n== pipeline {pipeline.cfg.name}: done =="]
        for name, stage, run_dir, skipped in outcomes:
            lines += describe_run(stage, run_dir, name=name, skipped=skipped)
        print("\n".join(lines))
        return 0

    return guarded(work, debug=args.debug)


# --------------------------------------------------------------------------- summaries


def describe_run(stage: str, path: Path, name: str | None = None, skipped: bool = False) -> list[str]:
    """Where a run's outputs are and its before/after figures, from its manifest."""
    from align.core.artifacts import RunDir
    from align.stages.registry import fmt, get_stage

    run = RunDir(path)
    m = run.manifest() or {}
    s = m.get("summary", {})
    out = m.get("outputs", {})
    head = f"{name or stage} ({stage}) {'skipped, already finished' if skipped else m.get('status', '?')}: {path}"
    lines = [head]
    for key in ("adapter", "merged", "metrics", "samples", "report"):
        if key in out:
            lines.append(f"  {key:<8} {path / out[key]}")
    if "wandb" in out:
        lines.append(f"  W&B      {out['wandb']}  (offline runs upload with: wandb sync {out['wandb']})")
    lines += get_stage(stage).summary(s)
    params = s.get("parameters")
    if params and "adapter_bytes" in params:
        method = (run.config().get("peft") or {}).get("method", "lora")
        saved = "model" if method == "full" else "adapter"
        lines.append(
            f"  {method}: {params['trainable']:,} trainable of {params['total']:,} parameters ({params['trainable_pct']:.4g}%), "
            f"{saved} {params['adapter_bytes'] / 2**20:.2f} MB on disk"
        )
    if "judge" in s:
        j = s["judge"]
        lines.append(f"  {j['name']} judge on {j['n']} held-out prompts: {fmt(j['before'])} ({j['before_label']}) -> {fmt(j['after'])}")
    if s.get("wall_time_s") is not None:
        steps = f", {s['steps']} steps" if s.get("steps") is not None else ""
        if s.get("seconds_per_step") is not None:
            steps += f" ({s['seconds_per_step']:.3g} s/step)"
        lines.append(f"  wall time {s['wall_time_s']:.0f} s{steps}, peak memory {fmt(s.get('peak_memory_mb'))} MB")
    return lines
