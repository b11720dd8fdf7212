"""PPO with LoRA adapters on one frozen base: one PPO step and the loop of steps.

The model side (policy, value and reward adapters of one base) is align/rlhf/ppo_model.py. Each
step: sample responses to a batch of prompts with the policy; score them with the reward adapter;
pay a per-token KL penalty to the reference; GAE advantages from the value adapter; several epochs
of clipped PPO updates over minibatches. The math lives in align/rlhf/losses.py; this module moves
tensors between the model and that math, and `train` runs the steps (align/rlhf/loop.py),
checkpoints them and saves the adapters. `cfg` below is the PPO stage's config (its `ppo` and
`train` sections).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.safeguards import NonFiniteError
from align.rlhf import loop
from align.rlhf import losses as P
from align.rlhf.distributed import World, row_seed
from align.rlhf.distributed import world as current_world
from align.modeling.generation import Sampled
from align.rlhf.ppo_model import VALUE, PolicyValueReward, sample
from align.rlhf.rollout import gather_rollout


# --------------------------------------------------------------------------- checkpoints (align/rlhf/loop.py)


def save_checkpoint(run_path: Path, step: int, pvr: PolicyValueReward, optimizer, scheduler, kl_coef: float, keep: int,
                    extra=None) -> Path:
    return loop.save_checkpoint(
        run_path, step, pvr.model, ["policy", "value"], optimizer, scheduler, {"kl_coef": kl_coef}, keep,
        modules={"value_head": pvr.value_head}, extra=extra,
    )


def load_checkpoint(folder: Path, pvr: PolicyValueReward, optimizer, scheduler) -> tuple[int, float]:
    meta = loop.load_checkpoint(
        folder, pvr.model, ["policy", "value"], optimizer, scheduler, modules={"value_head": pvr.value_head}, state_types={"kl_coef": float}
    )
    return meta["step"], meta["kl_coef"]


# --------------------------------------------------------------------------- one PPO step


@dataclass
class StepRollout:
    """A step's responses from every rank, in prompt order, with their scores, log-probs and values."""

    roll: Sampled
    raw: torch.Tensor  # reward-model scores
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    generation_s: float


def collect(pvr: PolicyValueReward, cfg, prompts, step: int, world: World) -> StepRollout:
    """This rank samples, scores and values its share of the step's prompts; every rank gathers the step.
    Response i of the step is drawn with the seed (train.seed, step, i, 0), whichever process draws it."""
    mine = world.share(len(prompts))
    t0 = time.time()
    roll = sample(pvr, [prompts[i] for i in mine], cfg, [row_seed(cfg.train.seed, step, i, 0) for i in mine])
    generation_s = time.time() - t0
    pvr.model.eval()
    with torch.no_grad():
        old_logp = pvr.logprobs(roll.seq, roll.attn, roll.n_resp)
        with pvr.model.disable_adapter():
            ref_logp = pvr.logprobs(roll.seq, roll.attn, roll.n_resp)
        pvr.use("value")
        old_values = pvr.values(roll.seq, roll.attn, roll.n_resp)
        pvr.use("policy")
    raw = pvr.scores([pr + [{"role": "assistant", "content": r}] for pr, r in zip(roll.prompts, roll.responses)])
    per_token = {"old_logp": old_logp, "ref_logp": ref_logp, "old_values": old_values}
    roll, rows = gather_rollout(world, roll, {"raw": raw}, per_token, pvr.tokenizer.pad_token_id)
    return StepRollout(roll, rows["raw"], rows["old_logp"], rows["ref_logp"], rows["old_values"], generation_s)


