"""The model card (README.md) of an exported or published adapter, written from its RunDir.

Everything on the card comes from the run's manifest.json and config.yaml and those of its parent
runs: the base model (and the model the pipeline started from), the data (with the fingerprint of
an align-data build.json), the method and its key hyperparameters, the trainable parameters, the
held-out figures of the run and its parents, the W&B run, and the commands that reproduce it.
The YAML metadata on top is what the Hugging Face Hub reads (base_model, library_name, license,
datasets, tags); `hub=True` keeps only values the Hub accepts there (model and dataset ids).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from align.core.artifacts import RunDir
from align.modeling.methods import METHODS
from align.modeling.models import EMBEDDED_MODELS

# Sections every run config has; any other section of a run's config is its objective's options.
COMMON_SECTIONS = ("output_dir", "tracking", "wandb", "model", "data", "peft", "lora", "train", "samples", "resume", "parent_run")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LM_EVAL_RESULTS = "lm_eval.json"  # written into a run dir by `align lm-eval` (align/evaluation/harness.py)


@dataclass
class CardOptions:
    """What the run does not say and the person publishing does: where it goes, and overrides."""

    repo: str | None = None  # the Hub repo id, for the usage snippet
    merged: bool = False  # the model is the adapter merged into its base, not the adapter
    hub: bool = False  # metadata for the Hub: only ids it accepts
    base_model: str | None = None  # overrides the base model id found in the lineage
    license: str | None = None  # overrides the license found for the base model
    config_files: dict[str, str] = field(default_factory=dict)  # run path -> its config's name in the published folder


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def lineage_runs(run: RunDir) -> list[RunDir]:
    """This run, then its parent, up to the run the pipeline started with."""
    out: list[RunDir] = []
    current: RunDir | None = run
    seen = set()
    while current is not None and current.path.resolve() not in seen:
        seen.add(current.path.resolve())
        out.append(current)
        parent = ((current.manifest() or {}).get("parent") or {}).get("path")
        current = RunDir(Path(parent)) if parent else None
    return out


def _lineage(runs: list[RunDir]) -> list[str]:
    out = []
    for current in runs:
        m = current.manifest() or {}
        base = m.get("base_model") or {}
        out.append(f"{m.get('stage', '?')} run {current.path} trained on {base.get('name')} ({base.get('content_hash', 'no hash')})")
    return out


def _run_label(run: RunDir) -> str:
    stage = str((run.manifest() or {}).get("stage", "?"))
    return stage if run.path.name == stage else f"{stage} ({run.path.name})"


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
    judge = summary.get("judge")
    if isinstance(judge, dict):
        rows.append((f"{judge.get('name')} judge ({judge.get('n')} prompts)", _fmt(judge.get("before")), _fmt(judge.get("after"))))
    return rows


# --------------------------------------------------------------------------- what the lineage says


def root_base(runs: list[RunDir]) -> dict:
    """The base model of the first run of the lineage: the model everything started from."""
    return (runs[-1].manifest() or {}).get("base_model") or {}


def base_model_id(base: dict) -> str | None:
    """The Hub id of a base model: an embedded alias's source, or a name that is a Hub id and not a local folder."""
    name = str(base.get("name") or "")
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].hub_id
    if HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def _front_matter(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return {}
    try:
        loaded = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def base_license(base: dict) -> str | None:
    """The base model's license: the embedded model's, or the front matter of the base folder's README.md."""
    name = str(base.get("name") or "")
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].license
    location = base.get("location")
    if location and Path(location).is_dir():
        license_ = _front_matter(Path(location) / "README.md").get("license")
        return str(license_) if license_ else None
    return None


def build_info(data_path: str | None) -> dict | None:
    """The align-data build.json of a data folder (or of the folder a data file is in): its facts and fingerprint."""
    if not data_path or data_path.startswith("bundled:"):
        return None
    path = Path(data_path).expanduser()
    for folder in (path, path.parent, path.parent.parent) if path.exists() else ():
        candidate = folder / "build.json"
        if candidate.is_file():
            raw = candidate.read_bytes()
            try:
                meta = json.loads(raw)
            except ValueError:
                continue
            if isinstance(meta, dict) and "align_data" in meta:
                return {"path": str(candidate), "fingerprint": "sha256:" + hashlib.sha256(raw).hexdigest(), **meta}
    return None


