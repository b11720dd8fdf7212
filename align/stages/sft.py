"""SFT stage: TRL's SFTTrainer + the adapter of `peft.method` (LoRA by default), loss on assistant tokens only.

Outputs in the RunDir: `adapter/` (standard PEFT format) and `merged/` (base +
adapter as one safetensors model: the frozen base of every later stage). Full
fine-tuning writes only `merged/` (the trained model); prompt and prefix tuning only
`adapter/` (virtual tokens do not merge into weights, so such a run is no parent_run).
"""

from __future__ import annotations

import logging

from align import models
from align.adapters import merge_adapter, peft_config_for
from align.artifacts import MERGED, RunDir
from align.config import SFTConfig
from align.methods import METHODS
from align.data import Splits, load_splits
from align.stages.common import StageRun, to_datasets, train_adapter, trainer_kwargs
from align.templates import tokenize_for_sft
from align.tracking import is_main_process

log = logging.getLogger("align")


def tokenize(splits: Splits, tokenizer, max_length: int):
    """Token ids + assistant-only labels for both splits, with truncation counted."""

    def convert(row):
        tok = tokenize_for_sft(tokenizer, row["messages"], max_length)
        if all(label == -100 for label in tok.labels):
            return None, tok.truncated  # its assistant turns all start beyond max_length
        return {"input_ids": tok.input_ids, "labels": tok.labels}, tok.truncated

    return to_datasets(splits, convert, "sft", max_length, "no assistant token within max_length")


def build_trainer(cfg: SFTConfig, model, tokenizer, train_ds, eval_ds, run_dir: RunDir, callbacks=()):
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    device = str(next(model.parameters()).device)
    args = TRLSFTConfig(
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None),
        packing=cfg.sft.packing,
        neftune_noise_alpha=cfg.sft.neftune_noise_alpha,
        label_smoothing_factor=cfg.sft.label_smoothing,
        assistant_only_loss=False,  # labels already carry the assistant-only mask
        dataset_num_proc=None,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config_for(cfg, base_location=model.name_or_path),
        callbacks=list(callbacks),
    )


def run(cfg: SFTConfig, *, force: bool = False, callbacks=()) -> RunDir:
    splits = load_splits(cfg.data, "sft", cfg.train.seed)
    base = models.resolve(cfg.model.name_or_path, cfg.model.revision)
    stage = StageRun(cfg, base=base, splits=splits, force=force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        trained = train_adapter(stage, prepare=tokenize, build_trainer=build_trainer, before_label="base", callbacks=callbacks)
        tokenizer, adapter_dir = trained.tokenizer, trained.adapter_dir
        trained.trainer = None  # free the training copy before loading the base again to merge
        method = cfg.peft.method
        merged_hash = None
        outputs = {"samples": "samples.jsonl"}
        if method != "full":
            outputs["adapter"] = "adapter"
        if METHODS[method].mergeable:
            outputs["merged"] = MERGED
        else:
            log.info("sft: %s trains virtual tokens, which do not merge into weights: no merged/ model", method)
        if is_main_process() and METHODS[method].mergeable:
            merged_dir = stage.run_dir.path / MERGED
            if method != "full":  # full fine-tuning saved its trained model there already
                merge_adapter(base, cfg.model, adapter_dir, merged_dir, tokenizer)
            # Hashing here caches the hash beside the weights, so later stages need not re-read them.
            merged_hash = models.content_hash(models.ModelRef(str(merged_dir), str(merged_dir.resolve()), True))
        summary = {
            "eval_loss_before": trained.before.get("eval_loss"),
            "eval_loss_after": trained.after.get("eval_loss"),
            "merged_content_hash": merged_hash,
            **trained.summary,
        }
        stage.finish(summary=summary, outputs=outputs)
    return stage.run_dir
