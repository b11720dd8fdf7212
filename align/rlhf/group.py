"""Group policy gradient (GRPO, RLOO, any group estimator) with LoRA adapters on one frozen base: the step and the loop.

One base in memory (the merged SFT model) carries:
  policy     trainable LoRA: samples G responses per prompt, is optimized
  reward<i>  frozen LoRA + score head per reward-run source (align/rlhf/rewards.py)
and the reference is the base with adapters disabled. No value model: the baseline of a
response is the other responses to the same prompt.

Each step: G samples for each of P prompts with the policy (align.modeling.generation, the
shared fast decoding loop); rewards from the configured sources (weighted total); the KL to the
reference either subtracted from the reward (kl_in: reward, RLOO) or added to the loss per
token (kl_in: loss, GRPO); advantages from the group by the method's estimator (align/rlhf/estimators.py;
GRPO: minus the group mean, optionally over a std; RLOO: minus the mean of the other responses); `epochs` passes of clipped
policy-gradient updates over micro-batches of train.batch_size responses, aggregated per
`loss_aggregation`. The math is in align/rlhf/losses.py.

Why not TRL's GRPOTrainer / RLOOTrainer (TRL 1.16): both take the policy as a PEFT model they
wrap themselves and refuse a PEFT model together with a peft_config; given an already wrapped
model that also carries a reward adapter, they copy its "default" adapter into a "ref" adapter
and use that, not the adapters-disabled base, as the reference. Their reward functions are
either separate models or callables that would have to switch the adapter of the model the
trainer is optimizing behind its back. And they sample through their own generate call, not
the shared loop the online stages are tuned on. Sampling, scoring and log-probs here are the
PPO stage's parts (align/rlhf/ppo_model.py, align/modeling/generation.py), so PPO, GRPO and RLOO
compute rewards, KL and log-probs the same way. `cfg` below is a group-RL stage config: its method's options
are its one GroupOptions section (align/rlhf/options.py group_section), its metrics are named after its stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from align.core.errors import DataError
from align.core.safeguards import NonFiniteError
from align.modeling import models
from align.modeling.generation import Sampled, Sampling
from align.modeling.train_setup import optimizer_and_schedule
from align.rlhf import group_rows
from align.rlhf import losses as P
from align.rlhf.distributed import World, row_seed
from align.rlhf.distributed import world as current_world
from align.rlhf.estimators import AdvantageEstimator
from align.rlhf.options import group_section
from align.rlhf.policy import OnlinePolicy
from align.rlhf.rewards import Scores
from align.rlhf.rollout import gather_rollout

POLICY = "policy"


class GroupPolicy(OnlinePolicy):
    """The online policy (align/rlhf/policy.py) with the log-prob passes the update needs."""

    def __init__(self, cfg, base, tokenizer, reward_runs, answers):
        super().__init__(cfg, base, tokenizer, POLICY, reward_runs, answers, checkpointing=True)

    def logprobs(self, seq, attn, n_resp, with_entropy=False, groups=None):
        """Per-token log-probs of the responses; `groups` (each row's prompt) lets a group's prompt run once."""
        return group_rows.logprobs(self.model, seq, attn, n_resp, groups, self.tokenizer.pad_token_id, with_entropy)

    @torch.no_grad()
    def reference_logprobs(self, seq, attn, n_resp, groups=None):
        with self.model.disable_adapter():
            return self.logprobs(seq, attn, n_resp, groups=groups)


def options(cfg):
    """The method's GroupOptions section (grpo:, rloo:, ...)."""
    return group_section(cfg)[1]


def sampling(cfg, samples: int, seed: int | None = None) -> Sampling:
    o = options(cfg)
    return Sampling(max_new_tokens=o.max_new_tokens, do_sample=True, temperature=o.temperature, top_p=o.top_p,
                    num_return_sequences=samples, seed=seed)


def rollout(gp: GroupPolicy, prompts: list[list[dict]], cfg, step: int = 0, first: int = 0) -> Sampled:
    """group_size responses per prompt from the policy, rows prompt by prompt. Sample j of the step's
    prompt first + i is drawn with the seed (train.seed, step, first + i, j), whichever process draws it."""
    g = options(cfg).group_size
    seeds = [row_seed(cfg.train.seed, step, first + i, j) for i in range(len(prompts)) for j in range(g)]
    return gp.engine.sample(prompts, sampling(cfg, g), seeds)


@dataclass
class StepRollout:
    """A step's responses from every rank, in prompt order, with what the update needs: the same on every rank."""

    roll: Sampled
    scores: Scores
    old_logp: torch.Tensor | None  # the sampling policy's log-probs, when the update needs them
    ref_logp: torch.Tensor | None  # the reference's, when the KL is on
    generation_s: float


def fixed_logprobs(gp: GroupPolicy, roll: Sampled, cfg, updates: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sampling policy's, reference's) log-probs of the rollout, each only where the step needs it.

    The policy changes within a step only with several updates per rollout; then the ratio needs the
    sampling policy's log-probs (and the KL in the reward needs them in any case). With one update the
    update's own forward is still the sampling policy: its detached log-probs serve (TRL does the same).
    """
    o = options(cfg)
    kl_on = o.kl_coef > 0
    need_old = o.epochs * updates > 1 or (kl_on and o.kl_in == "reward")
    gp.model.eval()
    chunk = cfg.train.eval_batch_size or cfg.train.batch_size
    chunks = [torch.arange(i, min(i + chunk, roll.seq.size(0))) for i in range(0, roll.seq.size(0), chunk)]

    def over_chunks(fn):
        return torch.cat([fn(roll.seq[rows], roll.attn[rows], roll.n_resp, groups=rows // o.group_size) for rows in chunks])

    with torch.no_grad():
        old_logp = over_chunks(gp.logprobs) if need_old else None
        ref_logp = over_chunks(gp.reference_logprobs) if kl_on else None
    return old_logp, ref_logp


def collect(gp: GroupPolicy, cfg, prompts, step: int, world: World, updates: int) -> StepRollout:
    """This rank samples, scores and log-probs its share of the step's prompts (whole groups), then every rank
    gathers the step. `updates`: optimizer updates per pass over the step (fixed_logprobs)."""
    mine = world.share(len(prompts))
    t0 = time.time()
    roll = rollout(gp, [prompts[i] for i in mine], cfg, step, mine.start)
    generation_s = time.time() - t0
    scores = gp.rewards.score(roll.prompts, roll.responses)
    old_logp, ref_logp = fixed_logprobs(gp, roll, cfg, updates)
    per_token = {name: t for name, t in (("old", old_logp), ("ref", ref_logp)) if t is not None}
    per_row = {"per_source": scores.per_source, "total": scores.total}
    roll, rows = gather_rollout(world, roll, per_row, per_token, gp.tokenizer.pad_token_id)
    scores = Scores(scores.names, rows["per_source"].cpu(), rows["total"].cpu())
    return StepRollout(roll, scores, rows.get("old"), rows.get("ref"), generation_s)


def shaped_rewards(roll: Sampled, cfg, scores: Scores, old_logp, ref_logp) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reward the advantages come from, which responses were scored): the sources' total, less the
    missing-EOS penalty and (kl_in: reward) the KL."""
    o = options(cfg)
    reward = scores.total.to(roll.mask.device)
    valid = ~torch.isnan(reward)
    if o.missing_eos_penalty is not None:
        reward = reward - o.missing_eos_penalty * (~roll.has_eos).float()
    if o.kl_coef > 0 and o.kl_in == "reward":
        reward = reward - o.kl_coef * (P.kl_per_token(old_logp, ref_logp, o.kl_estimator) * roll.mask).sum(1)
    return reward, valid


def accumulate_update(gp: GroupPolicy, cfg, roll: Sampled, rows_u: torch.Tensor, adv: torch.Tensor,
                      old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, logs: dict, kl_sampled: torch.Tensor,
                      mine: torch.Tensor | None = None) -> None:
    """The gradients of one optimizer update over the responses `rows_u`, in micro-batches of train.batch_size.

    Each micro-batch adds its share of the update's loss (align/rlhf/losses.py aggregate_loss: the
    normalizers are the whole update's), so the summed gradients do not depend on the split. With
    several processes this one trains on `mine` (its slice of `rows_u`; default all of them) with the
    normalizers of all of `rows_u`. Appends each micro-batch's loss terms to `logs`; fills `kl_sampled`
    where no sampling-policy pass ran.
    """
    o = options(cfg)
    kl_on = o.kl_coef > 0
    mask = roll.mask
    n_tokens = float(mask[rows_u].sum().item())
    mine = rows_u if mine is None else mine
    for start in range(0, len(mine), cfg.train.batch_size):
        rows = mine[start : start + cfg.train.batch_size]
        logp, entropy = gp.logprobs(roll.seq[rows], roll.attn[rows], roll.n_resp, with_entropy=True, groups=rows // o.group_size)
        old = old_logp[rows] if old_logp is not None else logp.detach()
        m = mask[rows]
        if kl_on and old_logp is None:  # one update per step: this pass is still the sampling policy
            kl_sampled[rows] = (P.kl_per_token(logp.detach(), ref_logp[rows], "k1") * m).sum(1)
        per_token, clipped = P.clipped_policy_terms(logp, old, adv[rows], o.clip_range, o.clip_range_high or o.clip_range)
        pg = P.aggregate_loss(per_token, m, o.loss_aggregation, len(rows_u), n_tokens, o.max_new_tokens)
        loss = pg
        if kl_on and o.kl_in == "loss":
            kl_term = o.kl_coef * P.aggregate_loss(
                P.kl_penalty_terms(logp, old, ref_logp[rows], o.kl_estimator, o.kl_bias_correction), m, o.loss_aggregation, len(rows_u), n_tokens, o.max_new_tokens
            )
            loss = loss + kl_term
            logs["kl_loss_term"].append(kl_term.item())
        loss.backward()
        logs["loss"].append(loss.item())
        logs["policy_loss"].append(pg.item())
        logs["clip_frac"].append(P.masked_mean(clipped, m).item())
        logs["entropy"].append(P.masked_mean(entropy, m).item())


def group_order(n: int, group_size: int, device, generator: torch.Generator) -> torch.Tensor:
    """The rollout's rows in a random order of whole groups: a micro-batch then holds whole groups
    wherever its size allows, whose prompt the log-prob passes compute once (align/rlhf/group_rows.py)."""
    groups = torch.randperm(n // group_size, generator=generator).to(device)
    return (groups[:, None] * group_size + torch.arange(group_size, device=device)).flatten()


def group_step(gp: GroupPolicy, cfg, prompts, optimizer, scheduler, estimator: AdvantageEstimator, step: int = 0,
               world: World | None = None) -> dict:
    """One step: rollout, rewards, `estimator`'s advantages, `epochs` passes of clipped updates. Returns the step's metrics.

    `prompts` are the whole step's; with several processes each samples its share and trains on its
    slice of every update, and the step equals one process's with the whole batch (align/rlhf/distributed.py).
    """
    o = options(cfg)
    world = world or current_world()
    per_rank = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    updates = len(prompts) * o.group_size // (per_rank * world.size)
    batch = collect(gp, cfg, prompts, step, world, updates)
    t1 = time.time()
    reward, valid = shaped_rewards(batch.roll, cfg, batch.scores, batch.old_logp, batch.ref_logp)
    adv = estimator(torch.where(valid, reward, torch.full_like(reward, math.nan)), o.group_size, o.scale_advantages)
    adv = adv.to(batch.roll.mask.device)
    logs, kl_sampled = update_passes(gp, cfg, batch, adv, optimizer, scheduler, step, world, updates)
    times = world.max(torch.tensor([batch.generation_s, time.time() - t1], device=batch.roll.mask.device)).tolist()
    return step_metrics(cfg, batch.roll, batch.scores, reward, valid.cpu(), adv, logs, kl_sampled, updates, scheduler, *times)


def update_passes(gp: GroupPolicy, cfg, batch: StepRollout, adv, optimizer, scheduler, step: int, world: World,
                  updates: int) -> tuple[dict[str, tuple[float, int]], torch.Tensor]:
    """`epochs` passes of clipped policy-gradient updates over the step's rollout.

    Each pass shuffles the step's groups with a seed of (train.seed, step), the same on every rank, and
    cuts their rows into updates of N x train.batch_size x gradient_accumulation_steps rows; rank r trains on
    the r-th slice of each update (accumulate_update, with the update's normalizers over all ranks), and
    the gradients are summed across ranks before the optimizer steps. Returns each logged term's
    (sum, count) over the micro-batches of every rank, and each response's KL to the reference under
    the sampling policy.
    """
    o = options(cfg)
    roll, old_logp, ref_logp = batch.roll, batch.old_logp, batch.ref_logp
    n = roll.mask.size(0)
    per_rank = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    per_update = per_rank * world.size
    gp.model.train()
    params = gp.trainable_parameters()
    logs: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "clip_frac", "entropy", "kl_loss_term")}
    kl_sampled = torch.zeros(n, device=roll.mask.device)  # KL of each response to the reference, under the sampling policy
    if ref_logp is not None and old_logp is not None:
        kl_sampled = (P.kl_per_token(old_logp, ref_logp, "k1") * roll.mask).sum(1)
    shuffle = torch.Generator().manual_seed(row_seed(cfg.train.seed, step, "order"))
    for _ in range(o.epochs):
        order = group_order(n, o.group_size, roll.mask.device, shuffle)  # fresh updates every pass
        for u in range(updates):
            rows_u = order[u * per_update : (u + 1) * per_update]
            mine = rows_u[world.rank * per_rank : (world.rank + 1) * per_rank]
            accumulate_update(gp, cfg, roll, rows_u, adv, old_logp, ref_logp, logs, kl_sampled, mine=mine)
            world.sum_gradients(params)
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
                raise NonFiniteError(f"non-finite gradient in a {cfg.stage.upper()} update")
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            gp.engine.policy_updated()
    if ref_logp is not None and old_logp is None:  # each rank filled the rows it trained on
        world.sum(kl_sampled)
    totals = world.sum(torch.tensor([[sum(v), len(v)] for v in logs.values()], dtype=torch.float64, device=roll.mask.device))
    return {k: (s, int(c)) for k, (s, c) in zip(logs, totals.tolist())}, kl_sampled


def step_metrics(cfg, roll, scores, reward, valid, adv, logs, kl_sampled, updates, scheduler, t_gen, t_train) -> dict:
    """The step's metrics (named <stage>/...), over the global batch. `logs`: each logged term's (sum, count) over all
    micro-batches."""
    o = options(cfg)
    prefix = cfg.stage
    mask = roll.mask
    passes = max(o.epochs * updates, 1)

    def mean(key: str) -> float:
        total, count = logs[key]
        return total / count if count else math.nan

    out = {
        # Micro-batch losses are shares of their update's loss: the update's loss is their sum (over ranks too).
        f"{prefix}/loss": logs["loss"][0] / passes,
        f"{prefix}/clip_frac": mean("clip_frac"),
        f"{prefix}/entropy": mean("entropy"),
        f"{prefix}/policy_loss": logs["policy_loss"][0] / passes,
        # The reward the advantages come from: the sources' total, less the missing-EOS penalty and (kl_in: reward) the KL.
        f"{prefix}/reward_shaped": reward[valid.to(reward.device)].mean().item() if valid.any() else math.nan,
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
    if o.kl_coef > 0:
        out[f"{prefix}/kl"] = kl_sampled.mean().item()
        out[f"{prefix}/kl_coef"] = o.kl_coef
    if logs["kl_loss_term"][1]:
        out[f"{prefix}/kl_loss_term"] = logs["kl_loss_term"][0] / passes
    checked = ("loss", "clip_frac", "entropy", "advantage_abs", "kl")
    if any(not math.isfinite(out[f"{prefix}/{k}"]) for k in checked if f"{prefix}/{k}" in out):
        raise NonFiniteError(f"non-finite {cfg.stage.upper()} statistics (loss, advantage or KL)")
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


def optimizer_updates(cfg) -> int:
    """Optimizer updates of the whole run: train.max_steps x epochs x the updates of one pass over a step."""
    o = options(cfg)
    per_update = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * current_world().size
    return cfg.train.max_steps * o.epochs * (o.prompts_per_step * o.group_size // per_update)


def check_processes(cfg, size: int) -> None:
    """A step's prompts split over `size` processes into whole groups, each rank's rows into whole updates."""
    from align.rlhf.distributed import check_shards

    name, o = group_section(cfg)
    check_shards(size, o.prompts_per_step, f"{name}.prompts_per_step", rows_per_prompt=o.group_size,
                 rows_per_update=cfg.train.batch_size * cfg.train.gradient_accumulation_steps)


def train(stage, cfg, estimator: AdvantageEstimator, reward_runs, callbacks=()) -> tuple[GroupPolicy, dict]:
    """Steps 1..train.max_steps (resuming from stage.resume_from), the adapter saved; returns the model and summary.

    `stage` is the StageRun (tracker, run_dir, base, splits); `estimator` the method's advantages (its stage
    record's); `reward_runs` the checked RunDirs of the reward-run sources (align.rlhf.rewards.reward_runs);
    `callbacks` see the trained model (on_train_end, every rank). Every rank runs this; rank 0 writes.
    """
    from transformers import set_seed

    from align.core.checkpoints import CHECKPOINTS
    from align.rlhf import loop
    from align.rlhf.keep_best import KeepBest, adapter_weights, keep_last_then_restore
    from align.rlhf.rewards import answers_of

    name, o = group_section(cfg)
    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    gp = GroupPolicy(cfg, stage.base, tokenizer, reward_runs, answers_of(stage.splits.train + stage.splits.eval))
    counts = models.count_parameters(gp.model)
    optimizer, scheduler = optimizer_and_schedule(cfg, gp.trainable_parameters(), gp.model, optimizer_updates(cfg))
    keep = KeepBest(o.keep_best_within_kl, "eval/reward/total")
    start = 0
    if stage.resume_from is not None:
        start = loop.load_checkpoint(stage.resume_from, gp.model, [POLICY], optimizer, scheduler)["step"]
        keep.load(stage.resume_from)
    eval_prompts = _eval_prompts(stage, name, o, keep)
    steps = _Steps(stage, cfg, gp, estimator, optimizer, scheduler, start, keep, eval_prompts)
    final = loop.run_steps(
        stage, cfg, start=start, total=cfg.train.max_steps, step_fn=steps.step, save_fn=steps.save, describe=steps.describe,
        desc=cfg.stage, eval_fn=steps.evaluate if eval_prompts else None,
        on_eval=lambda done, metrics: keep.offer(done, metrics, lambda: adapter_weights(gp.model, POLICY)),
    )
    steps.watch.finish()
    steps.finite(f"after step {cfg.train.max_steps}")
    loop.notify_train_end(callbacks, gp.model)
    last = stage.run_dir.path / CHECKPOINTS / f"checkpoint-{cfg.train.max_steps}"
    keep_last_then_restore(keep, last, lambda: steps.save(cfg.train.max_steps), gp.model, POLICY)
    counts.update(loop.save_policy_adapter(stage, gp.model, POLICY))
    return gp, _summary(stage, cfg, final, counts, keep)


def _eval_prompts(stage, section: str, o, keep) -> list[list[dict]]:
    from align.core.data import distinct_prompts

    eval_prompts = distinct_prompts(stage.splits.eval, o.eval_prompts) if o.eval_prompts else []
    if keep.active and not eval_prompts:
        raise DataError(f"{section}.keep_best_within_kl: needs held-out prompts; data '{stage.splits.source}' has no held-out rows")
    return eval_prompts


class _Steps:
    """What the step loop (align/rlhf/loop.py run_steps) calls: a step, a checkpoint, an evaluation, a log line."""

    def __init__(self, stage, cfg, gp: GroupPolicy, estimator, optimizer, scheduler, start: int, keep, eval_prompts):
        from align.rlhf.rewards import UnscoredWatch, scored_before

        self.stage, self.cfg, self.gp, self.estimator = stage, cfg, gp, estimator
        self.optimizer, self.scheduler, self.keep, self.eval_prompts = optimizer, scheduler, keep, eval_prompts
        o = options(cfg)
        self.prompts = [r["prompt"] for r in stage.splits.train]
        self.responses, self.unscored_key = o.prompts_per_step * o.group_size, f"{cfg.stage}/reward/unscored"
        earlier = start > 0 and scored_before(stage.run_dir.metrics_path, self.unscored_key, self.responses)
        self.watch = UnscoredWatch(cfg.stage, cfg.unscored_warning, scored_before=earlier)

    def step(self, i: int) -> dict:
        from align.rlhf.loop import batch_prompts

        cfg = self.cfg
        prompts = batch_prompts(self.prompts, i, options(cfg).prompts_per_step, cfg.train.seed)
        metrics = group_step(self.gp, cfg, prompts, self.optimizer, self.scheduler, self.estimator, step=i)
        self.watch.observe(metrics[self.unscored_key], self.responses, f"step {i + 1}")
        return metrics

    def finite(self, when: str) -> None:  # never a checkpoint, an evaluation or the adapter of non-finite weights
        from align.core.checkpoints import latest_complete
        from align.core.safeguards import check_finite

        self.gp.model.set_adapter(POLICY)
        check_finite(self.gp.model, when, lambda: latest_complete(self.stage.run_dir.path))

    def save(self, done: int):
        from align.rlhf import loop

        self.finite(f"after step {done}")
        return loop.save_checkpoint(self.stage.run_dir.path, done, self.gp.model, [POLICY], self.optimizer, self.scheduler, {},
                                    self.cfg.train.save_total_limit, extra=self.keep.save)

    def describe(self, done: int, m: dict) -> str:
        p = self.cfg.stage
        kl = f", kl {m[f'{p}/kl']:.3f}" if f"{p}/kl" in m else ""
        return f"reward {m[f'{p}/reward/total']:.3f}{kl}, groups without signal {m[f'{p}/groups_without_signal']}"

    def evaluate(self) -> dict:
        self.finite(f"after step {self.stage.step or 0}")
        return held_out(self.gp, self.eval_prompts, self.cfg, self.cfg.train.seed)


def _summary(stage, cfg, final: dict, counts: dict, keep) -> dict:
    from align.rlhf import loop

    before = loop.logged_at_step(stage.run_dir, 0)
    return {
        "steps": cfg.train.max_steps,
        "eval_reward_before": before.get("eval/reward/total"),
        "eval_reward_after": final.get("eval/reward/total"),
        "eval_kl_after": final.get("eval/kl"),
        "eval_rewards_after": {k.rpartition("/")[2]: v for k, v in final.items() if k.startswith("eval/reward/") and not k.endswith("_scored")},
        "parameters": counts,
        **keep.summary(),
    }
