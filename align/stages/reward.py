"""Reward-model stage: TRL's RewardTrainer on the merged SFT model, LoRA + a scalar score head.

The adapter is a sequence-classification adapter whose `score` head is saved with it
(modules_to_save), so it reloads with the same scores. After training, the mean and std
of the scores of training responses are saved (`reward_stats.json`): PPO normalizes
rewards with them. Scoring itself lives in align/modeling/scoring.py, shared with PPO,
evaluation and the reward-model judge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from align.core.config import ChildStageConfig, opt
from align.modeling.methods import LORA_FAMILY, resolve_method
from align.stages.registry import Curve, Stage, fmt, register, training_checks

log = logging.getLogger("align")


@dataclass
class RewardOptions:
    center_rewards_coefficient: float | None = opt(
        None, "Adds coef * mean(r^2) to the loss, keeping rewards centred on 0 (e.g. 0.01; null: off).", min=0
    )
    stats_samples: int = opt(
        512, "Training responses scored after training for the mean and std PPO normalizes rewards with.", min=2
    )


@dataclass
class RewardConfig(ChildStageConfig):
    """A reward model: an adapter and a scalar score head trained on preference pairs (Bradley-Terry)."""

    reward: RewardOptions = opt(RewardOptions, "Reward-model options.")

    stage = "reward"




def prepare(splits, tokenizer, max_length: int):
    """Pairs as datasets; TRL drops pairs longer than max_length silently, so they are dropped and counted here."""
    from align.modeling.templates import chat_ids
    from align.core.examples import to_datasets

    def convert(row):
        longest = max(len(chat_ids(tokenizer, row["prompt"] + row["chosen"])), len(chat_ids(tokenizer, row["prompt"] + row["rejected"])))
        if longest > max_length:
            return None, False
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, False

    return to_datasets(splits, convert, "reward", max_length, "pair longer than max_length")


def build_trainer(cfg: RewardConfig, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs

    device = str(next(model.parameters()).device)
    args = TRLRewardConfig(
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2),
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


def log_pair_table(stage, model, tokenizer, before_label: str, step: int) -> dict:
    """Held-out pairs with their chosen and rejected scores (the reward stage's sample table)."""
    from align.core.tracking import is_main_process
    from align.modeling.scoring import score_with_model

    n = stage.cfg.samples.num_prompts
    if not is_main_process() or n <= 0 or not stage.splits.eval:
        return {}
    pairs = stage.splits.eval[:n]
    chosen = score_with_model(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score_with_model(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    columns = ["prompt", "chosen", "rejected", "score chosen", "score rejected"]
    rows = [
        [p["prompt"][-1]["content"], p["chosen"][-1]["content"], p["rejected"][-1]["content"], c, r]
        for p, c, r in zip(pairs, chosen, rejected)
    ]
    stage.tracker.log_samples("samples", columns, rows, step=step)
    return {"rows": [dict(zip(columns, r)) for r in rows]}


_EVAL_KEYS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def run(cfg: RewardConfig, *, force: bool = False, callbacks=()):
    from align.core.files import atomic_write_json
    from align.core.tracking import is_main_process
    from align.modeling.scoring import STATS, normalization_stats, score_with_model, stats_sample
    from align.stages.hf_training import held_out_summary, train_adapter
    from align.stages.stage_run import open_stage

    stage = open_stage(cfg, "preference", force, head="score")
    if stage.skipped:
        return stage.run_dir
    stage.prepare_data(prepare)
    with stage:
        trained = train_adapter(
            stage, build_trainer=build_trainer, before_label="untrained", callbacks=callbacks,
            head="score", samples=log_pair_table,
        )
        summary = {**held_out_summary(trained, _EVAL_KEYS), **trained.summary}
        if is_main_process():
            picked = stats_sample(stage.splits.train, cfg.reward.stats_samples, cfg.train.seed)
            stats = normalization_stats(score_with_model(trained.trainer.model, trained.tokenizer, picked))
            stats["source"] = "training responses (chosen and rejected), seeded sample"
            atomic_write_json(stage.run_dir.path / STATS, stats)
            summary["reward_stats"] = stats
            log.info("reward: score mean %.3f, std %.3f over %d training responses", stats["mean"], stats["std"], stats["n"])
        stage.finish(summary=summary, outputs={"adapter": "adapter", "reward_stats": STATS, "samples": "samples.jsonl"})
    return stage.run_dir


def summary_lines(s: dict) -> list[str]:
    return [
        f"  held-out pairwise accuracy: {fmt(s.get('eval_accuracy_before'))} (untrained head) -> "
        f"{fmt(s.get('eval_accuracy_after'))}; margin {fmt(s.get('eval_margin_before'))} -> {fmt(s.get('eval_margin_after'))}"
    ]


WHY_LORA = (
    "the reward adapter and its score head are later loaded next to LoRA adapters on one base "
    "(PPO, evaluation), and PEFT holds adapters of a single type in one model"
)
register(Stage(
    "reward", RewardConfig, run, summary_lines, checks=training_checks(LORA_FAMILY, WHY_LORA), resolve=resolve_method,
    curves=(Curve("train/loss", "train loss"), Curve("train/accuracy", "pairwise accuracy")),
))
