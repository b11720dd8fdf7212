"""Evaluation stage: several policies on the same held-out prompts, then the comparison report.

All policies of a pipeline share one base (the merged SFT model): the SFT policy is the
base itself, DPO and PPO are adapters on it, and so is the reward model. So one base is
loaded and each policy is an adapter switched on in turn; the reference for KL is the
base with adapters off. For every policy, with the same sampling seed:
  - responses to the held-out prompts, scored by the reward model and the programmatic judges;
  - win rate against the baseline under each judge (ties count half) with a bootstrap 95% interval;
  - KL(policy || reference) from its own samples; response length;
  - perplexity on held-out SFT data (forgetting), implicit-reward accuracy on held-out pairs.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from align import models
from align.adapters import load_frozen_adapter, peft_type
from align.artifacts import RunDir, atomic_write_json, atomic_write_text
from align.config import DataConfig, EvalConfig
from align.data import load_splits
from align.errors import ConfigError
from align.generation import Sampling, response_logprobs, sample_tokens
from align.judges import load_judge
from align.models import ModelRef
from align.stages.common import StageRun, finished_parent
from align.stages.ppo import score_with_head
from align.templates import tokenize_for_sft
from align.tracking import is_main_process

log = logging.getLogger("align")

RESULTS = "eval.json"
GENERATIONS = "generations.jsonl"


# --------------------------------------------------------------------------- policies


def policy_source(name: str, run: RunDir) -> tuple[str, Path | None]:
    """(base model location, adapter folder or None) of a run's policy."""
    m = run.manifest() or {}
    if (run.merged_dir / "config.json").is_file():
        return str(run.merged_dir.resolve()), None
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"runs.{name}: {run.path} has neither merged/ nor adapter/")
    return str(Path(m["base_model"]["location"]).resolve()), run.adapter_dir


def load_policies(cfg: EvalConfig, runs: dict[str, RunDir], reward: RunDir | None):
    """One base with every policy (and the reward model) as a named adapter."""
    from peft import PeftModel

    sources = {name: policy_source(name, run) for name, run in runs.items()}
    bases = {base for base, _ in sources.values()}
    if reward is not None:
        bases.add(str(Path((reward.manifest() or {})["base_model"]["location"]).resolve()))
    if len(bases) != 1:
        raise ConfigError(f"runs: the policies must share one base (the merged SFT model); found {sorted(bases)}")
    (location,) = bases
    base_ref = ModelRef(location, location, True)
    tokenizer = models.load_tokenizer(base_ref, cfg.model)
    model = models.load_model(base_ref, cfg.model)
    adapters = {name: path for name, (_, path) in sources.items() if path is not None}
    kinds = {name: peft_type(path) for name, path in adapters.items()}
    if reward is not None:
        kinds["reward_run"] = peft_type(reward.adapter_dir)
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
        raise ConfigError(f"runs: {listing}: one shared base holds adapters of a single PEFT type; evaluate each type separately")
    peft = None
    for name, path in adapters.items():
        if peft is None:
            peft = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            peft.load_adapter(str(path), adapter_name=name)
    head = None
    if reward is not None:
        if peft is None:  # only the SFT policy and a reward model: still a PEFT model to switch adapters on
            from peft import LoraConfig, get_peft_model

            peft = get_peft_model(model, LoraConfig(r=1, target_modules=["q_proj"]), adapter_name="_unused")
        head = load_frozen_adapter(peft, reward.adapter_dir, "reward")
        head = head.to(next(peft.parameters()).device)
    peft = peft or model
    peft.eval()
    return peft, tokenizer, base_ref, {name: (path is not None) for name, (_, path) in sources.items()}, head


class Switch:
    """Runs code with one policy active: its adapter on, or all adapters off for the base policy."""

    def __init__(self, model):
        self.model = model
        self.is_peft = hasattr(model, "disable_adapter")

    def policy(self, name: str | None):
        import contextlib

        if not self.is_peft:
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def reference(self):
        import contextlib

        return self.model.disable_adapter() if self.is_peft else contextlib.nullcontext()


# --------------------------------------------------------------------------- measurements


