"""Group policy gradient (GRPO and RLOO) with LoRA adapters on one frozen base.

One base in memory (the merged SFT model) carries:
  policy     trainable LoRA: samples G responses per prompt, is optimized
  reward<i>  frozen LoRA + score head per reward-run source (align/rlhf/rewards.py)
and the reference is the base with adapters disabled. No value model: the baseline of a
response is the other responses to the same prompt.

Each step: G samples for each of P prompts with the policy (align.modeling.generation, the
shared fast decoding loop); rewards from the configured sources (weighted total); the KL to the
reference either subtracted from the reward (kl_in: reward, RLOO) or added to the loss per
token (kl_in: loss, GRPO); advantages from the group (GRPO: minus the group mean, optionally
over a std; RLOO: minus the mean of the other responses); `epochs` passes of clipped
policy-gradient updates over micro-batches of train.batch_size responses, aggregated per
`loss_aggregation`. The math is in align/rlhf/losses.py.

Why not TRL's GRPOTrainer / RLOOTrainer (TRL 1.16): both take the policy as a PEFT model they
wrap themselves and refuse a PEFT model together with a peft_config; given an already wrapped
model that also carries a reward adapter, they copy its "default" adapter into a "ref" adapter
and use that, not the adapters-disabled base, as the reference. Their reward functions are
either separate models or callables that would have to switch the adapter of the model the
trainer is optimizing behind its back. And they sample through their own generate call, not
the shared loop the online stages are tuned on. Sampling, scoring and log-probs here are the
PPO stage's parts (align/rlhf/ppo.py, align/modeling/generation.py), so PPO, GRPO and RLOO
compute rewards, KL and log-probs the same way. `cfg` below is the GRPO or RLOO stage config.
"""

from __future__ import annotations

import math
import time

import torch

from align.core.errors import DataError
from align.core.safeguards import NonFiniteError
from align.modeling import models
from align.modeling.adapters import attach_adapter
from align.modeling.lora_plus import optimizer_groups
from align.modeling.generation import Sampled, Sampling, response_logprobs, sample_tokens
from align.rlhf import losses as P
from align.rlhf.rewards import Rewards

POLICY = "policy"


class GroupPolicy:
    """The base with the policy adapter and the frozen reward adapters, and the passes the update needs."""

    def __init__(self, cfg, base, tokenizer, reward_runs, answers):
        self.tokenizer = tokenizer
        plain = models.load_model(base, cfg.model)
        checkpointing = gradient_checkpointing(cfg, plain)
        self.model = attach_adapter(plain, cfg, POLICY)
        if checkpointing:  # recompute activations in the update's backward (generation runs in eval mode, with its cache)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.rewards = Rewards(cfg.rewards, model=self.model, tokenizer=tokenizer, runs=reward_runs, answers=answers)
        self.model.set_adapter(POLICY)
        for name, param in self.model.named_parameters():  # only the policy adapter trains
            param.requires_grad_(f".{POLICY}." in name)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{POLICY}." in n]

    def logprobs(self, seq, attn, n_resp, with_entropy=False):
        return response_logprobs(self.model, seq, attn, n_resp, with_entropy)

    @torch.no_grad()
    def reference_logprobs(self, seq, attn, n_resp):
        with self.model.disable_adapter():
            return response_logprobs(self.model, seq, attn, n_resp)


def gradient_checkpointing(cfg, model) -> bool:
    """train.gradient_checkpointing for the update's micro-batches; auto decides by memory (align/core/memory.py)."""
    import logging

    from align.core import memory

    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return setting
    decision = memory.decide_for(cfg, model, str(next(model.parameters()).device), rows_per_example=1)
    logging.getLogger("align").info("%s: %s", cfg.stage, decision.describe())
    return decision.on


def options(cfg):
    """The method's section: `grpo:` or `rloo:`."""
    return getattr(cfg, cfg.stage)


