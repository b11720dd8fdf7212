"""What every training stage shares: the RunDir lifecycle, tracking, trainer settings, samples.

A stage reads its inputs (data, base model) before it creates its RunDir, so bad
input fails with nothing written. From then on, any exception marks the RunDir
`failed` with the error; only a stage that completes every output marks it
`finished`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from align.modeling.adapters import adapter_bytes, start_adapter
from align.modeling.lora_init import finish_saved_adapter
from align.core.artifacts import ADAPTER, MERGED, RunDir, RunLock, atomic_dir, check_output_dir, check_owned, hash_json, redact
from align.core.config import ChildStageConfig, RunConfig, StageConfig, to_dict, to_yaml
from align.core.data import Splits, distinct_prompts
from align.core.checkpoints import MarkCompleteCallback, check_plain_checkpoint, checkpoint_dirs, latest_complete
from align.core.errors import AlignError, ConfigError, DataError
from align.modeling.models import ModelRef, content_hash
from align.core.safeguards import (
    InterruptCallback, Interrupted, NonFiniteGuard, NonFiniteWeightsGuard, check_disk_space, oom_advice,
)
from align.core.tracking import Tracker, is_main_process, trainer_metric_name

log = logging.getLogger("align")

# Keys that change where and how a run is reported, not what it computes.
_NOT_IN_RUN_KEY = ("output_dir", "tracking", "wandb", "resume")


def run_key(cfg: RunConfig, base_hash: str, data_hash: str) -> str:
    """Identity of what a run computes: config (minus reporting), base model, data."""
    computed = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_RUN_KEY}
    return hash_json({"config": computed, "base_model": base_hash, "data": data_hash})


def runs_read(cfg) -> dict[str, str]:
    """Config key -> path of every run and local data file a stage's config reads: its parent run, reward
    runs (of PPO, the reward sources, rm: judges), the runs an evaluation compares, its data."""
    reads: dict[str, str] = {}
    for key in ("parent_run", "reward_run"):
        if getattr(cfg, key, None):
            reads[key] = getattr(cfg, key)
    for name, path in (getattr(cfg, "runs", None) or {}).items():
        reads[f"runs.{name}"] = path
    judges = {"samples.judge": getattr(getattr(cfg, "samples", None), "judge", None)}
    judges.update({f"judges[{i}]": spec for i, spec in enumerate(getattr(cfg, "judges", None) or [])})
    for i, src in enumerate(getattr(cfg, "rewards", None) or []):
        if src.reward_run:
            reads[f"rewards[{i}].reward_run"] = src.reward_run
        judges[f"rewards[{i}].judge"] = src.judge
    reads.update({key: spec.strip()[3:] for key, spec in judges.items() if spec and spec.strip().startswith("rm:")})
    data = {"data.path": getattr(getattr(cfg, "data", None), "path", None), "perplexity_data": getattr(cfg, "perplexity_data", None)}
    reads.update({key: path for key, path in data.items() if path and Path(path).expanduser().exists()})
    return reads


def finished_parent(path: str | Path, key: str = "parent_run") -> RunDir:
    parent = RunDir(Path(path))
    kind = parent.kind()
    if kind == "missing":
        raise ConfigError(f"{key}: {parent.path} does not exist; run the parent stage first")
    if kind not in ("run", "legacy"):
        what = "a file" if kind == "file" else "an empty folder" if kind == "empty" else "a folder without align's run marker"
        raise ConfigError(f"{key}: {parent.path} is not an align run dir ({what}); give the output_dir of a finished stage")
    status = parent.status
    if status != "finished":
        state = "has no readable manifest.json" if status is None else f"is not finished (status: {status})"
        raise ConfigError(f"{key}: {parent.path} {state}; run the parent stage first")
    return parent


def check_training_setup(cfg: StageConfig, base: ModelRef, head: str, rows: list[dict]) -> None:
    """What a training stage can check about its model before anything is written: target modules PEFT would
    find, what `lora.init` reads (align.modeling.adapters.check_adapter), and a device for Liger's kernels
    (known before the model loads)."""
    import importlib.util

    from align.modeling.adapters import check_adapter
    from align.modeling.models import default_device

    check_adapter(cfg, base, rows, head)
    if cfg.train.liger_kernel:
        problem = liger_problem(default_device(), importlib.util.find_spec("liger_kernel") is not None)
        if problem:
            raise ConfigError(f"train.liger_kernel: {problem}")


def reset_peak_memory() -> None:
    """Start a stage's peak-memory count afresh: a pipeline runs every stage in one process."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the figure stays the process's peak so far


