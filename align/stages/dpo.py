"""DPO stage: TRL's DPOTrainer on a frozen base with a fresh LoRA adapter.

The reference model is the policy with its adapter disabled: TRL wraps the base
with our `peft_config` and, given no `ref_model`, runs the reference forward under
`disable_adapter()`. No second copy of the base exists. With `parent_run`, the base
is the SFT stage's merged model, so the reference *is* the SFT model: at step 0
the loss is ln 2 and both rewards are 0.
"""

from __future__ import annotations

import logging

from align.adapters import lora_config
from align.artifacts import RunDir
from align.config import DPOConfig
from align.data import Splits, load_splits
from align.stages.common import StageRun, resolve_base, to_datasets, train_adapter, trainer_kwargs

log = logging.getLogger("align")


def prepare(splits: Splits, tokenizer, max_length: int):
    """Preference rows as datasets, dropping (and counting) rows whose prompt alone fills max_length.

    TRL would drop those silently; rows longer than max_length are kept and truncated
    (responses cut at the end), and counted too.
    """

    def n_tokens(messages, gen_prompt=False):
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True)
        return len(out["input_ids"])

    def convert(row):
        if n_tokens(row["prompt"], gen_prompt=True) >= max_length:
            return None, False
        longest = max(n_tokens(row["prompt"] + row["chosen"]), n_tokens(row["prompt"] + row["rejected"]))
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, longest > max_length

    return to_datasets(splits, convert, "dpo", max_length, "prompt alone fills max_length")


def build_trainer(cfg: DPOConfig, model, tokenizer, train_ds, eval_ds, run_dir: RunDir, callbacks=()):
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    device = str(next(model.parameters()).device)
    args = TRLDPOConfig(
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        label_smoothing=cfg.dpo.label_smoothing,
        truncation_mode="keep_start",
        dataset_num_proc=None,
    )
    return DPOTrainer(
        model=model,
        ref_model=None,  # the reference is this model with the adapter disabled
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=list(callbacks),
    )


_EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def run(cfg: DPOConfig, *, force: bool = False, callbacks=()) -> RunDir:
    splits = load_splits(cfg.data, "preference", cfg.train.seed)
    base, parent = resolve_base(cfg)
    stage = StageRun(cfg, base=base, splits=splits, parent=parent, force=force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        trained = train_adapter(stage, prepare=prepare, build_trainer=build_trainer, before_label="reference", callbacks=callbacks)
        summary = {f"eval_{k}_before": trained.before.get(f"eval_{k}") for k in _EVAL_KEYS}
        summary.update({f"eval_{k}_after": trained.after.get(f"eval_{k}") for k in _EVAL_KEYS})
        summary.update(trained.summary)
        stage.finish(summary=summary, outputs={"adapter": "adapter", "samples": "samples.jsonl"})
    return stage.run_dir
