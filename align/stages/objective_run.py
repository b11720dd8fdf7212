"""The run of an objective method (SimPO, CPO, ORPO, or a new one): its record's objective, built from its config,
trained by align/preference/objective_trainer.py on preference pairs through the HF training skeleton.

What the run needs of the method comes from its record (align/stages/registry.py): the objective (a
reference pass only when it needs one; the metrics it adds to the held-out report) and, from the
config, the options section deriving from ObjectiveOptions (its `shared_prefix`).
"""

from __future__ import annotations

import dataclasses

from align.core.artifacts import RunDir
from align.preference.objectives import ObjectiveOptions

# Held-out figures every objective run reports before (step 0) and after training; an objective adds its `metrics`.
EVAL_KEYS = (
    "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "nll_loss",
)


def objective_options(cfg) -> ObjectiveOptions:
    """The config's one section deriving from ObjectiveOptions (simpo:, cpo:, ... whatever its name)."""
    sections = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), ObjectiveOptions)]
    if len(sections) != 1:
        raise TypeError(f"{type(cfg).__name__}: an objective method's config has one ObjectiveOptions section, found {len(sections)}")
    return sections[0]


def run_objective_stage(cfg, *, force: bool, callbacks=()) -> RunDir:
    """Preference data, then the objective trainer on the record's objective. Returns the RunDir."""
    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs
    from align.preference.dpo_setup import preference_datasets
    from align.preference.objective_trainer import build_objective_trainer
    from align.stages.hf_training import train_and_finish
    from align.stages.registry import get_stage
    from align.stages.stage_run import open_stage

    objective = get_stage(cfg.stage).objective(cfg)
    shared_prefix = objective_options(cfg).shared_prefix

    def prepare(splits, tokenizer, max_length: int):
        return preference_datasets(splits, tokenizer, max_length, cfg.stage)

    def build_trainer(cfg, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
        device = str(next(model.parameters()).device)
        base_args = trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2)
        return build_objective_trainer(
            cfg, objective, model, tokenizer, train_ds, eval_ds, base_args, callbacks, shared_prefix_wanted=shared_prefix,
            peft_config=peft_config_for(cfg, base_location=model.name_or_path),
        )

    stage = open_stage(cfg, "preference", force)
    return train_and_finish(
        stage, prepare=prepare, build_trainer=build_trainer, eval_keys=EVAL_KEYS + tuple(objective.metrics),
        before_label="reference" if objective.needs_reference else "start",
        extra_summary=lambda t: {"batch_layout": t.layout}, callbacks=callbacks,
    )
