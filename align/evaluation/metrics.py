"""What evaluation measures: bootstrap intervals, win rates, perplexity, and each run's compute.

Pure Python except `perplexity` (a model forward); used by the evaluation stage and the report.
"""

from __future__ import annotations

import json
import random

from align.core.artifacts import RunDir


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


def perplexity(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> float | None:
    """exp(mean NLL of assistant tokens) on held-out SFT conversations."""
    import torch

    from align.modeling.templates import tokenize_for_sft
    from align.modeling.scoring import pad_batch

    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    encoded = [tokenize_for_sft(tokenizer, r["messages"], max_length) for r in rows]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, attn = pad_batch([e.input_ids for e in chunk], tokenizer.pad_token_id, device)
        labels, _ = pad_batch([e.labels for e in chunk], -100, device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        keep = target != -100
        total += nll[keep].sum().item()
        count += int(keep.sum())
    return float(torch.exp(torch.tensor(total / max(count, 1))))


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
                # PPO, GRPO and RLOO log each rollout's count as <stage>/rollout_tokens
                rollout_tokens += sum(v for k, v in row.items() if k.endswith("/rollout_tokens"))
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
