"""The RL losses, as pure tensor functions (no model, no trainer): PPO's and the group policy gradient's.

Tensors in, tensors out; everything here is unit-tested against values worked out by hand
(tests/test_losses_ppo.py, tests/test_losses_group.py) and, for GRPO, against TRL's GRPOTrainer
(tests/test_grpo_parity.py). Shapes: B sequences x T response positions; `mask` is 1 on response
tokens the policy generated (prompt and padding are 0).

Shared: masked statistics, the per-token KL estimates (k1, k3) to the reference.

PPO (align/rlhf/ppo.py): the reward of a response is a scalar from the reward model, paid at its
last token; every token also pays a KL penalty to the reference (the SFT model):
    r_t = -kl_coef * kl_t            for every response token t
    r_T = r_T + score                at the last response token T
Advantages come from GAE over those rewards and the value estimates; the clipped policy and value
losses; the adaptive KL controller.

Group policy gradient (GRPO, RLOO: align/rlhf/group.py): the group advantages the estimators of
align/rlhf/estimators.py call (GRPO's group-relative, RLOO's leave-one-out), the KL penalty terms
(with TRL's bias correction), the clipped per-token policy terms and how they aggregate into the
loss (sequence mean, token mean, fixed length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize to zero mean, unit variance over masked positions (0 elsewhere)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0,
    lower variance), with p the policy and q the reference.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (use 'k1' or 'k3')")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token of each row (0 for a row without any)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * kl on every response token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    has_tokens = mask.sum(1) > 0
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens]
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens of each row.

    Returns (advantages, returns), both 0 outside `mask`. The value after the last response
    token is 0 (the episode ends there).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Masked positions neither receive an advantage nor pass one on.
        running = running * m
        advantages[:, t] = running
        next_value = torch.where(m.bool(), values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (as a loss) and the share of tokens where clipping bit."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) and the share clipped."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clip_fraction = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


@dataclass
class AdaptiveKLController:
    """Adapts kl_coef towards a target KL (Ziegler et al. 2019): proportional, clipped to +-20%."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, observed_kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


# --------------------------------------------------------------------------- group policy gradient (GRPO, RLOO)
#
# Shapes: the rewards of N = P * G responses, G per prompt, laid out prompt by prompt
# (rows i*G .. i*G+G-1 answer prompt i). `valid` marks responses that have a reward (a
# response no reward source scored is left out: it neither gets an advantage nor enters a
# baseline).


def _groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    ok = ~torch.isnan(rewards) if valid is None else valid.bool() & ~torch.isnan(rewards)
    r = torch.where(ok, rewards, torch.zeros_like(rewards)).view(-1, group_size)
    return r, ok.view(-1, group_size).to(rewards.dtype)


def _batch_std(rewards: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    flat = rewards[ok.reshape(-1).bool()]
    return flat.std() if flat.numel() > 1 else flat.new_tensor(0.0)


def _over_std(x: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (std + eps); where the std is 0 (all rewards equal) x is 0 too and stays 0."""
    return torch.where(std > 0, x / (std + eps), torch.zeros_like(x))


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", valid: torch.Tensor | None = None, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: each reward minus the mean of its group, divided by a std (scale) or not.

    scale: "group" = the (unbiased) std of the group's rewards; "batch" = the std of all valid
    rewards; "none" = no division. A group whose rewards are all equal gets advantage 0.
    `eps` keeps the division finite. Invalid responses get 0.
    """
    r, ok = _groups(rewards, group_size, valid)
    n = ok.sum(1, keepdim=True)
    mean = (r * ok).sum(1, keepdim=True) / n.clamp(min=1)
    centered = (r - mean) * ok
    if scale == "group":
        centered = _over_std(centered, ((centered**2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt(), eps)
    elif scale == "batch":
        centered = _over_std(centered, _batch_std(rewards, ok), eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r} (use 'group', 'batch' or 'none')")
    return (centered * ok).view(-1)


def leave_one_out_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "none", valid: torch.Tensor | None = None, eps: float = 1e-4
) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* valid rewards of its group.

    With n valid responses in a group: A_i = r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) * (r_i - mean).
    A group with fewer than 2 valid responses has no baseline: advantage 0. `scale` as in
    `group_advantages` ("group" divides by the std of the group's rewards, "batch" by the std of
    all valid rewards).
    """
    r, ok = _groups(rewards, group_size, valid)
    n = ok.sum(1, keepdim=True)
    total = (r * ok).sum(1, keepdim=True)
    baseline = (total - r) / (n - 1).clamp(min=1)
    adv = (r - baseline) * ok * (n >= 2).to(r.dtype)
    if scale == "group":
        mean = total / n.clamp(min=1)
        adv = _over_std(adv, ((((r - mean) * ok) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt(), eps)
    elif scale == "batch":
        adv = _over_std(adv, _batch_std(rewards, ok), eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r} (use 'group', 'batch' or 'none')")
    return adv.view(-1)


def kl_penalty_terms(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, bias_correction: bool = True
) -> torch.Tensor:
    """Per-token KL penalty of a policy loss (kl_in: loss), from responses sampled by the old policy.

    With `bias_correction` the estimate is weighted by the policy ratio exp(log p - log p_old), whose
    value is 1 on the sampling policy but whose gradient turns the penalty's gradient into the
    unbiased gradient of KL(policy || reference): E[(log p - log q) grad log p] (DeepSeek-V3.2; TRL's
    `use_bias_correction_kl`, on by default). Without it the gradient is the estimator's own: for k3,
    (1 - q/p) grad log p, which in expectation is the gradient of the forward KL(reference || policy);
    its pull back saturates at 1 on tokens the policy made likelier than the reference, so a policy
    drifts further under the same coefficient. For k1 the uncorrected gradient is 0 in expectation.
    """
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    if bias_correction:
        kl = kl * torch.exp(logprobs - old_logprobs)
    return kl


def clipped_policy_terms(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) and
    where clipping bit (1.0/0.0). `advantages` is one per sequence [B], broadcast over its tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, n_sequences: int, n_tokens: float, max_tokens: int) -> torch.Tensor:
    """The share of an update's loss from these rows; summed over the micro-batches of the update it is

    sequence_mean: (1 / N) sum_i (1 / |o_i|) sum_t l_it      (GRPO: each response weighs the same)
    token_mean:    (1 / T) sum_i sum_t l_it                  (DAPO: each token weighs the same)
    fixed_length:  (1 / (N * L)) sum_i sum_t l_it            (Dr. GRPO: a constant normalizer, no length bias)

    with N the update's responses (`n_sequences`), T its response tokens (`n_tokens`), L
    `max_tokens`. The normalizers are the whole update's, so splitting it into micro-batches
    (gradient accumulation) does not change the loss.
    """
    mask = mask.to(per_token.dtype)
    summed = (per_token * mask).sum(1)
    if mode == "sequence_mean":
        return (summed / mask.sum(1).clamp(min=1)).sum() / n_sequences
    if mode == "token_mean":
        return summed.sum() / max(n_tokens, 1.0)
    if mode == "fixed_length":
        return summed.sum() / (n_sequences * max_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r} (use 'sequence_mean', 'token_mean' or 'fixed_length')")