def dataset_ids(runs: list[RunDir]) -> list[str]:
    """Hub dataset ids the lineage trained on: data paths that are Hub ids, and the Hub inputs of align-data builds."""
    ids: list[str] = []
    for current in runs:
        path = str(((current.manifest() or {}).get("dataset") or {}).get("path") or "")
        build = build_info(path)
        candidates = [str(i) for i in (build or {}).get("inputs", [])] if build else [path]
        ids += [c for c in candidates if HUB_ID.match(c) and not Path(c).exists()]
    return list(dict.fromkeys(ids))


def metadata(run: RunDir, options: CardOptions) -> dict:
    """The card's YAML metadata."""
    runs = lineage_runs(run)
    m = run.manifest() or {}
    cfg = run.config()
    base = root_base(runs)
    method = (cfg.get("peft") or {}).get("method", "lora")
    base_id = options.base_model or base_model_id(base) or (None if options.hub else base.get("name"))
    license_ = options.license or base_license(base)
    stages = [str((r.manifest() or {}).get("stage", "?")) for r in reversed(runs)]
    meta: dict = {}
    if base_id:
        meta["base_model"] = base_id
    meta["library_name"] = "transformers" if options.merged else "peft"
    if license_:
        meta["license"] = license_
    datasets = dataset_ids(runs)
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = list(dict.fromkeys(["align", *stages, method, *([] if options.merged else ["peft"])]))
    meta["pipeline_tag"] = "text-classification" if m.get("stage") == "reward" else "text-generation"
    return meta


# --------------------------------------------------------------------------- the card's sections


def _objective_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in COMMON_SECTIONS and isinstance(v, dict)}


def _method_lines(run: RunDir, cfg: dict, summary: dict) -> list[str]:
    method = (cfg.get("peft") or {}).get("method", "lora")
    params = summary.get("parameters") or {}
    options = cfg.get("lora") if method in ("lora", "qlora", "dora") else (cfg.get("peft") or {}).get(method)
    train = cfg.get("train") or {}
    lines = [
        f"- `{method}`: trains {METHODS[method].trains}" if method in METHODS else f"- `{method}`",
        f"- options: `{options}`" if options else "- options: none",
        f"- DPO reference for this method: {METHODS[method].reference}" if method in METHODS else "",
        *_saved_as(run),
        f"- trainable parameters: {params.get('trainable', 0):,} of {params.get('total', 0):,} ({_fmt(params.get('trainable_pct'))}%)",
        f"- adapter size on disk: {params.get('adapter_bytes', 0) / 2**20:.2f} MB",
    ]
    for section, values in _objective_options(cfg).items():
        lines.append(f"- objective `{section}`: " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items() if v is not None))
    keys = ("learning_rate", "lr_scheduler", "warmup_ratio", "max_steps", "num_epochs", "batch_size",
            "gradient_accumulation_steps", "max_length", "seed")
    lines.append("- training: " + ", ".join(f"{k} {_fmt(train[k])}" for k in keys if k in train))
    return [line for line in lines if line]


def _data_lines(runs: list[RunDir]) -> list[str]:
    lines = []
    for current in runs:
        m = current.manifest() or {}
        data = m.get("dataset") or {}
        lines += [
            f"- {m.get('stage', '?')} run: `{data.get('path')}`, hash `{data.get('hash')}`, rows {data.get('rows')}",
        ]
        build = build_info(str(data.get("path") or ""))
        if build:
            written = (build.get("counts") or {}).get("written")
            lines += [
                f"  - align-data build.json fingerprint `{build['fingerprint']}` ({build['path']})",
                f"  - built {build.get('created')} from {', '.join(f'`{i}`' for i in build.get('inputs', []))} "
                f"(format {build.get('format')}, kind {build.get('kind')}); written: {written}",
            ]
            if build.get("command"):
                lines.append(f"  - command: `{build['command']}`")
    return lines


def _metric_rows(runs: list[RunDir]) -> list[str]:
    rows = []
    for current in runs:
        m = current.manifest() or {}
        label = _run_label(current)
        rows += [f"| {label} | {name} | {before} | {after} |" for name, before, after in _metrics(m.get("summary") or {})]
    return rows


def _lm_eval_rows(runs: list[RunDir]) -> list[str]:
    rows = []
    for current in runs:
        path = current.path / LM_EVAL_RESULTS
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for row in results.get("rows", []) if isinstance(results, dict) else []:
            rows.append(f"| {_run_label(current)} | {row.get('task')} | {row.get('metric')} | {_fmt(row.get('value'))} "
                        f"| {_fmt(row.get('stderr'))} | {row.get('num_fewshot')} | {row.get('limit')} |")
    return rows


