"""The run of the offline methods trained on an objective of align/preference/objectives.py (SimPO, CPO, ORPO)."""

from __future__ import annotations

import logging

from align.core.artifacts import RunDir
from align.stages.hf_training import train_and_finish
from align.stages.stage_run import open_stage

log = logging.getLogger("align")


REFERENCE_FREE_EVAL_KEYS = (
    "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "nll_loss",
)


def run_reference_free_stage(
    cfg, objective, *, shared_prefix: bool, force: bool, callbacks=(), sharing_blocked: str | None = None,
    extra_eval_keys: tuple[str, ...] = (),
) -> RunDir:
    """The run of SimPO, CPO and ORPO: preference data, then the reference-free trainer
    (align/preference/objective_trainer.py) on `objective`; no reference model, no reference forward.

    `shared_prefix`: the stage's <section>.shared_prefix; `sharing_blocked`: why its objective cannot share
    the prompt (then the two-row layout runs, and the log says why).
    """
    from align.preference.objective_trainer import ReferenceFreeArguments, ReferenceFreeTrainer
    from align.preference.dpo_trainer import shared_prefix_blocker
    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs
    from align.preference.dpo_setup import preference_datasets

    def prepare(splits, tokenizer, max_length: int):
        return preference_datasets(splits, tokenizer, max_length, cfg.stage)

    def build_trainer(cfg, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
        device = str(next(model.parameters()).device)
        args = ReferenceFreeArguments(**trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2))
        why_not = sharing_blocked or shared_prefix_blocker(shared_prefix, cfg.peft.method, model, cfg.train.max_length, section=cfg.stage)
        trainer = ReferenceFreeTrainer(
            model, args, objective, train_ds, eval_ds, processing_class=tokenizer,
            peft_config=peft_config_for(cfg, base_location=model.name_or_path), callbacks=callbacks,
            shared_prefix_forward=why_not is None,
        )
        trainer.layout = "shared prefix" if why_not is None else f"two rows per pair ({why_not})"
        log.info("%s: no reference model; batch layout: %s", cfg.stage, trainer.layout)
        return trainer

    stage = open_stage(cfg, "preference", force)
    return train_and_finish(
        stage, prepare=prepare, build_trainer=build_trainer, eval_keys=REFERENCE_FREE_EVAL_KEYS + extra_eval_keys,
        before_label="start", extra_summary=lambda t: {"batch_layout": t.layout}, callbacks=callbacks,
    )
