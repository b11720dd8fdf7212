"""Reward-model stage: TRL's RewardTrainer on the merged SFT model, LoRA + a scalar score head.

The adapter is a sequence-classification adapter whose `score` head is saved with it
(modules_to_save), so it reloads with the same scores. After training, the mean and std
of the scores of training responses are saved (`reward_stats.json`): PPO normalizes
rewards with them.
"""

from __future__ import annotations

import json
import logging
import random

from align.adapters import peft_config_for
from align.artifacts import RunDir, atomic_write_json
from align.config import RewardConfig
from align.data import Splits, load_splits
from align.stages.common import StageRun, resolve_base, to_datasets, train_adapter, trainer_kwargs
from align.tracking import is_main_process

log = logging.getLogger("align")

STATS = "reward_stats.json"


def prepare(splits: Splits, tokenizer, max_length: int):
    """Pairs as datasets; TRL drops pairs longer than max_length silently, so they are dropped and counted here."""

    def n_tokens(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    def convert(row):
        longest = max(n_tokens(row["prompt"] + row["chosen"]), n_tokens(row["prompt"] + row["rejected"]))
        if longest > max_length:
            return None, False
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, False

    return to_datasets(splits, convert, "reward", max_length, "pair longer than max_length")


def build_trainer(cfg: RewardConfig, model, tokenizer, train_ds, eval_ds, run_dir: RunDir, callbacks=()):
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    device = str(next(model.parameters()).device)
    args = TRLRewardConfig(
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None),
        center_rewards_coefficient=cfg.reward.center_rewards_coefficient,
        dataset_num_proc=None,
    )
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        # task SEQ_CLS puts the score head in modules_to_save: it trains and is saved with the adapter.
        peft_config=peft_config_for(cfg, task_type="SEQ_CLS"),
        callbacks=list(callbacks),
    )


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
    """Scalar scores of whole conversations from a sequence-classification reward model."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(conversations), batch_size):
            ids = [
                tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
                for c in conversations[start : start + batch_size]
            ]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids], device=device)
            attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention).logits
            scores.extend(logits[:, 0].float().tolist())
    finally:
        model.train(was_training)
    return scores


def log_pair_table(stage: StageRun, model, tokenizer, before_label: str, step: int) -> dict:
    """Held-out pairs with their chosen and rejected scores (the reward stage's sample table)."""
    n = stage.cfg.samples.num_prompts
    if not is_main_process() or n <= 0 or not stage.splits.eval:
        return {}
    pairs = stage.splits.eval[:n]
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    columns = ["prompt", "chosen", "rejected", "score chosen", "score rejected"]
    rows = [
        [p["prompt"][-1]["content"], p["chosen"][-1]["content"], p["rejected"][-1]["content"], c, r]
        for p, c, r in zip(pairs, chosen, rejected)
    ]
    stage.tracker.log_samples("samples", columns, rows, step=step)
    return {"rows": [dict(zip(columns, r)) for r in rows]}


def normalization_stats(model, tokenizer, splits: Splits, n: int, seed: int) -> dict:
    """Mean and std of the scores of a seeded sample of training responses (chosen and rejected)."""
    responses = [row["prompt"] + row[side] for row in splits.train for side in ("chosen", "rejected")]
    picked = random.Random(seed).sample(responses, min(n, len(responses)))
    scores = score_conversations(model, tokenizer, picked)
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1)) ** 0.5
    return {"mean": mean, "std": std, "n": len(scores), "source": "training responses (chosen and rejected), seeded sample"}


_EVAL_KEYS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def run(cfg: RewardConfig, *, force: bool = False, callbacks=()) -> RunDir:
    splits = load_splits(cfg.data, "preference", cfg.train.seed)
    base, parent = resolve_base(cfg)
    stage = StageRun(cfg, base=base, splits=splits, parent=parent, force=force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        trained = train_adapter(
            stage, prepare=prepare, build_trainer=build_trainer, before_label="untrained", callbacks=callbacks,
            head="score", samples=log_pair_table,
        )
        summary = {f"eval_{k}_before": trained.before.get(f"eval_{k}") for k in _EVAL_KEYS}
        summary.update({f"eval_{k}_after": trained.after.get(f"eval_{k}") for k in _EVAL_KEYS})
        summary.update(trained.summary)
        if is_main_process():
            stats = normalization_stats(trained.trainer.model, trained.tokenizer, splits, cfg.reward.stats_samples, cfg.train.seed)
            atomic_write_json(stage.run_dir.path / STATS, stats)
            summary["reward_stats"] = stats
            log.info("reward: score mean %.3f, std %.3f over %d training responses", stats["mean"], stats["std"], stats["n"])
        stage.finish(summary=summary, outputs={"adapter": "adapter", "reward_stats": STATS, "samples": "samples.jsonl"})
    return stage.run_dir


def read_stats(run_dir: RunDir) -> dict:
    return json.loads((run_dir.path / STATS).read_text())
