"""One tracker per stage run: metrics.jsonl always, a W&B run unless `tracking: none`.

Both sinks receive exactly the same metric names. W&B runs offline when no API key
is configured (files under `<RunDir>/wandb/`, `wandb sync` uploads them later).
Only the main process of a distributed run tracks anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from align.core.artifacts import RunDir, SAMPLES

from align.core.files import atomic_write_text

from align.core.redaction import redact, redact_text
from align.core.config import RunConfig
from align.core.config_loader import to_dict


def process_rank() -> int:
    """This process's rank under torchrun/accelerate (RANK), 0 when run alone."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0


def wandb_mode(configured: str) -> str:
    """offline unless a key is configured (or WANDB_MODE/config says otherwise)."""
    env = os.environ.get("WANDB_MODE")
    if configured != "auto":
        return configured
    if env in ("offline", "online", "disabled"):
        return env
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online"
    return "offline"


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class Tracker:
    """Logs metrics, sample tables and artifacts of one stage run."""

    def __init__(
        self,
        run_dir: RunDir,
        *,
        stage: str,
        enabled_wandb: bool,
        project: str = "align",
        group: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        mode: str = "auto",
        tags: list[str] | None = None,
        config: dict | None = None,
        resume_id: str | None = None,
    ):
        self.run_dir = run_dir
        self.stage = stage
        self.active = is_main_process()
        self._metrics_file = None
        self.wandb_run = None
        self.wandb_path: Path | None = None  # the W&B run folder, kept after finish()
        self.wandb_run_id: str | None = None
        if not self.active:
            return
        self._metrics_file = open(run_dir.metrics_path, "a", encoding="utf-8")
        if enabled_wandb:
            import wandb

            with _redacted_argv():  # W&B records the command line (sys.argv) in its run files
                self.wandb_run = wandb.init(
                    project=redact(project),
                    entity=redact(entity),
                    group=redact(group),
                    job_type=stage,
                    name=redact(name or (f"{group}-{stage}" if group else stage)),
                    tags=redact(tags) or None,
                    config=redact(config or {}),
                    dir=str(run_dir.path),
                    mode=wandb_mode(mode),
                    # stdout is not mirrored into the run: logs stay where the user sees them.
                    settings=wandb.Settings(console="off", silent=True),
                    id=resume_id,
                    resume="allow" if resume_id else None,
                )
            self.wandb_run_id = self.wandb_run.id
            self.wandb_path = Path(self.wandb_run.dir).parent  # <RunDir>/wandb/<offline-run-...>/files -> run folder

    @classmethod
    def for_config(cls, run_dir: RunDir, cfg: RunConfig, *, name: str | None = None, resume_id: str | None = None) -> "Tracker":
        """The tracker of a run of `cfg` (a RunConfig: its tracking and wandb keys), config included."""
        w = cfg.wandb
        return cls(
            run_dir, stage=cfg.stage, enabled_wandb=cfg.tracking == "wandb", project=w.project, group=w.group,
            name=w.name or name, entity=w.entity, mode=w.mode, tags=w.tags, config=to_dict(cfg), resume_id=resume_id,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not clean:
            return
        self._metrics_file.write(json.dumps({"_step": step, "_timestamp": time.time(), **clean}) + "\n")
        self._metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)

    def log_samples(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of generations: samples.jsonl in the RunDir and a W&B table."""
        self.log_table(name, columns, rows, step, filename=SAMPLES)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int, filename: str | None = None) -> None:
        """A table: one JSON line per row in the RunDir (`<name>.jsonl` unless named) and a W&B table."""
        if not self.active:
            return
        lines = [json.dumps(dict(zip(columns, row)), ensure_ascii=False) for row in rows]
        atomic_write_text(self.run_dir.path / (filename or f"{name}.jsonl"), "\n".join(lines) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_artifact(self, path: Path, name: str, type: str, metadata: dict | None = None, reference: bool = False) -> None:
        """Log a folder as a W&B artifact; `reference=True` records its files by path instead of copying them."""
        if self.wandb_run is None:
            return
        import wandb

        art = wandb.Artifact(name=name, type=type, metadata=redact(metadata or {}))
        if reference:
            art.add_reference(Path(path).resolve().as_uri())
        else:
            art.add_dir(str(path))
        self.wandb_run.log_artifact(art)

    def set_summary(self, summary: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in summary.items():
                self.wandb_run.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self.wandb_run is not None:
            # Commit the row of the last step first: a row logged with an explicit step stays open until a later
            # step or the flush at finish, and a run whose only row was still open has been seen to end up empty.
            self.wandb_run.log({}, commit=True)
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


@contextlib.contextmanager
def _redacted_argv():
    """sys.argv with secrets (secret environment values, token-shaped strings) replaced, while W&B reads it."""
    original = sys.argv
    sys.argv = [redact_text(a) for a in original]
    try:
        yield
    finally:
        sys.argv = original


def trainer_metric_name(key: str) -> str:
    """HF Trainer log keys -> `train/...` and `eval/...` (the same names in both sinks)."""
    if key == "train_loss":  # the end-of-run average; `loss` is already train/loss per step
        return "train/mean_loss"
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith("train_"):
        return "train/" + key[len("train_"):]
    return "train/" + key