def bootstrap_interval(values: list[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the prompts."""
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return means[int(0.025 * (n - 1))], means[int(0.975 * (n - 1))]


def win_rate(policy: list[float | None], baseline: list[float | None], n_boot: int, seed: int) -> dict | None:
    """Share of prompts where the policy scores higher than the baseline, ties counting half."""
    outcomes = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline) if p is not None and b is not None]
    if not outcomes:
        return None
    low, high = bootstrap_interval(outcomes, n_boot, seed)
    return {
        "win_rate": sum(outcomes) / len(outcomes),
        "ci95": [low, high],
        "wins": sum(o == 1.0 for o in outcomes),
        "ties": sum(o == 0.5 for o in outcomes),
        "losses": sum(o == 0.0 for o in outcomes),
        "n": len(outcomes),
    }


def conversation_logprob(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]], batch_size: int) -> list[float]:
    """Summed log-prob of each completion after its prompt (the implicit-reward building block)."""
    from align.templates import _common_prefix, _ids

    out: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            head = _ids(tokenizer, prompt, add_generation_prompt=True)
            full = _ids(tokenizer, prompt + completion)
            rows.append((full, _common_prefix(head, full)))
        width = max(len(f) for f, _ in rows)
        ids = torch.tensor([f + [tokenizer.pad_token_id] * (width - len(f)) for f, _ in rows], device=device)
        attn = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f, _ in rows], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (full, start_at) in enumerate(rows):
            out.append(logp[i, start_at - 1 : len(full) - 1].sum().item())
    return out


def perplexity(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> float | None:
    """exp(mean NLL of assistant tokens) on held-out SFT conversations."""
    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    encoded = [tokenize_for_sft(tokenizer, r["messages"], max_length) for r in rows]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e.input_ids)) for e in chunk], device=device)
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk], device=device)
        attn = (torch.arange(width, device=device)[None] < torch.tensor([len(e.input_ids) for e in chunk], device=device)[:, None]).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        keep = target != -100
        total += nll[keep].sum().item()
        count += int(keep.sum())
    return float(torch.exp(torch.tensor(total / max(count, 1))))


# --------------------------------------------------------------------------- the stage


def run(cfg: EvalConfig, *, force: bool = False, callbacks=()) -> RunDir:
    from tqdm.auto import tqdm

    runs = {name: finished_parent(path, key=f"runs.{name}") for name, path in cfg.runs.items()}
    reward = finished_parent(cfg.reward_run, key="reward_run") if cfg.reward_run else None
    splits = load_splits(cfg.data, "preference", seed=0)
    if not splits.eval:
        raise ConfigError(f"data: '{cfg.data.path}' has no held-out split to evaluate on")
    prompts, seen = [], set()
    for row in splits.eval:
        key = json.dumps(row["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(row["prompt"])
    prompts = prompts[: cfg.num_prompts]
    pairs = splits.eval[: cfg.num_pairs]
    ppl_rows = load_splits(DataConfig(path=cfg.perplexity_data), "sft", seed=0).eval[: cfg.perplexity_rows] if cfg.perplexity_data else []

    shared = {path for path, _ in (policy_source(n, r) for n, r in runs.items())}
    location = sorted(shared)[0]
    base_ref = ModelRef(location, location, True)
    inputs = {name: (run.manifest() or {}).get("run_id") for name, run in runs.items()}
    inputs["reward"] = (reward.manifest() or {}).get("run_id") if reward else None
    stage = StageRun(cfg, base=base_ref, splits=splits, force=force, inputs=inputs)
    if stage.skipped:
        log.info("eval: skipped: the finished evaluation in %s matches its config and runs", stage.run_dir.path)
        return stage.run_dir
    with stage:
        model, tokenizer, _, has_adapter, score_head = load_policies(cfg, runs, reward)
        switch = Switch(model)
        judges = [load_judge(spec) for spec in cfg.judges]
        sampling = Sampling(
            max_new_tokens=cfg.sampling.max_new_tokens, do_sample=True, temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p, seed=cfg.sampling.seed,
        )

        def rm_scores(conversations):
            if score_head is None:
                return None
            model.set_adapter("reward")
            backbone = getattr(model.get_base_model(), model.get_base_model().base_model_prefix)
            with torch.no_grad():
                return score_with_head(backbone, score_head, tokenizer, conversations, cfg.batch_size).tolist()

        results: dict[str, dict] = {}
        generations: dict[str, list[str]] = {}
        per_prompt: dict[str, dict[str, list]] = {}
        for name in tqdm(runs, desc="evaluating policies", disable=not is_main_process()):
            adapter = name if has_adapter[name] else None
            texts, kls, lengths = [], [], []
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start : start + cfg.batch_size]
                seeded = Sampling(**{**sampling.__dict__, "seed": cfg.sampling.seed + start})
                with switch.policy(adapter):
                    drawn = sample_tokens(model, tokenizer, chunk, seeded)
                    with torch.no_grad():
                        logp = response_logprobs(model, drawn.seq, drawn.attn, drawn.n_resp)
                with switch.reference(), torch.no_grad():
                    ref = response_logprobs(model, drawn.seq, drawn.attn, drawn.n_resp)
                kls.extend(((logp - ref) * drawn.mask).sum(1).tolist())
                lengths.extend(drawn.mask.sum(1).tolist())
                texts.extend(drawn.responses)
            generations[name] = texts
            convs = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
            scores = {"reward_model": rm_scores(convs)} if score_head is not None else {}
            for judge in judges:
                scores[judge.name] = judge.score(prompts, texts)
            with switch.policy(adapter):
                ppl = perplexity(model, tokenizer, ppl_rows, 512, cfg.batch_size)
                pol_c = conversation_logprob(model, tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], cfg.batch_size)
                pol_r = conversation_logprob(model, tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], cfg.batch_size)
            with switch.reference():
                ref_c = conversation_logprob(model, tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], cfg.batch_size)
                ref_r = conversation_logprob(model, tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], cfg.batch_size)
            margins = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r)]
            beta = _run_beta(runs[name]) or cfg.dpo_beta
            per_prompt[name] = scores
            results[name] = {
                "kl_mean": sum(kls) / len(kls),
                "kl_ci95": list(bootstrap_interval(kls, cfg.bootstrap, cfg.sampling.seed)),
                "response_tokens_mean": sum(lengths) / len(lengths),
                "perplexity": ppl,
                "implicit_reward_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else None,
                "implicit_reward_margin": beta * sum(margins) / len(margins) if margins else None,
                "scores": {
                    k: {"mean": sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v)), "n": sum(x is not None for x in v)}
                    for k, v in scores.items() if v is not None
                },
            }
        baseline = cfg.baseline
        for name in runs:
            results[name]["win_rate_vs_" + baseline] = {
                judge: win_rate(per_prompt[name][judge], per_prompt[baseline][judge], cfg.bootstrap, cfg.sampling.seed)
                for judge in per_prompt[name]
            } if name != baseline else {}
        reward_accuracy = None
        if score_head is not None:
            chosen = rm_scores([p["prompt"] + p["chosen"] for p in pairs])
            rejected = rm_scores([p["prompt"] + p["rejected"] for p in pairs])
            reward_accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        report = {
            "baseline": baseline,
            "num_prompts": len(prompts),
            "num_pairs": len(pairs),
            "sampling": cfg.sampling.__dict__,
            "reward_model_accuracy": reward_accuracy,
            "policies": results,
            "compute": compute_table(runs, reward),
        }
        if is_main_process():
            atomic_write_json(stage.run_dir.path / RESULTS, report)
            lines = []
            for i, prompt in enumerate(prompts):
                row = {"prompt": prompt[-1]["content"]}
                for name in runs:
                    row[name] = generations[name][i]
                    for judge, values in per_prompt[name].items():
                        row[f"{name} {judge}"] = values[i]
                lines.append(json.dumps(row, ensure_ascii=False))
            atomic_write_text(stage.run_dir.path / GENERATIONS, "\n".join(lines) + "\n")
            flat = {}
            for name, r in results.items():
                flat[f"{name}/kl"] = r["kl_mean"]
                for judge, s in r["scores"].items():
                    flat[f"{name}/{judge}"] = s["mean"]
                for judge, w in r.get("win_rate_vs_" + baseline, {}).items():
                    if w:
                        flat[f"{name}/win_rate_{judge}"] = w["win_rate"]
            stage.tracker.log(flat, step=0)
            columns = ["prompt", *runs]
            stage.tracker.log_samples("generations", columns, [[p[-1]["content"], *(generations[n][i] for n in runs)] for i, p in enumerate(prompts[: cfg.samples_in_report * 4])], step=0)
            from align.report import write_report

            report_dir = Path(cfg.report_dir) if cfg.report_dir else stage.run_dir.path.parent
            written = write_report(stage.run_dir.path, runs, reward, report_dir, cfg.samples_in_report, tracker=stage.tracker)
            log.info("eval: report written to %s", written["markdown"])
        stage.finish(
            summary={"reward_model_accuracy": reward_accuracy, "policies": results},
            outputs={"results": RESULTS, "generations": GENERATIONS},
        )
    return stage.run_dir


def _run_beta(run: RunDir) -> float | None:
    """The beta a DPO run trained with (its resolved config), for its implicit reward."""
    import yaml

    try:
        cfg = yaml.safe_load((run.path / "config.yaml").read_text())
        return float(cfg["dpo"]["beta"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def compute_table(runs: dict[str, RunDir], reward: RunDir | None) -> dict[str, dict]:
    """Wall time, peak memory, trainable parameters and tokens of every stage that produced a policy."""
    table = {}
    stages = dict(runs)
    if reward is not None:
        stages["reward"] = reward
    for name, run in stages.items():
        m = run.manifest() or {}
        s = m.get("summary", {})
        tokens, rollout_tokens = None, 0
        if run.metrics_path.is_file():
            for line in run.metrics_path.read_text().splitlines():
                row = json.loads(line)
                if "train/num_tokens" in row:  # TRL's running count
                    tokens = row["train/num_tokens"]
                rollout_tokens += row.get("ppo/rollout_tokens", 0)  # PPO logs each rollout's count
        tokens = tokens if tokens is not None else rollout_tokens or None
        params = s.get("parameters") or {}
        table[name] = {
            "stage": m.get("stage"),
            "wall_time_s": s.get("wall_time_s"),
            "peak_memory_mb": s.get("peak_memory_mb"),
            "trainable_parameters": params.get("trainable"),
            "trainable_pct": params.get("trainable_pct"),
            "steps": s.get("steps"),
            "tokens": tokens,
        }
    return table
