"""SimPO stage: length-normalized, reference-free preference optimization (Meng et al. 2024).

loss = -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma), the means taken
per response token. No reference model is loaded and no reference forward runs
(align/preference/objective_trainer.py), so there is no step-0 invariant to check: at step 0 the loss is
-log sigmoid(beta * margin_0 - gamma) for the starting model's own margin, not ln 2. With
simpo.nll_weight > 0 it is CPO-SimPO; with simpo.alpha != 0, AlphaPO. The pairs, tokenization and
prefix sharing are DPO's.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.core.config import ChildStageConfig, opt
from align.modeling.methods import resolve_method
from align.preference.objectives import ObjectiveOptions, SimPO
from align.stages.registry import Curve, Stage, held_out_line, register, training_checks


@dataclass
class SimPOOptions(ObjectiveOptions):
    beta: float = opt(2.0, "Scale of the length-normalized reward (the paper uses 2.0-2.5).", gt=0)
    gamma: float = opt(1.0, "Target reward margin (the paper keeps gamma/beta near 0.5).", min=0)
    label_smoothing: float = opt(0.0, "Assumed share of flipped labels (conservative loss).", min=0, lt=0.5)
    alpha: float = opt(
        0.0, "AlphaPO reward shape (1 - p^-alpha)/alpha of the per-token mean probability, any real; 0 = SimPO's log p.",
        any_value="any real number shapes the reward",
    )
    nll_weight: float = opt(0.0, "Weight of the NLL of the chosen responses; > 0 is CPO-SimPO.", min=0)


@dataclass
class SimPOConfig(ChildStageConfig):
    """SimPO: reference-free preference optimization on length-normalized log-probs with a target margin."""

    simpo: SimPOOptions = opt(SimPOOptions, "SimPO options.")

    stage = "simpo"


def objective(cfg: SimPOConfig) -> SimPO:
    o = cfg.simpo
    return SimPO(beta=o.beta, gamma=o.gamma, label_smoothing=o.label_smoothing, alpha=o.alpha, nll_weight=o.nll_weight)


def run(cfg: SimPOConfig, *, force: bool = False, callbacks=()):
    from align.stages.objective_run import run_objective_stage

    return run_objective_stage(cfg, force=force, callbacks=callbacks)


def summary_lines(s: dict) -> list[str]:
    return [held_out_line(s, ("held-out SimPO reward accuracy:", "rewards/accuracies"), ("margin", "rewards/margins"), ("loss", "loss"))]


register(Stage(
    "simpo", SimPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method, objective=objective,
    kl_knob="simpo.beta", curves=(Curve("train/loss", "train loss"), Curve("train/rewards/accuracies", "reward accuracy")),
))