def _wandb_lines(runs: list[RunDir]) -> list[str]:
    lines = []
    for current in runs:
        m = current.manifest() or {}
        wandb = current.config().get("wandb") or {}
        run_id = m.get("wandb_run_id")
        if not run_id:
            lines.append(f"- {m.get('stage', '?')}: not tracked in W&B")
            continue
        entity = f"{wandb['entity']}/" if wandb.get("entity") else ""
        where = (m.get("outputs") or {}).get("wandb")
        lines.append(
            f"- {m.get('stage', '?')}: run `{run_id}` in project `{entity}{wandb.get('project')}`, group `{wandb.get('group')}`"
            + (f"; offline files `{where}` (`wandb sync {where}` uploads them)" if where and "offline-run" in str(where) else "")
        )
    return lines


def _reproduce_lines(runs: list[RunDir], options: CardOptions) -> list[str]:
    lines = ["```bash"]
    for current in reversed(runs):
        m = current.manifest() or {}
        config = options.config_files.get(str(current.path), str(current.path / "config.yaml"))
        lines.append(f"align {m.get('stage', '?')} --config {config}")
    lines.append("```")
    versions = (runs[0].manifest() or {}).get("versions") or {}
    commit = (runs[0].manifest() or {}).get("git_commit")
    return [
        "Each run's resolved config, run in order (each names its output_dir and parent_run as on the machine that "
        f"trained it), with align {versions.get('align', '?')}" + (f" at commit `{commit}`" if commit else "") + ":",
        "",
        *lines,
    ]


def _usage_lines(runs: list[RunDir], options: CardOptions) -> list[str]:
    where = options.repo or "<this folder>"
    if options.merged:
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    root = options.base_model or base_model_id(root_base(runs)) or root_base(runs).get("location")
    lines = ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
             f'base = AutoModelForCausalLM.from_pretrained("{root}")']
    for parent in reversed(runs[1:]):  # the adapter was trained on its parents' merged model
        stage = (parent.manifest() or {}).get("stage", "?")
        lines.append(f'base = PeftModel.from_pretrained(base, "<the {stage} adapter: align push {parent.path}>").merge_and_unload()')
    lines += [f'model = PeftModel.from_pretrained(base, "{where}")', "```"]
    if len(runs) > 1:
        lines += ["", "The adapter was trained on its parent runs' merged model (above); `align push --merged` publishes "
                  "the whole model in one folder instead."]
    return lines


def model_card(run: RunDir, options: CardOptions | None = None) -> str:
    options = options or CardOptions()
    runs = lineage_runs(run)
    m = run.manifest() or {}
    cfg = run.config()
    summary = m.get("summary") or {}
    base = m.get("base_model") or {}
    method = (cfg.get("peft") or {}).get("method", "lora")
    stage = m.get("stage", "?")
    train = cfg.get("train") or {}
    what = "model (adapter merged into its base)" if options.merged else "adapter"
    license_ = options.license or base_license(root_base(runs))
    lm_eval = _lm_eval_rows(runs)
    lines = [
        "---",
        yaml.safe_dump(metadata(run, options), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {stage.upper()} {what} ({method})",
        "",
        f"Trained by align's `{stage}` stage with `peft.method: {method}` on `{base.get('name')}`.",
        "",
        "## Base model",
        "",
        f"- name: `{base.get('name')}`",
        f"- location when trained: `{base.get('location')}`",
        f"- content hash: `{base.get('content_hash')}`",
        f"- quantization during training: {(cfg.get('model') or {}).get('quantization', 'none')}",
        "- lineage: " + " <- ".join(_lineage(runs)),
        f"- license: {license_} (the base model's)" if license_ else
        "- license: not found for the base model (its README.md has none); `align push --license` sets it",
        "",
        "## Method",
        "",
        *_method_lines(run, cfg, summary),
        "",
        "## Data",
        "",
        *_data_lines(runs),
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
        "This run and its parents, before and after each stage's training.",
        "",
        "| run | metric | before | after |",
        "| --- | --- | ---: | ---: |",
        *_metric_rows(runs),
        "",
        *(["## Benchmarks (lm-evaluation-harness)", "",
           "| run | task | metric | value | stderr | few-shot | limit |", "| --- | --- | --- | ---: | ---: | ---: | ---: |",
           *lm_eval, ""] if lm_eval else []),
        "## Weights & Biases",
        "",
        *_wandb_lines(runs),
        "",
        "## Reproduce",
        "",
        *_reproduce_lines(runs, options),
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
        *_usage_lines(runs, options),
        "",
    ]
    return "\n".join(lines)
