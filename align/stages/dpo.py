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

Losses: every loss option of TRL 1.16's DPOConfig (the 15 loss types, weighted mixtures, RPO,
WPO, LD-DPO, f-divergences); align/preference/dpo_options.py checks their combinations and maps them to
TRL's arguments. The step-0 rewards are 0 for all of them; the step-0 loss is each formula's
value at zero log-ratios (ln 2 for sigmoid).

Speed (align/preference/dpo_trainer.py): each pair's prompt is computed once for both responses (under
FlexAttention on CUDA, all pairs of a micro-batch in one unpadded row), and reference log-probs
are cached on disk and reused across epochs, runs and sweeps. All are on by default and switch
themselves off, with a log line, where they cannot run. Every loss option runs on them (the
shared-prefix forward returns TRL's per-token layout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from align.core.config import ChildStageConfig, opt
from align.preference import dpo_options as options
from align.preference.dpo_options import DPO_LOSS_TYPES, DPOOptions  # noqa: F401 - re-exported: callers import them from here too
from align.modeling.methods import resolve_method
from align.stages.registry import Curve, Stage, fmt, register, training_checks

log = logging.getLogger("align")


@dataclass
class DPOConfig(ChildStageConfig):
    """Direct preference optimization on chosen/rejected pairs; the reference is the base with the adapter disabled."""

    dpo: DPOOptions = opt(DPOOptions, "DPO-specific options: the loss (every TRL 1.16 DPO loss option) and the fast path.")

    stage = "dpo"

    def validate(self) -> None:
        super().validate()
        options.check(self.dpo)


def prepare(splits, tokenizer, max_length: int):
    from align.preference.dpo_setup import preference_datasets

    return preference_datasets(splits, tokenizer, max_length, "dpo")


def build_trainer(cfg: DPOConfig, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
    from align.preference.dpo_setup import dpo_trainer
    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs

    device = str(next(model.parameters()).device)
    base_args = trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2)
    peft_config = peft_config_for(cfg, base_location=model.name_or_path)
    return dpo_trainer(cfg, model, tokenizer, train_ds, eval_ds, base_args, callbacks, peft_config=peft_config)


_EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def run(cfg: DPOConfig, *, force: bool = False, callbacks=()):
    from align.preference.dpo_setup import fast_path_summary
    from align.stages.hf_training import train_and_finish
    from align.stages.stage_run import open_stage

    stage = open_stage(cfg, "preference", force)
    return train_and_finish(
        stage, prepare=prepare, build_trainer=build_trainer, eval_keys=_EVAL_KEYS, before_label="reference",
        extra_summary=lambda trainer: {"dpo_loss": options.describe_loss(cfg.dpo), **fast_path_summary(trainer)},
        callbacks=callbacks,
    )


def summary_lines(s: dict) -> list[str]:
    loss = [f"  loss: {s['dpo_loss']}"] if s.get("dpo_loss") and s["dpo_loss"] != "1 sigmoid" else []
    return loss + [
        "  held-out DPO reward accuracy: "
        f"{fmt(s.get('eval_rewards/accuracies_before'))} (step 0) -> {fmt(s.get('eval_rewards/accuracies_after'))}; "
        f"margin {fmt(s.get('eval_rewards/margins_before'))} -> {fmt(s.get('eval_rewards/margins_after'))}"
    ]


register(Stage(
    "dpo", DPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method, kl_knob="dpo.beta", beta_key="dpo.beta",
    curves=(Curve("train/loss", "train loss"), Curve("train/rewards/accuracies", "reward accuracy")),
))
