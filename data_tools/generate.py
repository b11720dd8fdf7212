"""`align-data generate`: on-policy preference pairs.

Sample K responses per prompt from a model (a base model, or with a PEFT adapter from a RunDir),
score each response with a judge, and hand the scored groups to the same pairing, cleaning,
split and output steps as `build` (the default best-vs-worst pairing with --min-margin 0 keeps
only pairs whose chosen score is strictly above the rejected one).

Judges (align.evaluation.judges): a built-in rule judge by name (format, refusal, length), `answer` (the
response must contain the row's reference `answer`, from the prompts file), a Python
`module:function` scorer, or `rm:<RunDir>` for a reward model once that stage registers its
judge factory. Every sample and its score is kept in `samples.jsonl` beside the dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from align.core.errors import ConfigError, DataError
from data_tools.build import BuildConfig, build, check_output
from data_tools.report import Counts
from data_tools.sources.base import Candidate, Drop, Group, Item, RowError, json_cell, messages_value, short_where


@dataclass
class GenerateConfig:
    model: str
    prompts: str
    judge: str
    num_samples: int = 4
    adapter: str | None = None
    judge_args: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 8
    seed: int = 0
    device: str | None = None


@dataclass
class PromptRow:
    prompt: list[dict]
    where: str
    answer: list[str] | None = None


# --------------------------------------------------------------------------- prompts


def read_prompts(spec: str) -> Iterator[PromptRow]:
    """Prompts from a .txt file (one per line) or rows with `prompt` (text or messages),
    `messages` (cut after the last user turn) or `question`/`instruction`; an optional
    `answer` (text or list) is the reference for the answer judge."""
    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: invalid UTF-8 at byte {exc.start} of the line") from None
                if line:
                    yield PromptRow([{"role": "user", "content": line}], where)
        return
    from data_tools.readers import iter_rows

    for where, row in iter_rows(spec):
        if isinstance(row, RowError):
            raise row
        yield _prompt_row(row, where)


def _prompt_row(row: dict, where: str) -> PromptRow:
    if row.get("prompt") is not None:
        prompt = messages_value(row["prompt"], where, "prompt", "user")
    elif row.get("messages") is not None:
        prompt = messages_value(row["messages"], where, "messages", "user")
        while prompt and prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
    else:
        key = next((k for k in ("question", "instruction") if isinstance(row.get(k), str)), None)
        if key is None:
            raise RowError(where, "prompt", "field 'prompt' missing (a prompts row has prompt, messages, question or instruction)", "missing_field")
        prompt = [{"role": "user", "content": row[key]}]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(where, "prompt", "field 'prompt': the last message must be the user's", "bad_value")
    answer = json_cell(row.get("answer"))
    if answer is not None:
        if isinstance(answer, str):
            answer = [answer]
        elif not (isinstance(answer, list) and all(isinstance(a, str) for a in answer)):
            raise RowError(where, "answer", "field 'answer': expected a string or a list of strings", "wrong_type")
    return PromptRow(prompt, where, answer)


# --------------------------------------------------------------------------- model and judge


def _judge(spec: str, args: list[str], prompts: list[PromptRow]):
    from align.evaluation.judges import build_judge

    kwargs: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"--judge-arg: expected KEY=VALUE, got {arg!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    answers = {p.prompt[-1]["content"].strip(): p.answer for p in prompts if p.answer}
    if spec == "answer" and not answers:
        raise ConfigError(f"--judge answer: no row of {prompts[0].where.rsplit(':', 1)[0]} has an 'answer' field")
    where = "--judge-arg" if kwargs and spec != "answer" else "--judge"
    return build_judge(spec, kwargs, answers, where=where)


def _model_dir(spec: str) -> str:
    """An SFT RunDir stands for its merged model."""
    from align.core.artifacts import RunDir

    path = Path(spec)
    if path.is_dir() and RunDir(path).is_run_dir() and (path / "merged" / "config.json").is_file():
        return str(path / "merged")
    return spec


def _adapter_dir(spec: str) -> Path:
    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    raise ConfigError(f"--adapter {spec}: no adapter_config.json there or in its adapter/ folder")


def load_policy(cfg: GenerateConfig):
    from align.core.config import ModelConfig
    from align.modeling.models import default_device, load_model, load_tokenizer, resolve

    device = cfg.device or default_device()
    ref = resolve(_model_dir(cfg.model))
    model = load_model(ref, ModelConfig(), device=device)
    tokenizer = load_tokenizer(ref, ModelConfig())
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(_adapter_dir(cfg.adapter)))
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- generate


def scored_groups(cfg: GenerateConfig, prompts: list[PromptRow], judge, model, tokenizer, samples: list[str]) -> Iterator[Item]:
    """Sample, judge and yield one Group per prompt; `samples` collects JSONL lines of every sample."""
    from align.core.progress import Progress
    from align.modeling.generation import Sampling, generate

    k = cfg.num_samples
    bar = Progress(len(prompts), "generating and judging", unit="prompts")
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        sampling = Sampling(
            max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
            num_return_sequences=k, seed=cfg.seed + start,
        )
        responses = generate(model, tokenizer, [p.prompt for p in chunk], batch_size=len(chunk), sampling=sampling)
        scores = judge.score([p.prompt for p in chunk for _ in range(k)], responses)
        for i, p in enumerate(chunk):
            mine, marks = responses[i * k : (i + 1) * k], scores[i * k : (i + 1) * k]
            samples.append(json.dumps({"prompt": p.prompt, "responses": mine, "scores": marks}, ensure_ascii=False))
            candidates = []
            for j, (text, score) in enumerate(zip(mine, marks)):
                if score is None:
                    yield Drop("judge did not apply to the response")
                else:
                    candidates.append(Candidate([{"role": "assistant", "content": text}], float(score), f"s{j}", p.where))
            yield Group(p.prompt, candidates, id=short_where(p.where), where=p.where)
        bar.update(len(chunk))
    bar.close()


def generate(cfg: GenerateConfig, build_cfg: BuildConfig):
    """Generate, judge and pair; writes the dataset like `build` plus samples.jsonl."""
    if cfg.num_samples < 2:
        raise ConfigError(f"--num-samples: at least 2 responses per prompt are needed to pair, got {cfg.num_samples}")
    counts = Counts()
    prompts: list[PromptRow] = []
    seen: set[str] = set()
    for row in read_prompts(cfg.prompts):
        counts.rows_read += 1
        key = json.dumps(row.prompt, sort_keys=True)
        if key in seen:
            counts.left_out["duplicate prompt"] += 1
            continue
        seen.add(key)
        prompts.append(row)
    if not prompts:
        raise DataError(f"--prompts {cfg.prompts}: no prompts")
    judge = _judge(cfg.judge, cfg.judge_args, prompts)
    build_cfg.check()
    check_output(Path(build_cfg.output).expanduser(), build_cfg.overwrite)  # before the slow part
    model, tokenizer = load_policy(cfg)
    samples: list[str] = []
    extra: dict[str, str] = {}

    def items() -> Iterator[Item]:
        yield from scored_groups(cfg, prompts, judge, model, tokenizer, samples)
        # Filled once generation is done; build writes extra files after the stream ends.
        extra["samples.jsonl"] = "".join(line + "\n" for line in samples)

    provenance = {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "judge": {"spec": cfg.judge, "name": getattr(judge, "name", cfg.judge), "args": cfg.judge_args},
        "sampling": {"num_samples": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                     "top_p": cfg.top_p, "seed": cfg.seed},
        "prompts": cfg.prompts,
    }
    return build(build_cfg, items=items(), provenance=provenance, extra_files=extra, counts=counts)