def sampling(cfg, samples: int, seed: int | None = None) -> Sampling:
    o = options(cfg)
    return Sampling(max_new_tokens=o.max_new_tokens, do_sample=True, temperature=o.temperature, top_p=o.top_p,
                    num_return_sequences=samples, seed=seed)


def rollout(gp: GroupPolicy, prompts: list[list[dict]], cfg) -> Sampled:
    """group_size responses per prompt from the policy, rows prompt by prompt."""
    gp.model.set_adapter(POLICY)
    return sample_tokens(gp.model, gp.tokenizer, prompts, sampling(cfg, options(cfg).group_size))


def advantages(estimator: str, rewards: torch.Tensor, cfg) -> torch.Tensor:
    o = options(cfg)
    if estimator == "grpo":
        return P.group_advantages(rewards, o.group_size, o.scale_advantages)
    if estimator == "rloo":
        return P.leave_one_out_advantages(rewards, o.group_size, o.scale_advantages)
    raise ValueError(f"unknown estimator {estimator!r}")


def group_step(gp: GroupPolicy, cfg, prompts, optimizer, scheduler, estimator: str) -> dict:
    """One step: rollout, rewards, advantages, `epochs` passes of clipped updates. Returns the step's metrics."""
    o = options(cfg)
    t0 = time.time()
    roll = rollout(gp, prompts, cfg)
    t_gen = time.time() - t0

    t1 = time.time()
    scores = gp.rewards.score(roll.prompts, roll.responses)
    reward = scores.total.clone()
    valid = ~torch.isnan(reward)
    if o.missing_eos_penalty is not None:
        reward = reward - o.missing_eos_penalty * (~roll.has_eos).float()
    mask = roll.mask
    n = mask.size(0)
    micro = cfg.train.batch_size
    per_update = micro * cfg.train.gradient_accumulation_steps
    updates = n // per_update
    # The policy changes within a step only with several updates per rollout; then the ratio needs
    # the sampling policy's log-probs (and the KL in the reward needs them in any case).
    kl_on = o.kl_coef > 0
    need_old = o.epochs * updates > 1 or (kl_on and o.kl_in == "reward")
    gp.model.eval()
    with torch.no_grad():
        old_logp = gp.logprobs(roll.seq, roll.attn, roll.n_resp) if need_old else None
        ref_logp = gp.reference_logprobs(roll.seq, roll.attn, roll.n_resp) if kl_on else None
    if kl_on and o.kl_in == "reward":
        reward = reward - o.kl_coef * (P.kl_per_token(old_logp, ref_logp, o.kl_estimator) * mask).sum(1)
    adv = advantages(estimator, torch.where(valid, reward, torch.full_like(reward, math.nan)), cfg).to(mask.device)

    gp.model.train()
    params = gp.trainable_parameters()
    logs: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "clip_frac", "entropy", "kl_loss_term")}
    kl_sampled = torch.zeros(n, device=mask.device)  # KL of each response to the reference, under the sampling policy
    if kl_on and old_logp is not None:
        kl_sampled = (P.kl_per_token(old_logp, ref_logp, "k1") * mask).sum(1)
    for _ in range(o.epochs):
        order = torch.randperm(n, device=mask.device)  # fresh micro-batches every epoch
        for u in range(updates):
            rows_u = order[u * per_update : (u + 1) * per_update]
            n_tokens = float(mask[rows_u].sum().item())
            for start in range(0, per_update, micro):
                rows = rows_u[start : start + micro]
                logp, entropy = gp.logprobs(roll.seq[rows], roll.attn[rows], roll.n_resp, with_entropy=True)
                old = old_logp[rows] if old_logp is not None else logp.detach()
                m = mask[rows]
                if kl_on and old_logp is None:  # one update per step: this pass is still the sampling policy
                    kl_sampled[rows] = (P.kl_per_token(logp.detach(), ref_logp[rows], "k1") * m).sum(1)
                per_token, clipped = P.clipped_policy_terms(logp, old, adv[rows], o.clip_range, o.clip_range_high or o.clip_range)
                pg = P.aggregate_loss(per_token, m, o.loss_aggregation, len(rows_u), n_tokens, o.max_new_tokens)
                loss = pg
                if kl_on and o.kl_in == "loss":
                    kl_term = o.kl_coef * P.aggregate_loss(
                        P.kl_per_token(logp, ref_logp[rows], o.kl_estimator), m, o.loss_aggregation, len(rows_u), n_tokens, o.max_new_tokens
                    )
                    loss = loss + kl_term
                    logs["kl_loss_term"].append(kl_term.item())
                loss.backward()
                logs["loss"].append(loss.item())
                logs["policy_loss"].append(pg.item())
                logs["clip_frac"].append(P.masked_mean(clipped, m).item())
                logs["entropy"].append(P.masked_mean(entropy, m).item())
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
                raise NonFiniteError(f"non-finite gradient in a {estimator.upper()} update")
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    t_train = time.time() - t1

    prefix = estimator
    # Micro-batch losses are shares of their update's loss: the update's loss is their sum.
    per_update_loss = sum(logs["loss"]) / max(o.epochs * updates, 1)
    out = {
        f"{prefix}/loss": per_update_loss,
        f"{prefix}/clip_frac": sum(logs["clip_frac"]) / len(logs["clip_frac"]),
        f"{prefix}/entropy": sum(logs["entropy"]) / len(logs["entropy"]),
        f"{prefix}/policy_loss": sum(logs["policy_loss"]) / max(o.epochs * updates, 1),
        # The reward the advantages come from: the sources' total, less the missing-EOS penalty and (kl_in: reward) the KL.
        f"{prefix}/reward_shaped": reward[valid].mean().item() if valid.any() else math.nan,
        f"{prefix}/advantage_abs": adv.abs().mean().item(),
        f"{prefix}/groups_without_signal": _flat_groups(scores.total, valid, o.group_size),
        f"{prefix}/response_length": mask.sum(1).mean().item(),
        f"{prefix}/eos_share": roll.has_eos.float().mean().item(),
        f"{prefix}/rollout_tokens": int(roll.attn.sum().item()),
        f"{prefix}/learning_rate": scheduler.get_last_lr()[0],
        "time/generation_s": t_gen,
        "time/training_s": t_train,
    }
    out.update(scores.metrics(f"{prefix}/reward"))
    if kl_on:
        out[f"{prefix}/kl"] = kl_sampled.mean().item()
        out[f"{prefix}/kl_coef"] = o.kl_coef
    if logs["kl_loss_term"]:
        out[f"{prefix}/kl_loss_term"] = sum(logs["kl_loss_term"]) / max(o.epochs * updates, 1)
    checked = ("loss", "clip_frac", "entropy", "advantage_abs", "kl")
    if any(not math.isfinite(out[f"{prefix}/{k}"]) for k in checked if f"{prefix}/{k}" in out):
        raise NonFiniteError(f"non-finite {estimator.upper()} statistics (loss, advantage or KL)")
    return out


