"""ORPO stage: odds-ratio preference optimization (Hong et al. 2024), reference-free, SFT in the same loss.

loss = NLL(chosen) + beta * mean(-log sigmoid(log odds(chosen) - log odds(rejected))), with
odds = p / (1 - p) of the per-token mean probability. The paper's NLL is over the response
tokens (the default); orpo.nll_on_prompt adds the prompt tokens, as ORPO's released code and
TRL's experimental trainer do, and then runs on the two-row layout (prompt tokens must be
scored, which the shared-prefix forward does not do). No reference model, no reference forward
(align/preference/objective_trainer.py): no step-0 invariant applies. ORPO is designed to start from a
base model (it does SFT itself), so model.name_or_path is as natural here as parent_run.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.core.config import ChildStageConfig, opt
from align.modeling.methods import resolve_method
from align.preference.objectives import ORPO, ObjectiveOptions
from align.stages.registry import Curve, Stage, held_out_line, register, training_checks


@dataclass
class ORPOOptions(ObjectiveOptions):
    beta: float = opt(0.1, "Weight of the odds-ratio term against the NLL (the paper's lambda).", gt=0)
    nll_on_prompt: bool = opt(
        False, "NLL over prompt + chosen response (ORPO's code, TRL's trainer) instead of the response alone "
        "(the paper's formula); true runs the two-row layout.",
    )


@dataclass
class ORPOConfig(ChildStageConfig):
    """ORPO: SFT and a reference-free odds-ratio preference term in one loss."""

    orpo: ORPOOptions = opt(ORPOOptions, "ORPO options.")

    stage = "orpo"


def objective(cfg: ORPOConfig) -> ORPO:
    return ORPO(beta=cfg.orpo.beta, nll_on_prompt=cfg.orpo.nll_on_prompt)


def run(cfg: ORPOConfig, *, force: bool = False, callbacks=()):
    from align.stages.objective_run import run_objective_stage

    return run_objective_stage(cfg, force=force, callbacks=callbacks)


def summary_lines(s: dict) -> list[str]:
    return [held_out_line(s, ("held-out ORPO reward accuracy:", "rewards/accuracies"), ("log odds ratio", "log_odds_chosen"),
                          ("chosen NLL", "nll_loss"))]


register(Stage(
    "orpo", ORPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method, objective=objective,
    kl_knob="orpo.beta", curves=(Curve("train/loss", "train loss"), Curve("train/rewards/accuracies", "reward accuracy")),
))
