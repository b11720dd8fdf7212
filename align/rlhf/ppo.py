"""PPO with LoRA adapters on one frozen base: the model side and one PPO step.

One base in memory (the merged SFT model) carries three adapters:
  policy  trainable LoRA: samples responses, is optimized
  value   trainable LoRA + a scalar value head on its hidden states
  reward  frozen LoRA + score head, loaded from the reward RunDir
and the reference is the base with adapters disabled. No second copy of the model.

Each step: sample responses to a batch of prompts with the policy; score them with the
reward adapter; pay a per-token KL penalty to the reference; GAE advantages from the
value adapter; several epochs of clipped PPO updates over minibatches. The math lives
in align/rlhf/losses.py; this module moves tensors between the model and that math.
`cfg` below is the PPO stage's config (its `ppo` and `train` sections).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.artifacts import RunDir
from align.core.errors import DataError
from align.core.safeguards import NonFiniteError
from align.modeling import models
from align.modeling.adapters import attach_adapter, load_frozen_adapter
from align.modeling.generation import Sampled, Sampling, eos_token_ids, position_ids, response_logprobs
from align.rlhf import loop
from align.rlhf import losses as P
from align.rlhf.distributed import World, row_seed
from align.rlhf.distributed import world as current_world
from align.rlhf.rollout import LocalRollout, gather_rollout
from align.modeling.scoring import score_conversations

VALUE = "value"  # RunDir folder of the value adapter and head


class ValueHead(torch.nn.Module):
    """hidden state -> scalar value estimate."""

    def __init__(self, hidden_size: int, init_std: float):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=init_std) if init_std > 0 else torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


class PolicyValueReward:
    """The base with its three adapters, and the forward passes PPO needs."""

    def __init__(self, cfg, base, reward_run: RunDir, tokenizer):
        self.tokenizer = tokenizer
        model = models.load_model(base, cfg.model)
        self.model = attach_adapter(model, cfg, "policy")
        attach_adapter(self.model, cfg, "value", reference=False)
        _, head = load_frozen_adapter(self.model, reward_run.adapter_dir, "reward")
        if head is None:
            raise DataError(f"reward_run: {reward_run.path}/adapter has no score head; is it a reward run?")
        device = next(self.model.parameters()).device
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        compute_dtype = torch.float32 if dtype == torch.uint8 else dtype
        self.score_head = head.to(device=device, dtype=compute_dtype)
        self.value_head = ValueHead(model.config.hidden_size, cfg.ppo.value_head_init_std).to(device=device, dtype=compute_dtype)
        self.backbone = getattr(self.model.get_base_model(), self.model.get_base_model().base_model_prefix)
        self.eos_ids = eos_token_ids(self.model, tokenizer)
        self.use("policy")
        self.engine = LocalRollout(self.model, tokenizer, lambda: self.use("policy"))

    # -- adapters --------------------------------------------------------------

    def use(self, adapter: str) -> None:
        """Activate one adapter; PEFT freezes the others on a switch, so re-enable the trainable ones."""
        self.model.set_adapter(adapter)
        self.model.base_model.set_requires_grad(["policy", "value"], True)
        self.model.base_model.set_requires_grad("reward", False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        adapters = [p for n, p in self.model.named_parameters() if ".policy." in n or ".value." in n]
        return adapters + list(self.value_head.parameters())

    # -- forward passes --------------------------------------------------------

    def logprobs(self, seq: torch.Tensor, attn: torch.Tensor, n_resp: int, with_entropy: bool = False):
        """Log-probs of the response tokens (last n_resp positions) under the active adapter (or none)."""
        return response_logprobs(self.model, seq, attn, n_resp, with_entropy)

    def values(self, seq: torch.Tensor, attn: torch.Tensor, n_resp: int) -> torch.Tensor:
        """V(s_t) for each response token t: the value head on the hidden state before it."""
        hidden = self.backbone(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).last_hidden_state
        return self.value_head(hidden[:, -n_resp - 1 : -1]).float()

    @torch.no_grad()
    def scores(self, conversations: list[list[dict]]) -> torch.Tensor:
        """Reward-model scores of whole conversations, rendered exactly as the reward stage trained on them."""
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout while scoring
        self.use("reward")
        try:
            return score_conversations(self.backbone, self.score_head, self.tokenizer, conversations)
        finally:
            self.use("policy")
            self.model.train(was_training)


def sample(pvr: PolicyValueReward, prompts: list[list[dict]], cfg, seeds: list[int]) -> Sampled:
    """One response per prompt from the policy adapter, response i drawn with seed `seeds[i]`."""
    p = cfg.ppo
    sampling = Sampling(max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.temperature, top_p=p.top_p)
    return pvr.engine.sample(prompts, sampling, seeds)


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_prompts(prompts: list[list[dict]], step: int, size: int, seed: int) -> list[list[dict]]:
    """The prompts of a step: a fresh seeded permutation per pass over the data (resumable by step)."""
    start = step * size
    picked = []
    for i in range(start, start + size):
        epoch, pos = divmod(i, len(prompts))
        picked.append(prompts[prompt_order(len(prompts), seed, epoch)[pos]])
    return picked


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