def _flat_groups(reward: torch.Tensor, valid: torch.Tensor, group_size: int) -> int:
    """Groups whose sources gave every response the same total: only the KL (and EOS penalty) moves them."""
    r = torch.where(valid, reward, torch.zeros_like(reward)).view(-1, group_size)
    ok = valid.view(-1, group_size)
    flat = 0
    for row, keep in zip(r, ok):
        values = row[keep]
        flat += int(values.numel() < 2 or bool((values == values[0]).all()))
    return flat


def held_out(gp: GroupPolicy, prompts: list[list[dict]], cfg, seed: int) -> dict:
    """Reward (each source and the total) and KL to the reference of one seeded sample per held-out prompt."""
    from align.rlhf.rewards import held_out_metrics

    gp.model.set_adapter(POLICY)
    return held_out_metrics(gp.model, gp.tokenizer, gp.rewards, prompts, sampling(cfg, 1), seed)


def optimizer_and_schedule(cfg, params, model=None):
    """AdamW over the policy adapter, the schedule counted in optimizer updates."""
    from transformers import get_scheduler

    o = options(cfg)
    optimizer = torch.optim.AdamW(optimizer_groups(cfg, params, model), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    per_step = o.prompts_per_step * o.group_size // (cfg.train.batch_size * cfg.train.gradient_accumulation_steps)
    updates = cfg.train.max_steps * o.epochs * per_step
    scheduler = get_scheduler(
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * updates), num_training_steps=updates
    )
    return optimizer, scheduler