def peak_memory_mb() -> float:
    """Peak memory since reset_peak_memory: CUDA max allocated on a GPU, else peak resident set size."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def resolve_base(cfg) -> tuple[ModelRef, RunDir | None]:
    """The frozen base of a stage: its parent SFT run's merged model, or model.name_or_path."""
    from align.modeling import models

    if isinstance(cfg, ChildStageConfig) and cfg.parent_run:
        parent = finished_parent(cfg.parent_run)
        merged = parent.merged_dir
        if not (merged / "config.json").is_file():
            method = (parent.config().get("peft") or {}).get("method")
            why = (
                f"its method {method} trains virtual tokens, which do not merge into weights"
                if method in ("prompt_tuning", "prefix_tuning") else "is it an SFT run?"
            )
            raise DataError(f"parent_run: {parent.path} has no merged model ({merged}); {why}")
        return ModelRef(name=str(merged), location=str(merged.resolve()), is_local=True), parent
    return models.resolve(cfg.model.name_or_path, cfg.model.revision), None


def open_stage(
    cfg: StageConfig, data_kind: str, force: bool, inputs: dict | None = None, head: str = "causal", **split_options
) -> "StageRun":
    """A training stage's data, base model and StageRun: bad input fails here, before anything is written.

    `head`: the model the stage trains ("score" for a reward model), for the check of target modules;
    `split_options`: passed to load_splits (e.g. KTO's score_threshold).
    """
    from align.core.data import load_splits

    splits = load_splits(cfg.data, data_kind, cfg.train.seed, **split_options)
    base, parent = resolve_base(cfg)
    return StageRun(cfg, base=base, splits=splits, parent=parent, force=force, inputs=inputs, head=head)


def held_out_summary(trained: "Trained", keys: tuple[str, ...]) -> dict[str, Any]:
    """eval_<key>_before and eval_<key>_after for each held-out metric key."""
    summary = {f"eval_{k}_before": trained.before.get(f"eval_{k}") for k in keys}
    summary.update({f"eval_{k}_after": trained.after.get(f"eval_{k}") for k in keys})
    return summary


