"""CPO stage: contrastive preference optimization (Xu et al. 2024), reference-free.

loss = mean(-log sigmoid(beta * (log p(chosen) - log p(rejected)))) + nll_weight * NLL(chosen):
DPO's loss with the reference dropped, plus a behaviour-cloning term on the chosen responses.
cpo.loss_type swaps the preference term for hinge or ipo (ipo on per-token means), cpo.alpha
shapes the reward as AlphaPO. No reference model, no reference forward
(align/preference/objective_trainer.py): no step-0 invariant applies. SimPO has its own stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.core.config import ChildStageConfig, opt
from align.core.errors import ConfigError
from align.modeling.methods import resolve_method
from align.preference.objectives import CPO, ObjectiveOptions
from align.stages.registry import Curve, Stage, held_out_line, register, training_checks


@dataclass
class CPOOptions(ObjectiveOptions):
    beta: float = opt(0.1, "Scale of the log-prob margin (for ipo, IPO's tau).", gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = opt(
        "sigmoid", "Preference term: sigmoid (CPO), hinge (SLiC), ipo (on per-token mean log-probs)."
    )
    label_smoothing: float = opt(0.0, "Assumed share of flipped labels; sigmoid only.", min=0, lt=0.5)
    nll_weight: float = opt(1.0, "Weight of the NLL of the chosen responses (CPO's behaviour cloning; TRL's cpo_alpha).", min=0)
    alpha: float = opt(0.0, "AlphaPO reward shape (1 - p^-alpha)/alpha, any real; 0 = log p.", any_value="any real number shapes the reward")


@dataclass
class CPOConfig(ChildStageConfig):
    """CPO: reference-free preference optimization, DPO's margin on the policy alone plus an NLL term on chosen."""

    cpo: CPOOptions = opt(CPOOptions, "CPO options.")

    stage = "cpo"

    def validate(self) -> None:
        super().validate()
        o = self.cpo
        if o.label_smoothing > 0 and o.loss_type != "sigmoid":
            raise ConfigError(f"cpo.label_smoothing: used only by loss_type sigmoid (got {o.loss_type})")


def objective(cfg: CPOConfig) -> CPO:
    o = cfg.cpo
    return CPO(beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing, alpha=o.alpha, nll_weight=o.nll_weight)


def run(cfg: CPOConfig, *, force: bool = False, callbacks=()):
    from align.stages.objective_run import run_objective_stage

    return run_objective_stage(cfg, force=force, callbacks=callbacks)


def summary_lines(s: dict) -> list[str]:
    return [held_out_line(s, ("held-out CPO reward accuracy:", "rewards/accuracies"), ("margin", "rewards/margins"), ("chosen NLL", "nll_loss"))]


register(Stage(
    "cpo", CPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method, objective=objective,
    kl_knob="cpo.beta", curves=(Curve("train/loss", "train loss"), Curve("train/rewards/accuracies", "reward accuracy")),
))
