"""One stage run: its inputs checked, then skip, resume or a fresh start; the RunDir, its lock and tracker.

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
from pathlib import Path
from typing import Any

from align.core.artifacts import ADAPTER, MERGED, RunDir, check_output_dir, check_owned

from align.core.files import atomic_dir, hash_json

from align.core.redaction import redact

from align.core.run_lock import RunLock
from align.core.callbacks import TrackerCallback
from align.core.checkpoints import check_plain_checkpoint, checkpoint_dirs, latest_complete
from align.core.config import ChildStageConfig, RunConfig, StageConfig
from align.core.config_loader import to_dict, to_yaml
from align.core.data import Splits
from align.core.errors import AlignError, ConfigError, DataError
from align.core.memory import peak_memory_mb, reset_peak_memory
from align.core.safeguards import Interrupted, check_disk_space
from align.core.tracking import Tracker, is_main_process
from align.modeling.lora_init import finish_saved_adapter
from align.modeling.models import ModelRef, content_hash
from align.modeling.train_setup import liger_problem

log = logging.getLogger("align")

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


def report_folded_system_messages(stage: StageRun, tokenizer) -> None:
    """Count the rows whose system message the model's template makes align fold (nothing changes silently)."""
    from align.modeling.templates import folds_system

    if not folds_system(tokenizer):
        return
    for name, rows in (("train", stage.splits.train), ("eval", stage.splits.eval)):
        n = sum(1 for row in rows if (row.get("messages") or row.get("prompt") or [{}])[0].get("role") == "system")
        if n:
            log.info("%s %s: %d rows start with a system message, folded into their first user turn", stage.stage, name, n)


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