class StageRun:
    """One stage run: decides skip, resume or fresh start; owns the RunDir and the tracker."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        base: ModelRef,
        splits: Splits,
        parent: RunDir | None = None,
        force: bool = False,
        inputs: dict | None = None,
        head: str = "causal",
    ):
        self.cfg = cfg
        self.stage = cfg.stage
        self.base = base
        self.splits = splits
        self.parent = parent
        self.run_dir = RunDir(Path(cfg.output_dir))
        # Never an output_dir that is, holds or sits in a run it reads (a data folder may hold it).
        check_owned(self.run_dir.path, runs_read(cfg), may_hold=("data.path", "perplexity_data"))
        self.step: int | None = None  # the optimizer step in progress, for error messages
        self.phase = "setup"
        self._lock = None
        self._began = False
        self.base_hash = content_hash(base)
        self.data_info = splits.info()
        # `inputs`: identities of other runs this one reads (an evaluation's policies, a PPO reward model).
        self.key = run_key(cfg, self.base_hash, self.data_info["hash"]) if not inputs else hash_json(
            {"run": run_key(cfg, self.base_hash, self.data_info["hash"]), "inputs": inputs}
        )
        parent_id = (parent.manifest() or {}).get("run_id") if parent else None
        self.skipped = not force and self.run_dir.matches(self.key, parent_id)
        if self.skipped:
            source = "parent run" if parent else "base model"
            log.info("%s: skipped: the finished run in %s matches its config, %s and data", self.stage, self.run_dir.path, source)
        resumable = isinstance(cfg, StageConfig) and cfg.resume
        if not self.skipped:
            self._refuse_replacing_finished(force, resumable)
        if not self.skipped and is_main_process():
            check_output_dir(self.run_dir.path)  # a file, a foreign folder, no write access: refused before any work
        if not self.skipped and isinstance(cfg, StageConfig):
            check_training_setup(cfg, base, head, splits.train)
        self.resume_from = self._checkpoint_to_resume() if resumable and not self.skipped else None
        self.tracker: Tracker | None = None
        self.prepared: tuple | None = None  # (tokenizer, train_ds, eval_ds, token stats) from prepare_data
        self._started = 0.0

    def prepare_data(self, prepare) -> None:
        """Tokenize the data with `prepare(splits, tokenizer, max_length)` -> (train_ds, eval_ds, token stats),
        before the run dir is touched: a data check that fails here (no row fits max_length) leaves it as it was."""
        from align.modeling import models

        try:
            tokenizer = models.load_tokenizer(self.base, self.cfg.model)
            report_folded_system_messages(self, tokenizer)
            self.prepared = (tokenizer, *prepare(self.splits, tokenizer, self.cfg.train.max_length))
        except Exception as exc:
            if not isinstance(exc, AlignError):  # a library error: one line on the command line, nothing written
                with contextlib.suppress(AttributeError, TypeError):
                    exc.align_stage_failure = (f"{self.stage} failed while preparing its data: {redact(_one_line(exc))}; "
                                               f"nothing was written to {self.run_dir.path} (--debug prints the traceback)")
            raise

    def _refuse_replacing_finished(self, force: bool, resumable: bool) -> None:
        """A finished run that does not match this one is replaced with --force only (resume included)."""
        previous = self.run_dir.manifest() or {}
        if force or previous.get("status") != "finished":
            return
        what = f"a finished {previous.get('stage')} run of another config, base model, data or parent run"
        if resumable:
            raise ConfigError(f"resume: {self.run_dir.path} holds {what}: nothing to resume; --force replaces it, "
                              "or choose another output_dir")
        raise ConfigError(f"output_dir: {self.run_dir.path} holds {what}; --force replaces it, or choose another output_dir")

    def _checkpoint_to_resume(self) -> Path | None:
        previous = self.run_dir.manifest()
        if previous is None or previous.get("status") == "finished":
            log.info("%s: nothing to resume in %s; starting fresh", self.stage, self.run_dir.path)
            return None
        if previous.get("run_key") != self.key:
            raise ConfigError(
                f"resume: {self.run_dir.path} holds a run of a different config, base model or data; "
                "run without resume to start over"
            )
        checkpoint = latest_complete(self.run_dir.path)
        if checkpoint is None:
            log.info("%s: no complete checkpoint in %s; starting fresh", self.stage, self.run_dir.path)
        else:
            check_plain_checkpoint(checkpoint)  # a checkpoint holding pickled code is refused before the run reopens
        return checkpoint

    def __enter__(self) -> "StageRun":
        self._started = time.time()
        reset_peak_memory()
        if is_main_process():
            if self.resume_from is None:
                check_disk_space(self.run_dir.path, self._needed_disk_bytes())  # before anything is created
            self._lock = RunLock.acquire(self.run_dir.path)  # held until __exit__; a second run is refused
        try:
            return self._enter()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _enter(self) -> "StageRun":
        wandb_id = None
        if self.resume_from is not None:
            wandb_id = (self.run_dir.manifest() or {}).get("wandb_run_id")
            if is_main_process():
                step = int(self.resume_from.name.rpartition("-")[2])
                for later_step, folder in checkpoint_dirs(self.run_dir.path):
                    if later_step > step:  # half-written by the run that died
                        shutil.rmtree(folder, ignore_errors=True)
                self.run_dir.reopen(str(self.resume_from))
                self._began = True
                self.run_dir.truncate_metrics(after_step=step)
            log.info("%s: resuming from %s", self.stage, self.resume_from)
        elif is_main_process():
            RunDir.start(
                self.run_dir.path,
                stage=self.stage,
                config=to_dict(self.cfg),
                config_yaml=f"# resolved {self.stage} config\n" + to_yaml(self.cfg),
                run_key=self.key,
                parent=self.parent,
                base_model={"name": self.base.name, "location": self.base.location, "content_hash": self.base_hash},
                dataset=self.data_info,
            )
            self._began = True
        try:
            self.tracker = Tracker.for_config(self.run_dir, self.cfg, resume_id=wandb_id)
            if is_main_process() and self.tracker.wandb_run_id:
                self.run_dir.update(wandb_run_id=self.tracker.wandb_run_id)
        except BaseException as exc:  # __exit__ does not run when __enter__ raises
            self._exit(type(exc), exc, exc.__traceback__)
            raise
        for note in self.splits.notes:
            log.info("%s data: %s", self.stage, note)
        self.phase = "training"
        return self

    def _needed_disk_bytes(self) -> int:
        """A generous estimate of what this stage writes: merged model (SFT), adapter, checkpoints."""
        base = Path(self.base.location)
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors")) if self.base.is_local else 0
        training = isinstance(self.cfg, StageConfig)
        full = training and self.cfg.peft.method == "full"
        # Adapter weights + Adam moments stay well under 10% of the base; full fine-tuning saves
        # the whole model (and its checkpoints two Adam moments on top).
        adapter_and_state = weights * 3 if full else weights // 10
        checkpoints = self.cfg.train.save_total_limit if training and self.cfg.train.save_steps else 1
        merged = weights if self.stage == "sft" and not full else 0
        return merged + adapter_and_state * (1 + checkpoints) + 50 * 2**20

    def where(self) -> str:
        """Where the stage is, for an error message: 'at step 3', 'while saving', 'during setup'."""
        if self.phase == "training" and self.step is not None:
            return f"at step {self.step}"
        return {"setup": "during setup", "training": "before the first step"}.get(self.phase, f"while {self.phase}")

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._exit(exc_type, exc, tb)
        finally:
            self._release()
        if exc is not None and not isinstance(exc, AlignError) and isinstance(exc, Exception):
            # A library error mid-run: the exception goes on as it is (callers of the Python API see it), carrying
            # the one line the command line prints instead of a traceback: the stage, the step and the cause.
            with contextlib.suppress(AttributeError, TypeError):
                exc.align_stage_failure = (
                    f"{self.stage} failed {self.where()}: {redact(_one_line(exc))}; the run in {self.run_dir.path} is "
                    "marked failed (its manifest.json has the traceback; --debug prints it)"
                )
        return False

    def _exit(self, exc_type, exc, tb) -> None:
        if exc is not None:
            message = redact(f"{exc_type.__name__}: {exc}".strip())
            if is_main_process() and self._began:  # never mark a previous run failed for a refusal before this one began
                status = "interrupted" if isinstance(exc, Interrupted) else "failed"
                self.run_dir.fail(message, redact(traceback.format_exception(exc_type, exc, tb)[-6:]), status=status)
            if self.tracker:
                self.tracker.finish(failed=True)

    @staticmethod
    def before_metrics(trainer) -> dict[str, float]:
        """Held-out metrics at step 0, from the trainer's log history (restored from the
        checkpoint when resuming, so a resumed run reports the step 0 of its first attempt)."""
        for entry in trainer.state.log_history:
            if entry.get("step") == 0 and "eval_loss" in entry:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
        return {}

    def callback(self):
        return TrackerCallback(self.tracker, self)

    def save_adapter(self, trainer) -> Path:
        """The trained adapter in standard PEFT format (adapter/), written atomically, logged as an artifact.

        Full fine-tuning has no adapter: the trained model itself is written to merged/, where
        the next stage looks for its base. Every rank calls this: under FSDP/ZeRO-3 the trainer
        gathers the sharded weights and the main process writes them.
        """
        full = self.cfg.peft.method == "full"
        target = self.run_dir.path / (MERGED if full else ADAPTER)
        staging = self.run_dir.path / f".{ADAPTER}.staging"
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
        if is_main_process():
            finish_saved_adapter(trainer.model, staging)  # PiSSA/OLoRA: converted to a LoRA of the unchanged base
            with atomic_dir(target) as tmp:
                for item in staging.iterdir():
                    if item.suffix != ".bin":  # training_args.bin is a pickle; RunDirs hold safetensors/text only
                        os.replace(item, tmp / item.name)
            shutil.rmtree(staging, ignore_errors=True)
            self.tracker.log_artifact(
                target, name=f"{self.stage}-{'model' if full else 'adapter'}", type="model",
                metadata={"stage": self.stage, "base_model": self.base.name, "run_dir": str(self.run_dir.path),
                          "peft_method": self.cfg.peft.method},
                reference=full,  # a whole model is referenced in place, not copied into W&B's cache
            )
        return target

    def finish(self, summary: dict[str, Any], outputs: dict[str, str]) -> None:
        summary = {**summary, "wall_time_s": round(time.time() - self._started, 1), "peak_memory_mb": peak_memory_mb()}
        if self.tracker.wandb_path is not None:
            outputs = {**outputs, "wandb": str(self.tracker.wandb_path)}
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
        scalars.update({f"parameters/{k}": v for k, v in (summary.get("parameters") or {}).items()})
        self.tracker.set_summary(scalars)
        self.tracker.finish()
        if is_main_process():
            self.run_dir.finish(summary=summary, outputs={"metrics": "metrics.jsonl", **outputs})


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


def report_folded_system_messages(stage: StageRun, tokenizer) -> None:
    """Count the rows whose system message the model's template makes align fold (nothing changes silently)."""
    from align.modeling.templates import folds_system

    if not folds_system(tokenizer):
        return
    for name, rows in (("train", stage.splits.train), ("eval", stage.splits.eval)):
        n = sum(1 for row in rows if (row.get("messages") or row.get("prompt") or [{}])[0].get("role") == "system")
        if n:
            log.info("%s %s: %d rows start with a system message, folded into their first user turn", stage.stage, name, n)


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


