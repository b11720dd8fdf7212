"""The model card (README.md) of an exported adapter, written from its RunDir.

Everything on the card comes from the run's manifest.json and config.yaml: the base model
(and, through parent runs, the model the pipeline started from), the data, the method and
its options, the trainable parameters, the held-out figures, and where the run lives.
"""

from __future__ import annotations

from pathlib import Path

from align.core.artifacts import RunDir
from align.modeling.methods import METHODS


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _lineage(run: RunDir) -> list[str]:
    """This run's base, then each parent run's, up to the model the pipeline started from."""
    out = []
    current: RunDir | None = run
    seen = set()
    while current is not None and current.path not in seen:
        seen.add(current.path)
        m = current.manifest() or {}
        base = m.get("base_model") or {}
        out.append(f"{m.get('stage', '?')} run {current.path} trained on {base.get('name')} ({base.get('content_hash', 'no hash')})")
        parent = (m.get("parent") or {}).get("path")
        current = RunDir(Path(parent)) if parent else None
    return out


def _saved_as(run: RunDir) -> list[str]:
    """How a LoRA that started away from zero was saved (align_adapter.json), as a card line."""
    from align.modeling.lora_init import saved_facts

    facts = saved_facts(run.adapter_dir)
    return [f"- saved as: {facts['saved_as']} (lora.init {facts.get('lora_init')})"] if isinstance(facts.get("saved_as"), str) else []


def _metrics(summary: dict) -> list[tuple[str, str, str]]:
    """(metric, before, after) for every held-out figure the stage recorded."""
    rows = []
    for key in summary:
        if key.startswith("eval_") and key.endswith("_before"):
            name = key[len("eval_") : -len("_before")]
            rows.append((name, _fmt(summary[key]), _fmt(summary.get(f"eval_{name}_after"))))
    return rows


def model_card(run: RunDir) -> str:
    m = run.manifest() or {}
    cfg = run.config()
    summary = m.get("summary") or {}
    base = m.get("base_model") or {}
    data = m.get("dataset") or {}
    method = (cfg.get("peft") or {}).get("method", "lora")
    params = summary.get("parameters") or {}
    stage = m.get("stage", "?")
    options = cfg.get("lora") if method in ("lora", "qlora", "dora") else (cfg.get("peft") or {}).get(method)
    train = cfg.get("train") or {}
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base.get('name')}",
        f"tags: [align, {stage}, {method}]",
        "---",
        "",
        f"# {stage.upper()} adapter ({method})",
        "",
        f"Trained by align's `{stage}` stage with `peft.method: {method}` on `{base.get('name')}`.",
        "",
        "## Base model",
        "",
        f"- name: `{base.get('name')}`",
        f"- location when trained: `{base.get('location')}`",
        f"- content hash: `{base.get('content_hash')}`",
        f"- quantization during training: {(cfg.get('model') or {}).get('quantization', 'none')}",
        "- lineage: " + " <- ".join(_lineage(run)),
        "",
        "## Method",
        "",
        f"- `{method}`: trains {METHODS[method].trains}" if method in METHODS else f"- `{method}`",
        f"- options: `{options}`" if options else "- options: none",
        f"- DPO reference for this method: {METHODS[method].reference}" if method in METHODS else "",
        *_saved_as(run),
        f"- trainable parameters: {params.get('trainable', 0):,} of {params.get('total', 0):,} ({_fmt(params.get('trainable_pct'))}%)",
        f"- adapter size on disk: {params.get('adapter_bytes', 0) / 2**20:.2f} MB",
        "",
        "## Data",
        "",
        f"- source: `{data.get('path')}`",
        f"- hash: `{data.get('hash')}`",
        f"- rows: {data.get('rows')}",
        "",
        "## Training",
        "",
        f"- steps: {summary.get('steps')}, learning rate {train.get('learning_rate')}, batch size {train.get('batch_size')}, "
        f"max length {train.get('max_length')}, seed {train.get('seed')}",
        f"- train loss (mean): {_fmt(summary.get('train_loss'))}; seconds per step: {_fmt(summary.get('seconds_per_step'))}; "
        f"peak memory: {_fmt(summary.get('peak_memory_mb'))} MB",
        "",
        "## Held-out metrics",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {before} | {after} |" for name, before, after in _metrics(summary)],
        "",
        "## Provenance",
        "",
        f"- RunDir: `{run.path}` (run id `{m.get('run_id')}`, status {m.get('status')})",
        f"- parent run: `{(m.get('parent') or {}).get('path')}`",
        f"- git commit: `{m.get('git_commit')}`; started {m.get('started_at')}, ended {m.get('ended_at')}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in (m.get('versions') or {}).items())}",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base.get("location")}")',
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        "```",
        "",
    ]
    return "\n".join(lines)
