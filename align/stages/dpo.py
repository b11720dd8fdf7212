"""DPO stage: TRL's DPOTrainer on a frozen base with a fresh adapter (LoRA by default).

The reference model is the policy with its adapter disabled: TRL wraps the base
with our `peft_config` and, given no `ref_model`, runs the reference forward under
`disable_adapter()`. No second copy of the base exists. With `parent_run`, the base
is the SFT stage's merged model, so the reference *is* the SFT model: at step 0
the loss is ln 2 and both rewards are 0.

Per method (align/modeling/methods.py): lora, qlora, dora, vera and ia3 start with no effect, so
the same holds. prompt_tuning and prefix_tuning disable to the base too, but their
virtual tokens change the policy from step 0 (the step-0 loss is not ln 2). `full` has
no adapter: the reference is a frozen copy of the starting weights, one more copy of
the model in memory (no gradients or optimizer state for it). A full run writes the
trained model to merged/ instead of adapter/.

Speed (align/dpo/trainer.py): each pair's prompt is computed once for both responses (under
FlexAttention on CUDA, all pairs of a micro-batch in one unpadded row), and reference log-probs
are cached on disk and reused across epochs, runs and sweeps. All are on by default and switch
themselves off, with a log line, where they cannot run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from align.core.config import ChildStageConfig, opt
from align.dpo.options import DPO_LOSS_TYPES, DPOOptions  # noqa: F401 - re-exported: callers import them from here too
from align.modeling.methods import resolve_method
from align.stages.registry import Stage, fmt, prepare_config, register, training_checks

log = logging.getLogger("align")


@dataclass
class DPOConfig(ChildStageConfig):
    """Direct preference optimization on chosen/rejected pairs; the reference is the base with the adapter disabled."""

    dpo: DPOOptions = opt(DPOOptions, "DPO-specific options.")

    stage = "dpo"



def prepare(splits, tokenizer, max_length: int):
    """Preference rows as datasets; rows cut or dropped by max_length are counted (align.dpo.training)."""
    from align.dpo.training import DROP_REASON, pair_converter
    from align.stages.common import to_datasets

    return to_datasets(splits, pair_converter(tokenizer, max_length), "dpo", max_length, DROP_REASON)


def build_trainer(cfg: DPOConfig, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
    from align.dpo.training import dpo_trainer
    from align.modeling.adapters import peft_config_for
    from align.stages.common import trainer_kwargs

    device = str(next(model.parameters()).device)
    base_args = trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2)
    peft_config = peft_config_for(cfg, base_location=model.name_or_path)
    return dpo_trainer(cfg, model, tokenizer, train_ds, eval_ds, base_args, callbacks, peft_config=peft_config)


_EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def run(cfg: DPOConfig, *, force: bool = False, callbacks=()):
    from align.dpo.training import fast_path_summary
    from align.stages.common import held_out_summary, open_stage, train_adapter

    cfg = prepare_config(cfg)
    stage = open_stage(cfg, "preference", force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        trained = train_adapter(stage, prepare=prepare, build_trainer=build_trainer, before_label="reference", callbacks=callbacks)
        summary = {**held_out_summary(trained, _EVAL_KEYS), **trained.summary, **fast_path_summary(trained.trainer)}
        saved = {"merged": "merged"} if cfg.peft.method == "full" else {"adapter": "adapter"}
        stage.finish(summary=summary, outputs={**saved, "samples": "samples.jsonl"})
    return stage.run_dir


def summary_lines(s: dict) -> list[str]:
    return [
        "  held-out DPO reward accuracy: "
        f"{fmt(s.get('eval_rewards/accuracies_before'))} (step 0) -> {fmt(s.get('eval_rewards/accuracies_after'))}; "
        f"margin {fmt(s.get('eval_rewards/margins_before'))} -> {fmt(s.get('eval_rewards/margins_after'))}"
    ]


register(Stage("dpo", DPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method))