def open_online_stage(cfg, force: bool, check_processes=None) -> tuple["StageRun", list]:
    """An online stage's prompts, reward runs (adapters on this base) and StageRun: the launch
    (`check_processes(n)` refuses a split over n processes that cannot work), data and reward sources
    checked before anything is written. Returns (stage, reward runs)."""
    from align.core.data import load_splits
    from align.rlhf.distributed import launched_size
    from align.rlhf.rewards import answers_of, check_answers, check_sources_ready, reward_runs, run_inputs

    if check_processes is not None:
        check_processes(launched_size())
    splits = load_splits(cfg.data, "prompt", cfg.train.seed)
    check_answers(cfg.rewards, splits)
    base, parent = resolve_base(cfg)
    runs = reward_runs(cfg.rewards, base)
    check_sources_ready(cfg.rewards, runs, answers_of(splits.train + splits.eval))
    stage = StageRun(cfg, base=base, splits=splits, parent=parent, force=force, inputs=run_inputs(runs))
    join_processes(stage)
    if not stage.skipped:
        check_prompts_fit(stage)
    return stage, runs


def check_prompts_fit(stage: "StageRun") -> None:
    """An online stage samples responses of up to <section>.max_new_tokens after each prompt: a prompt whose
    responses cannot fit train.max_length is refused before the run starts, naming its file and line (it
    would otherwise be a memory error, or a cut prompt, mid-run)."""
    from align.modeling import models
    from align.modeling.templates import chat_ids

    cfg = stage.cfg
    section = next(name for name in ("online", cfg.stage) if hasattr(getattr(cfg, name, None), "max_new_tokens"))
    new_tokens, limit = getattr(cfg, section).max_new_tokens, cfg.train.max_length
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    for split, rows in (("train", stage.splits.train), ("eval", stage.splits.eval)):
        for i, row in enumerate(rows):
            n = len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True))
            if n + new_tokens > limit:
                raise DataError(
                    f"{stage.splits.where(split, i)}: the prompt is {n} tokens; with {section}.max_new_tokens={new_tokens} its "
                    f"responses need {n + new_tokens} > train.max_length={limit}: shorten or leave out this prompt, or raise "
                    "train.max_length"
                )


