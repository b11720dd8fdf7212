"""Online (iterative) DPO stage: rounds of sample -> score -> pair -> DPO, with a LoRA policy on one base.

Round n samples `online.num_samples` responses per prompt from the policy as round n-1 left it,
scores them with the reward sources, pairs them per prompt and trains the same adapter on those
pairs with the DPO stage's trainer; the reference stays the SFT model (the base with adapters
disabled). The loop is align/rlhf/online_dpo.py; this module holds the config and the wiring. Each
round's samples, scores and pairs are kept in rounds/round-<n>/; a checkpoint after a round holds
the adapter, and --resume continues with the next round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.core.config import opt
from align.core.pairing import STRATEGIES
from align.modeling.methods import resolve_method
from align.preference import dpo_options
from align.preference.dpo_options import DPOOptions
from align.rlhf.options import OnlineStageConfig, check_keep_best
from align.stages.registry import Curve, Stage, fmt, online_checks, register


@dataclass
class OnlineOptions:
    rounds: int = opt(3, "Rounds of sample -> score -> pair -> DPO; round n samples from the policy round n-1 trained.", min=1)
    prompts_per_round: int | None = opt(
        None, "Training prompts sampled per round (a fresh seeded order per pass over them); null = all of them.", min=1
    )
    num_samples: int = opt(4, "Responses sampled per prompt and round, K (at least 2 to make a pair).", min=2)
    max_new_tokens: int = opt(48, "Longest sampled response.", min=1)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling.", gt=0, max=1)
    generation_batch_size: int = opt(16, "Prompts per generation batch, each with its K samples.", min=1)
    pairing: Literal[STRATEGIES] = opt(  # type: ignore[valid-type]
        "best-vs-worst",
        "How a prompt's scored samples become pairs: best-vs-worst (one pair), best-vs-each, all-pairs; ties are never pairs.",
    )
    min_margin: float = opt(0.0, "Smallest chosen - rejected total reward of a pair (pairs need a strictly higher chosen anyway).", min=0)
    eval_prompts: int = opt(16, "Held-out prompts sampled once each for the held-out reward and KL (0 disables).", min=0)
    keep_best_within_kl: float | None = opt(
        None,
        "Keep as the run's adapter/ the adapter of the held-out evaluation (before round 1, every train.eval_steps rounds, "
        "and after the last) with the highest held-out reward whose held-out KL to the reference is at most this budget; "
        "the last adapter stays in the checkpoint of the last round (align/rlhf/keep_best.py). null: the last adapter.",
        gt=0,
    )


@dataclass
class OnlineDPOConfig(OnlineStageConfig):
    """Online DPO: each round pairs the policy's own samples by reward and trains DPO on them; the reference stays the SFT model."""

    online: OnlineOptions = opt(
        OnlineOptions,
        "Rounds and sampling. In this stage train.epochs / train.max_steps apply per round (over that round's pairs), "
        "train.save_steps and train.eval_steps count rounds.",
    )
    dpo: DPOOptions = opt(DPOOptions, "DPO options of each round's training (as in the DPO stage).")

    stage = "online_dpo"

    def validate(self) -> None:
        super().validate()
        dpo_options.check(self.dpo)
        check_keep_best(self.online.keep_best_within_kl, self.online.eval_prompts, "online")


def run(cfg: OnlineDPOConfig, *, force: bool = False, callbacks=()):
    from align.core.artifacts import ADAPTER
    from align.rlhf.online_dpo import train
    from align.stages.online_run import open_online_stage
    from align.stages.samples import finish_with_samples

    stage, runs = open_online_stage(cfg, force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        policy, summary = train(stage, cfg, runs, callbacks)
        outputs = {"adapter": ADAPTER, "rounds": "rounds"}
        finish_with_samples(stage, policy.model, policy.tokenizer, summary, outputs, step=summary["steps"])
    return stage.run_dir


def summary_lines(s: dict) -> list[str]:
    from align.rlhf.keep_best import kept_line

    return [
        f"  {s.get('rounds')} rounds, {s.get('pairs')} on-policy pairs, {s.get('steps')} DPO steps; held-out reward "
        f"{fmt(s.get('eval_reward_before'))} (round 0) -> {fmt(s.get('eval_reward_after'))}, KL to reference {fmt(s.get('eval_kl_after'))}"
    ] + kept_line(s)


register(Stage(
    "online_dpo", OnlineDPOConfig, run, summary_lines,
    checks=online_checks(), resolve=resolve_method, kl_knob="dpo.beta", beta_key="dpo.beta",
    curves=(Curve("online/reward/total", "sampled reward"), Curve("online/dpo_loss", "DPO loss")),
))