def ppo_step(pvr: PolicyValueReward, cfg, prompts, optimizer, scheduler, kl_coef: float, stats: dict, step: int = 0,
             world: World | None = None) -> dict:
    """One PPO step over the whole step's `prompts`: with several processes each samples its share, every
    rank computes the advantages (and their whitening) over the global batch, and trains on its slice."""
    p = cfg.ppo
    world = world or current_world()
    batch = collect(pvr, cfg, prompts, step, world)
    t1 = time.time()
    roll, raw, old_logp, ref_logp, old_values = batch.roll, batch.raw, batch.old_logp, batch.ref_logp, batch.old_values
    score = (raw - stats["mean"]) / max(stats["std"], 1e-6) if p.normalize_rewards else raw.clone()
    if p.missing_eos_penalty is not None:
        score = score - p.missing_eos_penalty * (~roll.has_eos).float()
    if p.reward_clip is not None:
        score = score.clamp(-p.reward_clip, p.reward_clip)
    mask = roll.mask
    kl = P.kl_per_token(old_logp, ref_logp, p.kl_estimator) * mask
    rewards = P.token_rewards(score, kl, mask, kl_coef)
    advantages, returns = P.gae(rewards, old_values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = P.masked_whiten(advantages, mask)
    logs = update_passes(pvr, cfg, batch, advantages, returns, optimizer, scheduler, step, world)
    times = world.max(torch.tensor([batch.generation_s, time.time() - t1], device=mask.device))
    per_seq_kl = (P.kl_per_token(old_logp, ref_logp, "k1") * mask).sum(1)
    out = {f"ppo/{k}": v for k, v in logs.items()}
    out.update(
        {
            "ppo/reward_raw": raw.mean().item(),
            "ppo/score": score.mean().item(),
            "ppo/reward_with_kl": (rewards.sum(1)).mean().item(),
            "ppo/kl": per_seq_kl.mean().item(),
            "ppo/kl_coef": kl_coef,
            "ppo/explained_variance": P.explained_variance(old_values, returns, mask).item(),
            "ppo/response_length": mask.sum(1).mean().item(),
            "ppo/eos_share": roll.has_eos.float().mean().item(),
            "ppo/rollout_tokens": int(roll.attn.sum().item()),  # prompt + response tokens sampled and trained on
            "ppo/learning_rate": scheduler.get_last_lr()[0],
            "time/generation_s": times[0].item(),
            "time/training_s": times[1].item(),
        }
    )
    if any(not math.isfinite(v) for v in out.values()):
        raise NonFiniteError("non-finite PPO statistics (loss, reward or KL)")
    return out


LOGGED = ("policy_loss", "value_loss", "entropy", "clip_frac", "value_clip_frac", "approx_kl")


def update_passes(pvr: PolicyValueReward, cfg, batch: StepRollout, advantages, returns, optimizer, scheduler, step: int,
                  world: World) -> dict[str, float]:
    """`ppo_epochs` passes of clipped PPO updates; returns the mean of each logged term over the minibatches.

    Each pass shuffles the step's responses with a seed of (train.seed, step), the same on every rank,
    into minibatches of ppo.minibatch_size; rank r trains on the r-th slice of each, its token means
    weighted by its share of the minibatch's tokens, so the gradients summed across ranks are those
    of the whole minibatch.
    """
    p = cfg.ppo
    roll, mask = batch.roll, batch.roll.mask
    pvr.model.train()
    params = pvr.trainable_parameters()
    n, per_rank = mask.size(0), p.minibatch_size // world.size
    sums = torch.zeros(len(LOGGED), dtype=torch.float64, device=mask.device)
    accumulation, micro = cfg.train.gradient_accumulation_steps, 0
    shuffle = torch.Generator().manual_seed(row_seed(cfg.train.seed, step, "order"))
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n, generator=shuffle).to(mask.device)  # fresh minibatches every epoch
        for start in range(0, n, p.minibatch_size):
            minibatch = order[start : start + p.minibatch_size]
            rows = minibatch[world.rank * per_rank : (world.rank + 1) * per_rank]
            m = mask[rows]
            share = m.sum() / mask[minibatch].sum().clamp(min=1)  # this rank's tokens of the minibatch's
            pvr.use("policy")
            logp, entropy = pvr.logprobs(roll.seq[rows], roll.attn[rows], roll.n_resp, with_entropy=True)
            pvr.use("value")
            values = pvr.values(roll.seq[rows], roll.attn[rows], roll.n_resp)
            pvr.use("policy")
            pg_loss, clip_frac = P.policy_loss(logp, batch.old_logp[rows], advantages[rows], m, p.clip_range)
            vf_loss, vf_clip = P.value_loss(values, batch.old_values[rows], returns[rows], m, p.clip_range_value)
            ent = P.masked_mean(entropy, m)
            loss = share * (pg_loss + p.vf_coef * vf_loss - p.entropy_coef * ent)
            (loss / accumulation).backward()
            micro += 1
            if micro % accumulation == 0:
                world.sum_gradients(params)
                if any(prm.grad is not None and not torch.isfinite(prm.grad).all() for prm in params):
                    raise NonFiniteError("non-finite gradient in a PPO update")
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pvr.engine.policy_updated()
            with torch.no_grad():
                approx_kl = 0.5 * P.masked_mean((logp - batch.old_logp[rows]) ** 2, m)
                sums += share.double() * torch.stack([pg_loss, vf_loss, ent, clip_frac, vf_clip, approx_kl]).double()
    minibatches = p.ppo_epochs * (n // p.minibatch_size)
    return dict(zip(LOGGED, (world.sum(sums) / minibatches).tolist()))


def check_processes(cfg, size: int) -> None:
    """A step's prompts split over `size` processes, and each minibatch into equal slices."""
    from align.rlhf.distributed import check_shards

    check_shards(size, cfg.ppo.rollout_batch_size, "ppo.rollout_batch_size")
    check_shards(size, cfg.ppo.minibatch_size, "ppo.minibatch_size", what="responses per minibatch")


@torch.no_grad()
def held_out_reward_and_kl(pvr: PolicyValueReward, prompts: list[list[dict]], cfg, seed: int) -> dict:
    """Mean reward score and KL to the reference of sampled responses to fixed held-out prompts.

    Prompt i's response is drawn with the seed (seed, "held-out", i); with several processes each
    takes its share of the prompts and the means are over all of them."""
    world = current_world()
    mine = world.share(len(prompts))
    rows = {}
    state, was_training = torch.get_rng_state(), pvr.model.training
    pvr.model.eval()
    try:
        if len(mine):
            roll = sample(pvr, [prompts[i] for i in mine], cfg, [row_seed(seed, "held-out", i) for i in mine])
            logp = pvr.logprobs(roll.seq, roll.attn, roll.n_resp)
            with pvr.model.disable_adapter():
                ref = pvr.logprobs(roll.seq, roll.attn, roll.n_resp)
            raw = pvr.scores([pr + [{"role": "assistant", "content": r}] for pr, r in zip(roll.prompts, roll.responses)])
            rows = {"raw": raw.cpu(), "kl": (P.kl_per_token(logp, ref, "k1") * roll.mask).sum(1).cpu(), "length": roll.mask.sum(1).cpu()}
    finally:  # evaluating leaves training's random state and mode as they were
        torch.set_rng_state(state)
        pvr.model.train(was_training)
    parts = [part for part in world.gather(rows) if part]
    joined = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    return {"eval/reward": joined["raw"].mean().item(), "eval/kl": joined["kl"].mean().item(),
            "eval/response_length": joined["length"].mean().item()}


# --------------------------------------------------------------------------- the loop


def optimizer_updates(cfg) -> int:
    """Optimizer updates of the whole run: steps x epochs x minibatches per rollout, over the accumulation."""
    p = cfg.ppo
    return cfg.train.max_steps * p.ppo_epochs * (p.rollout_batch_size // p.minibatch_size) // cfg.train.gradient_accumulation_steps


def train(stage, cfg, reward_run, callbacks=()) -> tuple[PolicyValueReward, dict]:
    """PPO steps 1..train.max_steps (resuming from stage.resume_from) against `reward_run`'s reward model, then the
    policy adapter (the kept one with keep_best_within_kl) as adapter/ and the value adapter and head as value/;
    returns the model and the summary. `callbacks` see the trained model (on_train_end). Every rank runs this."""
    from transformers import set_seed

    from align.core.errors import DataError
    from align.modeling import models
    from align.modeling.scoring import read_stats
    from align.modeling.train_setup import optimizer_and_schedule
    from align.rlhf.keep_best import KeepBest

    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    pvr = PolicyValueReward(cfg, stage.base, reward_run, tokenizer)
    params = pvr.trainable_parameters()
    counts = models.count_parameters(pvr.model)
    counts["trainable"] = sum(p.numel() for p in params)
    log_trainable(counts)
    optimizer, scheduler = optimizer_and_schedule(cfg, params, pvr.model, optimizer_updates(cfg))
    stats = read_stats(reward_run)
    kl_ctl = P.AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon)
    keep = KeepBest(cfg.ppo.keep_best_within_kl, "eval/reward")
    start = 0
    if stage.resume_from is not None:
        start, kl_ctl.value = load_checkpoint(stage.resume_from, pvr, optimizer, scheduler)
        keep.load(stage.resume_from)
    eval_prompts = [r["prompt"] for r in stage.splits.eval][: max(cfg.samples.num_prompts, 8)]
    if keep.active and not eval_prompts:
        raise DataError(f"ppo.keep_best_within_kl: needs held-out prompts; data '{stage.splits.source}' has no held-out rows")
    final = train_steps(stage, pvr, cfg, optimizer, scheduler, kl_ctl, stats, start, eval_prompts, keep)
    loop.notify_train_end(callbacks, pvr.model)
    save_final(stage, pvr)
    pvr.use("policy")
    return pvr, {
        "steps": cfg.train.max_steps,
        "eval_reward_after": final.get("eval/reward"),
        "eval_kl_after": final.get("eval/kl"),
        "parameters": counts,
        **keep.summary(),
        "reward_stats": stats,
    }


def log_trainable(counts: dict) -> None:
    import logging

    logging.getLogger("align").info("ppo: %s trainable (policy + value adapters, value head) of %s parameters",
                                    f"{counts['trainable']:,}", f"{counts['total']:,}")


def train_steps(stage, pvr, cfg, optimizer, scheduler, kl_ctl, stats, start: int, eval_prompts, keep) -> dict:
    """PPO steps start..max_steps through the RL step loop (align/rlhf/loop.py); the final evaluation.
    `keep` (keep_best.KeepBest) sees every evaluation; with a budget, the kept policy adapter is loaded at the end."""
    from align.core.checkpoints import CHECKPOINTS
    from align.rlhf.keep_best import adapter_weights, keep_last_then_restore

    prompts = [r["prompt"] for r in stage.splits.train]

    def step(i: int) -> dict:
        batch = loop.batch_prompts(prompts, i, cfg.ppo.rollout_batch_size, cfg.train.seed)
        metrics = ppo_step(pvr, cfg, batch, optimizer, scheduler, kl_ctl.value, stats, step=i)
        kl_ctl.update(metrics["ppo/kl"], len(batch))
        return metrics

    def save(done: int):
        finite(pvr, f"after step {done}", stage)
        return save_checkpoint(stage.run_dir.path, done, pvr, optimizer, scheduler, kl_ctl.value, cfg.train.save_total_limit,
                               extra=keep.save)

    def evaluate() -> dict:
        finite(pvr, f"after step {stage.step or 0}", stage)
        return held_out_reward_and_kl(pvr, eval_prompts, cfg, cfg.train.seed)

    final = loop.run_steps(
        stage, cfg, start=start, total=cfg.train.max_steps, step_fn=step, save_fn=save,
        eval_fn=evaluate if eval_prompts else None, desc="ppo",
        describe=lambda done, m: f"reward {m['ppo/reward_raw']:.3f}, kl {m['ppo/kl']:.3f}, eos {m['ppo/eos_share']:.2f}",
        on_eval=lambda done, metrics: keep.offer(done, metrics, lambda: adapter_weights(pvr.model, "policy")),
    )
    finite(pvr, f"after step {cfg.train.max_steps}", stage)
    last = stage.run_dir.path / CHECKPOINTS / f"checkpoint-{cfg.train.max_steps}"
    keep_last_then_restore(keep, last, lambda: save(cfg.train.max_steps), pvr.model, "policy")
    return final


def finite(pvr, when: str, stage) -> None:
    """The policy and value adapters (and the value head) hold finite weights: checked before every checkpoint,
    evaluation and the final save, so nothing non-finite is kept."""
    from align.core.checkpoints import latest_complete
    from align.core.safeguards import NonFiniteWeightsError, check_finite

    last = lambda: latest_complete(stage.run_dir.path)  # noqa: E731
    pvr.use("policy")
    check_finite(pvr.model, when, last)
    for name, param in pvr.value_head.named_parameters():
        if not param.isfinite().all():
            raise NonFiniteWeightsError(f"non-finite weights {when} (first in value_head.{name}); lower train.learning_rate")


def save_final(stage, pvr) -> None:
    """The policy adapter as a standard PEFT adapter (adapter/); the value adapter and head (value/)."""
    from align.core.tracking import is_main_process

    if not is_main_process():
        return
    loop.save_standard_adapter(pvr.model, "value", stage.run_dir.path / VALUE, modules={"value_head": pvr.value_head})
    loop.save_policy_adapter(stage, pvr.model, "policy")
