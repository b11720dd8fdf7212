"""`align lm-eval RUN --tasks ...`: lm-evaluation-harness tasks on a finished run's model, in process.

    align lm-eval RUN --tasks T[,T...] [--limit N] [--num-fewshot K] [--batch-size B]
                  [--include-path DIR] [--apply-chat-template] [--with-base] [--trust-remote-code]

The run's base and adapter are loaded once (as align trained them: dtype, quantization, chat
template) and every task is scored on that model (align/evaluation/harness.py); --with-base
scores the base too, with the adapter switched off. The results go into the run dir
(lm_eval.jsonl: one row per task and metric; lm_eval.json: the settings and the harness's own
results), into the run's W&B run (resumed; a table and summary figures), and onto the model card
of `align export` / `align push`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.core.errors import ConfigError

from align.modeling.model_card import LM_EVAL_RESULTS as RAW  # <run>/lm_eval.json, read by the model card

TABLE = "lm_eval"  # <run>/lm_eval.jsonl, and the W&B table's name


def _settings(args):
    from align.core.config_loader import config_from_dict
    from align.evaluation.harness import LmEvalConfig

    tasks = [t.strip() for spec in args.tasks for t in spec.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: no task named")
    values = {"tasks": tasks, "limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
              "include_path": args.include_path, "apply_chat_template": args.apply_chat_template, "seed": args.seed}
    return config_from_dict(LmEvalConfig, {k: v for k, v in values.items() if v is not None}, "command line")


def load_run_model(run, trust_remote_code: bool):
    """(model, tokenizer, has_adapter) of a finished run: its base with its adapter, or its full model (peft.method full)."""
    from peft import PeftModel

    from align.core.config import ModelConfig

    from align.core.config_loader import config_from_dict
    from align.modeling import models
    from align.modeling.adapter_sets import resolve_adapter

    if (run.adapter_dir / "adapter_config.json").is_file():
        source = resolve_adapter(run.path, trust_remote_code=trust_remote_code)
        tokenizer = models.load_tokenizer(source.base, source.model_cfg)
        model = PeftModel.from_pretrained(models.load_model(source.base, source.model_cfg), str(source.adapter_dir))
        return model.eval(), tokenizer, True
    if not (run.merged_dir / "config.json").is_file():
        raise ConfigError(f"{run.path}: has neither adapter/ nor merged/ to evaluate")
    saved = {k: v for k, v in (run.config().get("model") or {}).items() if k in ("dtype", "attn_implementation", "chat_template")}
    model_cfg = config_from_dict(ModelConfig, {**saved, "trust_remote_code": trust_remote_code}, f"{run.path}/config.yaml (model)")
    ref = models.ModelRef(str(run.merged_dir), str(run.merged_dir.resolve()), True)
    return models.load_model(ref, model_cfg).eval(), models.load_tokenizer(ref, model_cfg), False


def record(run, rows: list[dict], raw: dict, cfg) -> None:
    """The results into the run dir and its W&B run, holding the run's lock."""
    from align.core.files import atomic_write_json
    from align.core.run_lock import RunLock
    from align.core.tracking import Tracker
    from align.evaluation.harness import COLUMNS, flat_metrics, settings

    manifest = run.manifest() or {}
    config = run.config()
    wandb = config.get("wandb") or {}
    lock = RunLock.acquire(run.path, command="align lm-eval")
    try:
        atomic_write_json(run.path / RAW, {"settings": settings(cfg), "rows": rows, "harness": raw})
        tracker = Tracker(
            run, stage="lm-eval", enabled_wandb=config.get("tracking") == "wandb", project=wandb.get("project", "align"),
            group=wandb.get("group"), name=wandb.get("name"), entity=wandb.get("entity"), mode=wandb.get("mode", "auto"),
            resume_id=manifest.get("wandb_run_id"),
        )
        try:
            step = int((manifest.get("summary") or {}).get("steps") or 0)
            tracker.log(flat_metrics(rows), step=step)
            tracker.log_table(TABLE, COLUMNS, [[r[c] for c in COLUMNS] for r in rows], step=step)
            tracker.set_summary(flat_metrics(rows))
        finally:
            tracker.finish()
    finally:
        lock.release()


def cmd_lm_eval(args) -> int:
    from align.evaluation.harness import Harness, table_lines, task_manager
    from align.stages.stage_run import finished_parent

    cfg = _settings(args)
    run = finished_parent(args.run, key="RUN")
    tasks = task_manager(cfg, keys=("--tasks", "--include-path"))
    model, tokenizer, has_adapter = load_run_model(run, args.trust_remote_code)
    if args.with_base and not has_adapter:
        raise ConfigError(f"--with-base: {run.path} has no adapter to switch off (its whole model was trained)")
    label = str((run.manifest() or {}).get("stage", "run"))
    harness = Harness(model, tokenizer, cfg, tasks)
    rows, raw = harness.score(label)
    raw = {label: raw}
    if args.with_base:
        with model.disable_adapter():
            base_rows, raw["base"] = harness.score("base")
        rows = base_rows + rows
    record(run, rows, raw, cfg)
    print("\n".join(table_lines(rows)))
    print(f"results: {Path(run.path) / (TABLE + '.jsonl')} and {Path(run.path) / RAW}"
          + ("; W&B run " + (run.manifest() or {})["wandb_run_id"] if (run.manifest() or {}).get("wandb_run_id") else ""))
    return 0


def main(argv: list[str] | None = None, prog: str = "align lm-eval") -> int:
    from align.cli.recipes import run_command

    p = argparse.ArgumentParser(prog=prog, description="lm-evaluation-harness tasks on a finished run's model, loaded once.")
    p.add_argument("run", help="a finished RunDir")
    p.add_argument("--tasks", action="append", required=True, metavar="T[,T...]", help="harness tasks or groups (repeat or comma-separate)")
    p.add_argument("--limit", type=float, help="documents per task: a count, or a fraction (< 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, help="requests per forward pass (default 8)")
    p.add_argument("--include-path", help="a folder of your own task YAMLs")
    p.add_argument("--apply-chat-template", action="store_true", default=None, help="prompts through the model's chat template")
    p.add_argument("--seed", type=int, help="few-shot, numpy and torch seed (default 1234, the harness's)")
    p.add_argument("--with-base", action="store_true", help="also score the base with the adapter switched off")
    p.add_argument("--trust-remote-code", action="store_true", help="let the base model's own code run (never taken from the run dir)")
    return run_command(p, argv, cmd_lm_eval, prog)


if __name__ == "__main__":
    sys.exit(main())
