"""The training skeleton of every stage an HF Trainer drives (SFT, DPO, reward, KTO and the objective methods):
model -> trainer -> held-out evaluation at step 0, training, evaluation -> adapter, samples, summary.

The trainer itself comes from the stage (`build_trainer`): TRL's, or one of align/preference/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.core.artifacts import RunDir
from align.core.callbacks import StepTimer
from align.core.checkpoints import MarkCompleteCallback, latest_complete
from align.core.errors import AlignError
from align.core.safeguards import InterruptCallback, Interrupted, NonFiniteGuard, NonFiniteWeightsGuard, oom_advice
from align.modeling.adapters import adapter_bytes, start_adapter
from align.stages.samples import log_sample_table, reference_generations
from align.stages.stage_run import StageRun

log = logging.getLogger("align")


def held_out_summary(trained: "Trained", keys: tuple[str, ...]) -> dict[str, Any]:
    """eval_<key>_before and eval_<key>_after for each held-out metric key."""
    summary = {f"eval_{k}_before": trained.before.get(f"eval_{k}") for k in keys}
    summary.update({f"eval_{k}_after": trained.after.get(f"eval_{k}") for k in keys})
    return summary


@dataclass
class Trained:
    """What the shared training loop of a stage leaves for the stage to finish."""

    trainer: Any
    tokenizer: Any
    before: dict[str, float]  # held-out metrics at step 0
    after: dict[str, float]  # held-out metrics after training
    adapter_dir: Path  # adapter/, or merged/ for full fine-tuning
    summary: dict[str, Any]  # train loss, steps, seconds per step, parameters (+ adapter bytes), token counts, samples, judge


def train_adapter(
    stage: StageRun, *, build_trainer, before_label: str, callbacks=(), head: str = "causal", samples=None
) -> Trained:
    """The part every stage shares: model -> trainer -> eval, train, eval -> adapter, samples, on the data
    `stage.prepare_data` tokenized before the run started.

    `build_trainer(cfg, model, tokenizer, train_ds, eval_ds, run_dir, callbacks)` returns a TRL trainer.
    `samples(stage, model, tokenizer, before_label, step)` logs the end-of-stage table
    (default: generations before/after). Training resumes from `stage.resume_from` when set;
    Ctrl-C/SIGTERM checkpoint and stop it; a non-finite gradient stops it before the bad update.
    """
    import torch
    from transformers import set_seed

    from align.modeling import models

    cfg = stage.cfg
    if stage.prepared is None:
        raise RuntimeError(f"{stage.stage}: call StageRun.prepare_data before the run starts (its data checks come first)")
    tokenizer, train_ds, eval_ds, token_stats = stage.prepared
    set_seed(cfg.train.seed)  # new heads and adapters initialize the same way on every run and rank
    model = models.load_model(stage.base, cfg.model, head=head)
    # Full fine-tuning has no adapter to switch off afterwards: sample the starting weights now.
    before_samples = reference_generations(stage, model, tokenizer) if cfg.peft.method == "full" and samples is None else None
    interrupt = InterruptCallback()
    timer = StepTimer()
    last_checkpoint = lambda: latest_complete(stage.run_dir.path)  # noqa: E731
    # The weights guard after the interrupt callback: it sees a save that Ctrl-C asked for too.
    guards = [MarkCompleteCallback(), NonFiniteGuard(last_checkpoint), interrupt, NonFiniteWeightsGuard(last_checkpoint), timer]
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, stage.run_dir, [stage.callback(), *guards, *callbacks])
    start_adapter(trainer, cfg, stage.splits.train, tokenizer)
    params = models.count_parameters(trainer.model)
    log.info(
        "%s (%s): %s trainable of %s parameters (%.4g%%)", stage.stage, cfg.peft.method,
        f"{params['trainable']:,}", f"{params['total']:,}", params["trainable_pct"],
    )
    # The step-0 evaluation runs inside train() (eval_on_start), after the model is wrapped for
    # DDP: evaluating before train() lets accelerate mark the model prepared without wrapping it,
    # and training then runs without gradient synchronization (every rank drifts on its own).
    trainer.args.eval_on_start = eval_ds is not None and stage.resume_from is None
    try:
        interrupt.install()
        try:
            result = trainer.train(resume_from_checkpoint=str(stage.resume_from) if stage.resume_from else None)
        finally:
            interrupt.uninstall()
        if interrupt.signal_name:
            checkpoint = latest_complete(stage.run_dir.path)
            raise Interrupted(
                f"{interrupt.signal_name} at step {trainer.state.global_step}; checkpoint saved in {checkpoint}; "
                "continue with --resume (resume=true)",
                exit_code=interrupt.exit_code,
            )
        before = stage.before_metrics(trainer)
        after = trainer.evaluate() if eval_ds is not None else {}
    except torch.cuda.OutOfMemoryError as exc:
        raise AlignError(oom_advice(cfg, trainer.state.global_step + 1)) from exc
    adapter_dir = stage.save_adapter(trainer)
    params["adapter_bytes"] = adapter_bytes(adapter_dir)
    log.info("%s: %s on disk: %.2f MB", stage.stage, adapter_dir.name, params["adapter_bytes"] / 2**20)
    extra = {"before": before_samples} if before_samples is not None else {}
    sampled = (samples or log_sample_table)(stage, trainer.model, tokenizer, before_label, step=trainer.state.global_step, **extra)
    summary: dict[str, Any] = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "seconds_per_step": timer.seconds_per_step(),
        "parameters": params,
        "tokens": token_stats,
        "samples": sampled.get("rows", []),
    }
    if "judge" in sampled:
        summary["judge"] = sampled["judge"]
    return Trained(trainer, tokenizer, before, after, adapter_dir, summary)


def train_and_finish(
    stage: "StageRun", *, prepare, build_trainer, eval_keys: tuple[str, ...], before_label: str, extra_summary=None, callbacks=(),
) -> RunDir:
    """The run of a preference-training stage once open_stage has loaded its data: train, summary, outputs.

    `eval_keys`: held-out metrics reported before (step 0) and after training; `extra_summary(trainer)`
    adds the stage's own figures. Returns the RunDir (skipped when a finished run matches).
    """
    cfg = stage.cfg
    if stage.skipped:
        return stage.run_dir
    stage.prepare_data(prepare)
    with stage:
        trained = train_adapter(stage, build_trainer=build_trainer, before_label=before_label, callbacks=callbacks)
        summary = {**held_out_summary(trained, eval_keys), **trained.summary}
        if extra_summary is not None:
            summary.update(extra_summary(trained.trainer))
        saved = {"merged": "merged"} if cfg.peft.method == "full" else {"adapter": "adapter"}
        stage.finish(summary=summary, outputs={**saved, "samples": "samples.jsonl"})
    return stage.run_dir
