"""SFT stage: TRL's SFTTrainer + a LoRA adapter, loss on assistant tokens only.

Outputs in the RunDir: `adapter/` (standard PEFT format) and `merged/` (base +
adapter as one safetensors model: the frozen base of every later stage).
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from align import models
from align.adapters import lora_config, merge_adapter
from align.artifacts import MERGED, RunDir
from align.config import SFTConfig
from align.data import Splits, load_splits
from align.stages.common import StageRun, log_sample_table, trainer_kwargs
from align.templates import tokenize_for_sft
from align.tracking import is_main_process

log = logging.getLogger("align")


def tokenize(splits: Splits, tokenizer, max_length: int):
    """Token ids + assistant-only labels for both splits, with truncation counted."""
    from datasets import Dataset

    stats: dict[str, int] = {}
    out = {}
    for name, rows in (("train", splits.train), ("eval", splits.eval)):
        kept, truncated, dropped = [], 0, 0
        for row in tqdm(rows, desc=f"tokenizing sft {name}", disable=not rows or not is_main_process(), leave=False):
            tok = tokenize_for_sft(tokenizer, row["messages"], max_length)
            truncated += tok.truncated
            if all(label == -100 for label in tok.labels):
                dropped += 1  # its assistant turns all start beyond max_length: nothing to learn from
                continue
            kept.append({"input_ids": tok.input_ids, "labels": tok.labels})
        stats[f"{name}_truncated"] = truncated
        stats[f"{name}_dropped_no_assistant_tokens"] = dropped
        if truncated or dropped:
            log.warning("sft %s: %d rows cut to max_length=%d, %d dropped (no assistant token left)", name, truncated, max_length, dropped)
        out[name] = Dataset.from_list(kept) if kept else None
    if out["train"] is None:
        from align.errors import DataError

        raise DataError(f"data.path '{splits.source}': no training row keeps an assistant token within max_length={max_length}")
    return out["train"], out["eval"], stats


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
        peft_config=lora_config(cfg.lora),
        callbacks=list(callbacks),
    )


def run(cfg: SFTConfig, *, force: bool = False, callbacks=()) -> RunDir:
    splits = load_splits(cfg.data, "sft", cfg.train.seed)
    base = models.resolve(cfg.model.name_or_path, cfg.model.revision)
    stage = StageRun(cfg, base=base, splits=splits, force=force)
    if stage.skipped:
        log.info("sft: skipped: the finished run in %s matches its config, base model and data", stage.run_dir.path)
        return stage.run_dir
    with stage:
        tokenizer = models.load_tokenizer(base, cfg.model)
        train_ds, eval_ds, token_stats = tokenize(splits, tokenizer, cfg.train.max_length)
        model = models.load_model(base, cfg.model)
        trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, stage.run_dir, [stage.callback(), *callbacks])
        params = models.count_parameters(trainer.model)
        log.info("sft: %s trainable of %s parameters (%.2f%%)", f"{params['trainable']:,}", f"{params['total']:,}", params["trainable_pct"])
        before = trainer.evaluate() if eval_ds is not None else {}
        result = trainer.train()
        after = trainer.evaluate() if eval_ds is not None else {}
        adapter_dir = stage.save_adapter(trainer.model)
        sampled = log_sample_table(stage, trainer.model, tokenizer, "base", step=trainer.state.global_step)
        del trainer, model  # free the training copy before loading the base again to merge
        merged_hash = None
        if is_main_process():
            merged_dir = stage.run_dir.path / MERGED
            merge_adapter(base, cfg.model, adapter_dir, merged_dir, tokenizer)
            # Hashing here caches the hash beside the weights, so later stages need not re-read them.
            merged_hash = models.content_hash(models.ModelRef(str(merged_dir), str(merged_dir.resolve()), True))
        stage.finish(
            summary={
                "eval_loss_before": before.get("eval_loss"),
                "eval_loss_after": after.get("eval_loss"),
                "train_loss": result.training_loss,
                "steps": result.global_step,
                "merged_content_hash": merged_hash,
                "parameters": params,
                "tokens": token_stats,
                "samples": sampled.get("rows", []),
                **({"judge": sampled["judge"]} if "judge" in sampled else {}),
            },
            outputs={"adapter": "adapter", "merged": MERGED, "samples": "samples.jsonl"},
        )
    return stage.run_dir