def join_processes(stage: "StageRun") -> None:
    """Several processes: they join the launcher's process group and agree on rank 0's decisions (skip,
    the checkpoint to resume from), so every rank restarts from the same checkpoint."""
    from align.rlhf.distributed import start

    ranks = start(stage.stage)
    stage.skipped, stage.resume_from = ranks.broadcast((stage.skipped, stage.resume_from))


def run_group_stage(cfg, force: bool, callbacks=()) -> RunDir:
    """The run of GRPO and RLOO (one implementation, align/rlhf/grpo.py): prompts, reward sources, train, samples."""
    from align.rlhf import grpo as G

    stage, runs = open_online_stage(cfg, force, lambda n: G.check_processes(cfg, n))
    if stage.skipped:
        return stage.run_dir
    with stage:
        gp, summary = G.train(stage, cfg, cfg.stage, runs, callbacks)
        sampled = log_sample_table(stage, gp.model, gp.tokenizer, "reference", step=cfg.train.max_steps)
        summary["samples"] = sampled.get("rows", [])
        if "judge" in sampled:
            summary["judge"] = sampled["judge"]
        stage.finish(summary=summary, outputs={"adapter": ADAPTER, "samples": "samples.jsonl"})
    return stage.run_dir


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


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, update); evaluations fall outside it."""

    def __init__(self):
        self.durations: list[float] = []
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.durations.append(time.perf_counter() - self._started)
            self._started = None

    def seconds_per_step(self) -> float | None:
        return round(sum(self.durations) / len(self.durations), 3) if self.durations else None


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class TrackerCallback(TrainerCallback):
    """Forwards HF Trainer logs to the stage's tracker under train/... and eval/... names; keeps the
    stage's step current for error messages.

    `step_offset`: steps taken before this trainer started (online DPO trains one trainer per round).
    """

    def __init__(self, tracker: Tracker, stage: "StageRun | None" = None, step_offset: int = 0):
        self.tracker = tracker
        self.stage = stage
        self.step_offset = step_offset

    def on_step_begin(self, args, state, control, **kwargs):
        if self.stage is not None:
            self.stage.step = self.step_offset + state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        if self.stage is not None:
            self.stage.phase = "finishing (evaluation, saving, samples)"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.tracker.log({trainer_metric_name(k): v for k, v in logs.items()}, step=self.step_offset + state.global_step)


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


def convert_rows(rows, convert) -> tuple[list[dict], int, int]:
    """`convert(row) -> (example or None, truncated)` over rows: (kept examples, rows truncated, rows dropped)."""
    kept, truncated, dropped = [], 0, 0
    for row in rows:
        example, was_truncated = convert(row)
        truncated += was_truncated
        if example is None:
            dropped += 1
        else:
            kept.append(example)
    return kept, truncated, dropped


def to_datasets(splits: Splits, convert, stage: str, max_length: int, drop_reason: str):
    """Convert both splits row by row into datasets, counting rows cut to and dropped by max_length.

    `convert(row)` returns (example or None to drop, whether it was truncated). Nothing is
    dropped silently: the counts are logged and returned for the manifest.
    """
    from datasets import Dataset

    stats: dict[str, int] = {}
    out = {}
    for name, rows in (("train", splits.train), ("eval", splits.eval)):
        shown = tqdm(rows, desc=f"preparing {stage} {name}", disable=not rows or not is_main_process(), leave=False)
        kept, truncated, dropped = convert_rows(shown, convert)
        stats[f"{name}_truncated"] = truncated
        stats[f"{name}_dropped"] = dropped
        if truncated or dropped:
            log.warning("%s %s: %d rows cut to max_length=%d, %d dropped (%s)", stage, name, truncated, max_length, dropped, drop_reason)
        out[name] = Dataset.from_list(kept) if kept else None
    if out["train"] is None:
        raise DataError(f"data.path '{splits.source}': no training row is left within max_length={max_length} ({drop_reason})")
    return out["train"], out["eval"], stats


def preference_datasets(splits: Splits, tokenizer, max_length: int, stage: str):
    """Preference rows as datasets; rows cut or dropped by max_length are counted (align.preference.dpo_setup)."""
    from align.preference.dpo_setup import DROP_REASON, pair_converter

    return to_datasets(splits, pair_converter(tokenizer, max_length), stage, max_length, DROP_REASON)


def held_out_prompts(splits: Splits, n: int) -> list[list[dict]]:
    """The first n distinct held-out prompts (preference prompts, or SFT turns before the last answer).

    None without held-out data: training prompts would flatter the model.
    """
    return distinct_prompts(splits.eval, n)


def _sample_prompts(stage: StageRun) -> list[list[dict]]:
    samples = stage.cfg.samples
    if not is_main_process():  # generation involves no other rank; only the main one reports it
        return []
    return held_out_prompts(stage.splits, samples.num_prompts) if samples.num_prompts > 0 else []


def reference_generations(stage: StageRun, model, tokenizer) -> list[str]:
    """Greedy generations of the sample prompts from `model` as it is now (before training)."""
    from align.modeling.generation import generate

    return generate(model, tokenizer, _sample_prompts(stage), stage.cfg.samples.max_new_tokens)


def log_sample_table(stage: StageRun, model, tokenizer, before_label: str, step: int, before: list[str] | None = None) -> dict[str, Any]:
    """Greedy generations on held-out prompts with the adapter off (before) and on (after).

    `before`: generations taken before training (full fine-tuning, which has no adapter to switch off).
    Returns the rows and, when `samples.judge` is set, the judge's mean score before and after.
    """
    from align.modeling.generation import generate

    samples = stage.cfg.samples
    prompts = _sample_prompts(stage)
    if not prompts:
        return {}
    if before is None:
        with model.disable_adapter():
            before = generate(model, tokenizer, prompts, samples.max_new_tokens)
    after = generate(model, tokenizer, prompts, samples.max_new_tokens)
    columns = ["prompt", before_label, stage.stage]
    rows = [[p[-1]["content"], b, a] for p, b, a in zip(prompts, before, after)]
    out: dict[str, Any] = {}
    if samples.judge:
        from align.evaluation.judges import check_finite_scores, load_judge

        judge = load_judge(samples.judge)
        scores_before, scores_after = judge.score(prompts, before), judge.score(prompts, after)
        for scores in (scores_before, scores_after):
            check_finite_scores(f"samples.judge: judge {judge.name!r}", scores, prompts)
        columns += [f"{judge.name} ({before_label})", f"{judge.name} ({stage.stage})"]
        rows = [r + [sb, sa] for r, sb, sa in zip(rows, scores_before, scores_after)]
        applied = [(b, a) for b, a in zip(scores_before, scores_after) if b is not None and a is not None]
        if applied:
            out["judge"] = {
                "name": judge.name,
                "n": len(applied),
                "before_label": before_label,
                "before": sum(b for b, _ in applied) / len(applied),
                "after": sum(a for _, a in applied) / len(applied),
            }
            stage.tracker.log(
                {f"judge/{judge.name}/{before_label}": out["judge"]["before"], f"judge/{judge.name}/{stage.stage}": out["judge"]["after"]},
                step=step,
            )
    stage.tracker.log_samples("samples", columns, rows, step=step)
    out["rows"] = [dict(zip(columns, r)) for r in rows]
    return out
