"""What every training loop sets up the same way: the HF TrainingArguments from our TrainConfig (the Trainer-driven
stages), AdamW with its schedule (the loops of align/rlhf/), the gradient-checkpointing choice, and whether
Liger's kernels can run."""

from __future__ import annotations

import logging
from typing import Any

from align.core.artifacts import RunDir
from align.core.config import StageConfig
from align.core.errors import ConfigError
from align.core.tracking import is_main_process

log = logging.getLogger("align")


def gradient_checkpointing(cfg: StageConfig, model, device: str, rows_per_example: int) -> bool:
    """train.gradient_checkpointing, with auto decided by memory (align/core/memory.py) and logged."""
    from align.core import memory

    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return setting
    if cfg.peft.method == "prefix_tuning":
        log.info("%s: gradient checkpointing auto -> off: prefix tuning does not work with it", cfg.stage)
        return False
    if model is None:
        raise ValueError("train.gradient_checkpointing auto needs the loaded model to estimate memory")
    decision = memory.decide_for(cfg, model, device, rows_per_example)
    log.info("%s: %s", cfg.stage, decision.describe())
    return decision.on

def liger_problem(device: str, installed: bool) -> str | None:
    """Why train.liger_kernel cannot run here, or None."""
    if not installed:
        return "the liger-kernel package is not installed (pip install 'align[gpu]', or pip install liger-kernel)"
    if not device.startswith("cuda"):
        return f"Liger's kernels are Triton GPU kernels and the model is on {device}; set train.liger_kernel: false"
    return None

def trainer_kwargs(
    cfg: StageConfig, run_dir: RunDir, device: str, has_eval: bool, model=None, rows_per_example: int = 1
) -> dict[str, Any]:
    """TRL/HF TrainingArguments shared by every stage, from our TrainConfig.

    `model` (the loaded base) and `rows_per_example` (2 for preference pairs) size the micro-batch
    for train.gradient_checkpointing: auto.
    """
    import importlib.util

    import torch

    from align.modeling.models import resolve_dtype

    t = cfg.train
    if t.liger_kernel:
        problem = liger_problem(device, importlib.util.find_spec("liger_kernel") is not None)
        if problem:
            raise ConfigError(f"train.liger_kernel: {problem}")
    bf16 = resolve_dtype(cfg.model.dtype, device) == torch.bfloat16 and device.startswith("cuda")
    return dict(
        output_dir=str(run_dir.path / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # below 1 it is a ratio of the total steps
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        gradient_checkpointing=gradient_checkpointing(cfg, model, device, rows_per_example),
        use_liger_kernel=t.liger_kernel,
        # Layer kernels only: Liger's fused linear cross-entropy would replace the model's forward (TRL's
        # fused log-prob head in SFT/DPO, the score head of a reward model).
        liger_kernel_config={"fused_linear_cross_entropy": False} if t.liger_kernel else None,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        max_length=t.max_length,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        report_to=[],
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=not is_main_process(),
    )


def optimizer_and_schedule(cfg: StageConfig, params, model, updates: int):
    """AdamW over the trainable parameters (LoRA+ groups with lora.plus_ratio), train.learning_rate and
    weight_decay, and train.lr_scheduler over `updates` optimizer updates (warmup: train.warmup_ratio of them)."""
    import torch
    from transformers import get_scheduler

    from align.modeling.lora_plus import optimizer_groups

    optimizer = torch.optim.AdamW(optimizer_groups(cfg, params, model), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * updates), num_training_steps=updates
    )
    return optimizer, scheduler
