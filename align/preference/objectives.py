"""Offline preference objectives as objects: what a loss needs from the forward pass, and the loss itself.

An objective says what it needs, and the trainer (align/preference/objective_trainer.py) computes
only that:
  needs_reference    a reference forward (the policy with its adapter disabled; full fine-tuning: a
                     frozen copy of the starting weights) runs only when True, as torchtune gates it
                     on its losses' `is_reference_free`;
  length_normalized  per-token mean log-probs of each response instead of their sums;
  needs_nll          the NLL of the chosen responses, over the response (or, with nll_on_prompt,
                     prompt + response: that needs prompt-token log-probs, which the shared-prefix
                     forward does not compute, so such an objective runs on the two-row layout);
  metrics            extra figures it logs (keys of PreferenceLoss.extras), reported before/after.
Calling it on a batch's log-probs (`PairLogps`) returns a `PreferenceLoss`; the math is the pure
tensor functions of align/preference/losses.py.

An offline method is an objective, an options section deriving from `ObjectiveOptions`, and a stage
module whose record names `objective=` (align/stages/registry.py): the shared run
(align/stages/objective_run.py) trains it. Light at import: torch loads when a loss is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from align.core.config import opt

if TYPE_CHECKING:
    import torch

    from align.preference.losses import PreferenceLoss


@dataclass
class ObjectiveOptions:
    """What every objective method's section has besides its hyperparameters: the batch layout."""

    shared_prefix: bool = opt(True, "Compute each pair's prompt once for chosen and rejected (as DPO's fast path).")


@dataclass(frozen=True)
class PairLogps:
    """Per-pair sequence log-probs of a batch, shape (B,): sums, or per-token means for a length-normalized objective."""

    chosen: "torch.Tensor"
    rejected: "torch.Tensor"
    nll: "torch.Tensor | None" = None  # scalar NLL of the chosen responses (needs_nll)
    ref_chosen: "torch.Tensor | None" = None  # the reference's (needs_reference)
    ref_rejected: "torch.Tensor | None" = None


class Objective:
    """A preference loss and what it needs; subclasses are frozen dataclasses of their hyperparameters."""

    needs_reference = False
    length_normalized = False
    nll_on_prompt = False
    metrics: tuple[str, ...] = ()

    @property
    def needs_nll(self) -> bool:
        """Whether the loss has an NLL term of the chosen responses: by default, a positive `nll_weight`."""
        return getattr(self, "nll_weight", 0.0) > 0

    def __call__(self, logps: PairLogps) -> "PreferenceLoss":
        raise NotImplementedError


@dataclass(frozen=True)
class SimPO(Objective):
    """SimPO (Meng et al. 2024): -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma);
    with nll_weight > 0 CPO-SimPO, with alpha != 0 AlphaPO."""

    beta: float
    gamma: float
    label_smoothing: float = 0.0
    alpha: float = 0.0
    nll_weight: float = 0.0
    length_normalized = True

    def __call__(self, logps: PairLogps) -> "PreferenceLoss":
        from align.preference.losses import simpo_loss

        return simpo_loss(logps.chosen, logps.rejected, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing,
                          alpha=self.alpha, nll=logps.nll, nll_weight=self.nll_weight)


@dataclass(frozen=True)
class CPO(Objective):
    """CPO (Xu et al. 2024): DPO's margin on the policy alone (sigmoid, hinge, or ipo on per-token means)
    plus nll_weight times the chosen NLL; alpha != 0 shapes the reward as AlphaPO."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    alpha: float = 0.0
    nll_weight: float = 0.0

    @property
    def length_normalized(self) -> bool:  # ipo compares per-token means, sigmoid and hinge sums
        return self.loss_type == "ipo"

    def __call__(self, logps: PairLogps) -> "PreferenceLoss":
        from align.preference.losses import cpo_loss

        return cpo_loss(logps.chosen, logps.rejected, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                        alpha=self.alpha, nll=logps.nll, nll_weight=self.nll_weight)


@dataclass(frozen=True)
class ORPO(Objective):
    """ORPO (Hong et al. 2024): NLL(chosen) + beta * mean(-log sigmoid(log odds(chosen) - log odds(rejected)));
    nll_on_prompt: the NLL over prompt + chosen response (ORPO's released code, TRL's experimental trainer)."""

    beta: float
    nll_on_prompt: bool = False
    length_normalized = True
    metrics: ClassVar[tuple[str, ...]] = ("log_odds_ratio", "log_odds_chosen")

    @property
    def needs_nll(self) -> bool:  # the NLL is ORPO's SFT term, always on
        return True

    def __call__(self, logps: PairLogps) -> "PreferenceLoss":
        from align.preference.losses import orpo_loss

        return orpo_loss(logps.chosen, logps.rejected, beta=self.beta, nll=logps.nll)
