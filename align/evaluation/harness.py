"""Standard benchmarks through lm-evaluation-harness, in process, on a model align has already loaded.

The harness's HF wrapper (`lm_eval.models.huggingface.HFLM`) takes the loaded model object, so a
run's base and adapter are loaded once (by align's own loader: dtype, quantization, chat template
as trained) and every task, and every policy of an evaluation (an adapter switched on the shared
base), is scored on that one model. The figures are the harness's own: the same as its command
line `lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER` on the same tasks and settings.

Tasks are the harness's (Hub tasks such as ifeval or gsm8k download their data) or local ones: a
task YAML in `include_path` over a local JSON-lines file. A task YAML may name Python functions of
its own folder: include_path is code the user chose to run, like any script they pass.

lm_eval is an optional dependency (`pip install 'align[lm-eval]'`); nothing here imports it until a
benchmark runs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from align.core.config import SEED, opt
from align.core.errors import ConfigError

log = logging.getLogger("align")

INSTALL = "pip install 'align[lm-eval]' (or pip install lm-eval)"
COLUMNS = ["model", "task", "metric", "value", "stderr", "num_fewshot", "samples"]


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks scored on each model (in process, on the model already loaded)."""

    tasks: list[str] = opt([], "Harness task or group names (ifeval, gsm8k, ..., or a local task of include_path); [] skips it.",
                           any_value="any task names")
    limit: float | None = opt(None, "Documents per task: a count (>= 1) or a fraction of the task (< 1); null = all.", gt=0)
    num_fewshot: int | None = opt(None, "Few-shot examples per prompt; null = each task's default.", min=0)
    batch_size: int = opt(8, "Requests per forward pass.", min=1)
    include_path: str | None = opt(None, "A folder of task YAMLs of your own (e.g. one over a local JSON-lines file).")
    apply_chat_template: bool = opt(False, "Render prompts with the model's chat template (instruction tasks such as ifeval).")
    seed: int = opt(1234, "Seed of the harness's few-shot sampling, numpy and torch (its random seed stays 0).", **SEED)


def check_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"lm_eval.tasks: the lm-evaluation-harness is not installed: {INSTALL}")


def task_manager(cfg: LmEvalConfig, keys: tuple[str, str] = ("lm_eval.tasks", "lm_eval.include_path")):
    """The harness's task index for cfg.tasks, every name checked before any model loads.

    Indexing the harness's own ~15,000 task files takes seconds (kept for the process); when
    include_path holds every task asked for, only that folder is indexed.
    """
    check_installed()
    if cfg.include_path is not None:
        if not Path(cfg.include_path).is_dir():
            raise ConfigError(f"{keys[1]}: {cfg.include_path}: no such folder")
        local = _index(str(Path(cfg.include_path).resolve()), False)
        if all(t in local.all_tasks for t in cfg.tasks):
            return local
    manager = _index(str(Path(cfg.include_path).resolve()) if cfg.include_path else None, True)
    known = set(manager.all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        import difflib

        hints = [f"'{t}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(t, known, n=1)) else "")
                 for t in unknown]
        raise ConfigError(f"{keys[0]}: unknown task {', '.join(hints)}; `lm_eval ls tasks` lists the harness's tasks")
    return manager


@functools.lru_cache(maxsize=4)
def _index(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


class Harness:
    """The harness wrapped around one loaded model; `score()` evaluates it as it is now (its active adapter)."""

    def __init__(self, model, tokenizer, cfg: LmEvalConfig, tasks=None):
        from lm_eval.models.huggingface import HFLM

        self.cfg = cfg
        self.tasks = tasks if tasks is not None else task_manager(cfg)
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)

    def score(self, label: str) -> tuple[list[dict], dict]:
        """(table rows, the harness's results without per-sample logs) for every task."""
        import lm_eval

        cfg = self.cfg
        try:
            out = lm_eval.simple_evaluate(
                model=self.lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                task_manager=self.tasks, apply_chat_template=cfg.apply_chat_template, log_samples=False,
                numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
            )
        except Exception as exc:  # noqa: BLE001 - a task's data cannot load (no network for a Hub task), a task fails
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"lm_eval.tasks {', '.join(cfg.tasks)}: the harness failed: {type(exc).__name__}: {first[:300]}") from None
        return result_rows(out, label), {k: out[k] for k in ("results", "n-shot", "n-samples", "versions", "configs") if k in out}


def result_rows(out: dict, label: str) -> list[dict]:
    """One row per (task, metric) of the harness's results: value, its standard error, shots and documents."""
    rows = []
    for task, metrics in out.get("results", {}).items():
        shots = (out.get("n-shot") or {}).get(task)
        samples = ((out.get("n-samples") or {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            name, comma, filter_name = key.partition(",")  # metrics are "<metric>,<filter>"; "sample_len" etc. are not
            if not comma or "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            rows.append({
                "model": label, "task": task, "metric": name if filter_name in ("", "none") else f"{name} ({filter_name})",
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                "num_fewshot": shots, "samples": samples,
            })
    return rows


def settings(cfg: LmEvalConfig) -> dict[str, Any]:
    import lm_eval

    return {**asdict(cfg), "lm_eval": getattr(lm_eval, "__version__", None)}


def flat_metrics(rows: list[dict]) -> dict[str, float]:
    """`<model>/lm_eval/<task>/<metric>` -> value, for the metrics log and W&B."""
    return {f"{r['model']}/lm_eval/{r['task']}/{r['metric']}": r["value"] for r in rows}


def table_lines(rows: list[dict]) -> list[str]:
    """The rows as Markdown lines."""
    out = ["| model | task | metric | value | stderr | few-shot | documents |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        stderr = f"{r['stderr']:.4g}" if r["stderr"] is not None else "n/a"
        out.append(f"| {r['model']} | {r['task']} | {r['metric']} | {r['value']:.4g} | {stderr} | {r['num_fewshot']} | {r['samples']} |")
    return out


def score_policies(policies, names: list[str], cfg: LmEvalConfig) -> dict:
    """Every policy of an evaluation (an adapter switched on the one shared base) on cfg.tasks."""
    harness = Harness(policies.model, policies.tokenizer, cfg)
    rows, raw = [], {}
    for name in names:
        log.info("eval: %s: lm-evaluation-harness %s", name, ", ".join(cfg.tasks))
        with policies.policy(name):
            policy_rows, raw[name] = harness.score(name)
        rows += policy_rows
    return {"settings": settings(cfg), "rows": rows, "harness": raw}
