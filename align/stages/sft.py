"""SFT stage: TRL's SFTTrainer + the adapter of `peft.method` (LoRA by default), loss on assistant tokens only.

Outputs in the RunDir: `adapter/` (standard PEFT format) and `merged/` (base +
adapter as one safetensors model: the frozen base of every later stage). Full
fine-tuning writes only `merged/` (the trained model); prompt and prefix tuning only
`adapter/` (virtual tokens do not merge into weights, so such a run is no parent_run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from align.core.config import StageConfig, opt
from align.core.errors import ConfigError
from align.modeling.methods import METHODS, resolve_method
from align.stages.registry import Curve, Stage, fmt, register, training_checks

log = logging.getLogger("align")


@dataclass
class SFTOptions:
    packing: bool = opt(False, "Pack several short rows into one max_length sequence.")
    neftune_noise_alpha: float | None = opt(None, "NEFTune: noise on input embeddings during training (e.g. 5; null: off).", gt=0)
    label_smoothing: float = opt(0.0, "Label smoothing of the token loss (costs an extra forward pass in TRL).", min=0, lt=1)


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on conversations: loss on the assistant turns, then the adapter merged into the base."""

    sft: SFTOptions = opt(SFTOptions, "SFT-specific options.")

    stage = "sft"

    def validate(self) -> None:
        super().validate()
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path: required for SFT (e.g. smollm2-135m-instruct)")


def tokenize(splits, tokenizer, max_length: int):
    """Token ids + assistant-only labels for both splits, with truncation counted."""
    from align.modeling.templates import tokenize_for_sft
    from align.core.examples import to_datasets

    def convert(row):
        tok = tokenize_for_sft(tokenizer, row["messages"], max_length)
        if all(label == -100 for label in tok.labels):
            return None, tok.truncated  # its assistant turns all start beyond max_length
        return {"input_ids": tok.input_ids, "labels": tok.labels}, tok.truncated

    return to_datasets(splits, convert, "sft", max_length, "no assistant token within max_length")


def build_trainer(cfg: SFTConfig, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs

    device = str(next(model.parameters()).device)
    args = TRLSFTConfig(
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=1),
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


def run(cfg: SFTConfig, *, force: bool = False, callbacks=()):
    from align.core.artifacts import MERGED
    from align.core.tracking import is_main_process
    from align.modeling import models
    from align.modeling.adapters import merge_adapter
    from align.stages.hf_training import train_adapter
    from align.stages.stage_run import open_stage

    stage = open_stage(cfg, "sft", force)
    base = stage.base
    if stage.skipped:
        return stage.run_dir
    stage.prepare_data(tokenize)
    with stage:
        trained = train_adapter(stage, build_trainer=build_trainer, before_label="base", callbacks=callbacks)
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


def summary_lines(s: dict) -> list[str]:
    return [f"  held-out SFT loss: {fmt(s.get('eval_loss_before'))} (base) -> {fmt(s.get('eval_loss_after'))}"]


register(Stage(
    "sft", SFTConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method,
    curves=(Curve("train/loss", "train loss"), Curve("eval/loss", "held-out loss")),
))