def check_prompts(rows: list[dict], key: str = "data.path") -> list[list[dict]]:
    prompts = [r["prompt"] for r in rows]
    if not prompts:
        raise DataError(f"{key}: no training prompts")
    return prompts


def train(stage, cfg, estimator: str, reward_runs) -> tuple[GroupPolicy, dict]:
    """Steps 1..train.max_steps (resuming from stage.resume_from), the adapter saved; returns the model and summary.

    `stage` is the StageRun (tracker, run_dir, base, splits); `reward_runs` the checked RunDirs of
    the reward-run sources (align.rlhf.rewards.reward_runs).
    """
    from transformers import set_seed

    from align.core.artifacts import ADAPTER
    from align.core.data import distinct_prompts
    from align.core.tracking import is_main_process
    from align.modeling.adapters import adapter_bytes
    from align.rlhf import loop
    from align.rlhf.ppo import batch_prompts
    from align.rlhf.rewards import answers_of

    o = options(cfg)
    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    gp = GroupPolicy(cfg, stage.base, tokenizer, reward_runs, answers_of(stage.splits.train + stage.splits.eval))
    params = gp.trainable_parameters()
    counts = models.count_parameters(gp.model)
    optimizer, scheduler = optimizer_and_schedule(cfg, params, gp.model)
    start = 0
    if stage.resume_from is not None:
        start = loop.load_checkpoint(stage.resume_from, gp.model, [POLICY], optimizer, scheduler)["step"]
    prompts = [r["prompt"] for r in stage.splits.train]
    eval_prompts = distinct_prompts(stage.splits.eval, o.eval_prompts) if o.eval_prompts else []

    def step(i: int) -> dict:
        return group_step(gp, cfg, batch_prompts(prompts, i, o.prompts_per_step, cfg.train.seed), optimizer, scheduler, estimator)

    def save(done: int):
        return loop.save_checkpoint(stage.run_dir.path, done, gp.model, [POLICY], optimizer, scheduler, {}, cfg.train.save_total_limit)

    def describe(done: int, m: dict) -> str:
        kl = f", kl {m[f'{estimator}/kl']:.3f}" if f"{estimator}/kl" in m else ""
        return f"reward {m[f'{estimator}/reward/total']:.3f}{kl}, groups without signal {m[f'{estimator}/groups_without_signal']}"

    final = loop.run_steps(
        stage, cfg, start=start, total=cfg.train.max_steps, step_fn=step, save_fn=save, describe=describe, desc=estimator,
        eval_fn=(lambda: held_out(gp, eval_prompts, cfg, cfg.train.seed)) if eval_prompts else None,
    )
    target = stage.run_dir.path / ADAPTER
    if is_main_process():
        loop.save_standard_adapter(gp.model, POLICY, target)
        stage.tracker.log_artifact(target, name=f"{estimator}-adapter", type="model",
                                   metadata={"stage": estimator, "base_model": stage.base.name})
        counts["adapter_bytes"] = adapter_bytes(target)
    before = loop.logged_at_step(stage.run_dir, 0)
    summary = {
        "steps": cfg.train.max_steps,
        "eval_reward_before": before.get("eval/reward/total"),
        "eval_reward_after": final.get("eval/reward/total"),
        "eval_kl_after": final.get("eval/kl"),
        "eval_rewards_after": {k.rpartition("/")[2]: v for k, v in final.items() if k.startswith("eval/reward/") and not k.endswith("_scored")},
        "parameters": counts,
    }
    return gp, summary
