"""Reference-free preference losses (CPO, SimPO, AlphaPO, ORPO) as pure tensor functions.

Tensors in, tensors out: no model, no trainer. Inputs are per-pair sequence log-probs of the
policy, shape (B,): the sum over the response tokens (`chosen_logps`) or their mean per token
(`chosen_avg_logps`), and, where a method adds one, the NLL of the chosen responses (a scalar:
the mean negative log-prob over all chosen tokens of the batch). TRL 1.16 has these methods
only under `trl.experimental`; they are written here from the papers and checked by hand and
against TRL's experimental code in tests/test_losses_preference.py, so the training path
never imports an unstable module.

Each returns a `PreferenceLoss`: the scalar to minimize, the per-pair preference term, and the
implicit rewards logged as rewards/chosen and rewards/rejected (margins and accuracies follow).
DPO's own losses stay TRL's (align/preference/dpo_trainer.py), KTO's too (trl.KTOTrainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar: the mean preference term plus any NLL term
    per_pair: torch.Tensor  # (B,) the preference term of each pair (before the mean and the NLL)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached
    extras: dict[str, torch.Tensor]  # detached scalars worth logging (nll, log odds, ...)


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) of the per-token log-probs over `mask` (1 on scored tokens), per row."""
    mask = mask.to(per_token_logps.dtype)
    total = (per_token_logps * mask).sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)


def chosen_nll(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-prob over every scored token of the rows given (token-weighted, as a cross-entropy)."""
    mask = mask.to(per_token_logps.dtype)
    return -(per_token_logps * mask).sum() / mask.sum().clamp(min=1)


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape r = (1 - p^-alpha) / alpha of a (length-normalized) log-prob; alpha=0 is log p."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(-alpha * logps)) / alpha


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float | None = None,
    alpha: float = 0.0,
    nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> PreferenceLoss:
    """CPO (Xu et al. 2024, Eq. 3-4) and the loss types TRL's CPO trainer offers on the same margin.

    With r = alphapo_reward(logps) and u = beta * (r_chosen - r_rejected):
      sigmoid  -(1-eps) log sigmoid(u) - eps log sigmoid(-u)   (CPO's preference term)
      hinge    relu(1 - u)
      ipo      (r_chosen - r_rejected - 1/(2 beta))^2
      simpo    as sigmoid with u = beta * (r_chosen - r_rejected) - gamma   (SimPO, Meng et al. 2024, Eq. 6)
    and the loss is mean(term) + nll_weight * nll (CPO's behaviour-cloning term; 0 for SimPO).
    SimPO and IPO take length-normalized log-probs (per-token means), sigmoid and hinge sums:
    the caller passes whichever the method uses. Rewards: beta * r.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss type {loss_type!r} (one of {', '.join(CPO_LOSS_TYPES)})")
    if loss_type == "simpo" and simpo_gamma is None:
        raise ValueError("loss_type simpo: simpo_gamma (the target margin) is required")
    chosen_r, rejected_r = alphapo_reward(chosen_logps, alpha), alphapo_reward(rejected_logps, alpha)
    margin = chosen_r - rejected_r
    if loss_type in ("sigmoid", "simpo"):
        u = beta * margin - (simpo_gamma if loss_type == "simpo" else 0.0)
        per_pair = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * margin)
    else:  # ipo
        per_pair = (margin - 1 / (2 * beta)) ** 2
    loss = per_pair.mean()
    extras = {}
    if nll is not None:
        loss = loss + nll_weight * nll
        extras["nll_loss"] = nll.detach()
    return PreferenceLoss(loss, per_pair, beta * chosen_r.detach(), beta * rejected_r.detach(), extras)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
    nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> PreferenceLoss:
    """SimPO: -log sigmoid(beta/|y_w| log p(y_w|x) - beta/|y_l| log p(y_l|x) - gamma), no reference.

    `gamma` is the target reward margin itself (SimPO's gamma; TRL's `simpo_gamma`). With
    `nll_weight` > 0 it is CPO-SimPO, with `alpha` != 0 AlphaPO.
    """
    return cpo_loss(
        chosen_avg_logps, rejected_avg_logps, beta=beta, loss_type="simpo", label_smoothing=label_smoothing,
        simpo_gamma=gamma, alpha=alpha, nll=nll, nll_weight=nll_weight,
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float, nll: torch.Tensor
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, Eq. 6-7): L = L_SFT + beta * mean(-log sigmoid(log odds_w - log odds_l)).

    odds(y|x) = p / (1 - p) with p the per-token mean probability exp(avg log-prob), so
    log odds = avg_logp - log(1 - exp(avg_logp)). `beta` is the paper's lambda; `nll` is L_SFT.
    Rewards: beta * avg log-prob (as TRL logs them). The per-pair term is -log sigmoid(log odds ratio).
    """
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    per_pair = -F.logsigmoid(log_odds)
    loss = nll + beta * per_pair.mean()
    extras = {
        "nll_loss": nll.detach(),
        "log_odds_ratio": F.logsigmoid(log_odds).mean().detach(),
        "log_odds_chosen": log_odds.mean().detach(),
    }
    return PreferenceLoss(loss, per_pair, beta * chosen.detach(), beta * rejected.detach(), extras)
