"""RunDir: the only way stages talk to each other.

A RunDir holds `config.yaml` (the resolved config), `manifest.json` (stage, status,
parent run, base model and data hashes, versions, times, summary), `metrics.jsonl`,
`adapter/`, and for SFT `merged/`. Files are written atomically (temp file + rename,
directories likewise), and `status` reaches `finished` only as the very last write,
so a crash or an error never leaves a RunDir that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from align.core.errors import ConfigError
from align.core.files import atomic_write_json, atomic_write_text
from align.core.redaction import redact

log = logging.getLogger("align")

MANIFEST = "manifest.json"
# The toolkit's own mark on a run directory: a file of this name holding {MARKER_KEY: 1, ...}
# (the manifest carries the key too). Only a folder with it is one align may empty or replace;
# a folder that merely holds a manifest.json belongs to someone else.
MARKER = ".align-run.json"
MARKER_KEY = "align_run_dir"
LOCK = ".align-lock"  # held while a stage writes the run: {pid, host, boot id, start time, command}
# Run dirs written before the marker existed: a manifest.json with all of these keys and format 1.
LEGACY_MANIFEST_KEYS = ("format", "stage", "run_id", "status", "run_key", "started_at", "versions")
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
MERGED = "merged"
SAMPLES = "samples.jsonl"

TRACKED_PACKAGES = ("align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "wandb")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    import platform

    out["python"] = platform.python_version()
    return out


def git_commit() -> str | None:
    """The commit of the checkout align runs from (with -dirty), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


# --------------------------------------------------------------------------- ownership


def read_json_dict(path: Path) -> dict | None:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    return loaded if isinstance(loaded, dict) else None


def is_legacy_manifest(manifest: dict | None) -> bool:
    """A manifest written by an align version before the run-dir marker: align's own schema keys."""
    # A manifest with the marker key was written by a version that writes the marker file too: without
    # that file the folder has been unmarked on purpose.
    return (bool(manifest) and MARKER_KEY not in manifest and manifest.get("format") == 1
            and all(k in manifest for k in LEGACY_MANIFEST_KEYS))


def folder_kind(path: Path) -> str:
    """What a would-be run dir is: missing, file, empty, run (align's marker), legacy (an earlier align's
    run dir, recognized by its manifest's schema), or foreign (anything else: never touched)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "missing"
    if not path.is_dir():
        return "file"
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return "foreign"  # unreadable: certainly not ours to empty
    if not names - {LOCK}:
        return "empty"
    if MARKER in names and (read_json_dict(path / MARKER) or {}).get(MARKER_KEY) == 1:
        return "run"
    if MANIFEST in names and is_legacy_manifest(read_json_dict(path / MANIFEST)):
        return "legacy"
    return "foreign"


def check_output_dir(path: Path, key: str = "output_dir") -> str:
    """Refuse, before anything is written, an output dir align may not write: a file, a foreign
    folder, one that cannot be created or written. Returns its kind (see folder_kind)."""
    path = Path(path)
    check_not_a_link(path, key)
    kind = folder_kind(path)
    if kind == "file":
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    if kind == "foreign":
        raise ConfigError(
            f"{key}: {path} exists, is not empty and is not an align run dir (no {MARKER}); align never empties "
            "a folder it did not create: choose another output_dir"
        )
    probe = path
    while not probe.exists():  # the nearest existing folder is where the run dir will be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and (not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK)):
        what = "is a file" if not probe.is_dir() else "is not writable"
        raise ConfigError(f"{key}: cannot write {path}: {probe} {what}")
    return kind


def check_not_a_link(path: Path, key: str = "output_dir") -> None:
    """A run dir is the folder it is named by: a symbolic link in its place would have a run write, and empty,
    whatever folder the link points to (another run, someone's files)."""
    path = Path(path)
    if path.is_symlink():
        raise ConfigError(
            f"{key}: {path} is a symbolic link to {os.path.realpath(path)}; align writes a run only into the folder "
            "it is given: name that folder itself, or choose another output_dir"
        )


def check_owned(path: Path, reads: dict[str, str | Path], key: str = "output_dir", may_hold: tuple[str, ...] = ()) -> None:
    """Refuse an output dir that is, contains, or lies inside a run (or file) the stage reads.

    `reads`: config key -> path of every run and local file the stage reads (its parent run, reward runs,
    evaluated runs, data). Paths are compared resolved (symbolic links followed), so a link cannot hide
    a parent: a stage resets its output dir before it writes, and would empty what it was about to read.
    `may_hold`: keys of folders a run dir may sit inside (a data folder: only its files are read).
    """
    out = Path(os.path.realpath(Path(path)))
    shown = f"{path} (a symbolic link to {out})" if Path(path).is_symlink() else str(path)
    for source, read in reads.items():
        target = Path(os.path.realpath(Path(read)))
        if out == target:
            relation = "is"
        elif target in out.parents and source not in may_hold:
            relation = "is inside"
        elif out in target.parents:
            relation = "contains"
        else:
            continue
        raise ConfigError(
            f"{key}: {shown} {relation} the {source} ({read}) this stage reads; a run resets its output_dir before "
            "writing, which would destroy what it reads: choose another output_dir"
        )


OUTPUT_MARKER = ".align-output.json"  # in folders `align merge/export/combine` write; {"align_output": kind}


def check_replaceable(path: Path, key: str) -> None:
    """An output folder the user named: missing, empty, or one align wrote before (its marker). Anything
    else is the user's and is never replaced."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    if not any(path.iterdir()):
        return
    if "align_output" in (read_json_dict(path / OUTPUT_MARKER) or {}):
        return
    raise ConfigError(
        f"{key}: {path} exists and holds files align did not write (no {OUTPUT_MARKER}); align never replaces "
        "such a folder: choose another path"
    )


def mark_output(folder: Path, kind: str) -> None:
    atomic_write_json(Path(folder) / OUTPUT_MARKER, {"align_output": kind, "written_at": now()})


def _write_marker(run_path: Path) -> None:
    atomic_write_json(Path(run_path) / MARKER, {
        MARKER_KEY: 1,
        "note": "This folder is an align run directory: align may empty and rewrite it. Remove this file to stop that.",
    })


# --------------------------------------------------------------------------- RunDir


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def merged_dir(self) -> Path:
        return self.path / MERGED

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    def kind(self) -> str:
        """missing, file, empty, run, legacy or foreign (see folder_kind)."""
        return folder_kind(self.path)

    def is_run_dir(self) -> bool:
        """A run dir of this toolkit: its marker, or the manifest of an earlier align version."""
        return self.kind() in ("run", "legacy")

    def manifest(self) -> dict | None:
        """The run's manifest; None when missing, unreadable, or not an align run dir's (a foreign manifest.json)."""
        m = read_json_dict(self.manifest_path)
        if m is None:
            return None
        if m.get(MARKER_KEY) == 1 and (read_json_dict(self.marker_path) or {}).get(MARKER_KEY) == 1:
            return m
        return m if is_legacy_manifest(m) else None

    def config(self) -> dict:
        """The resolved config the run ran with (config.yaml); {} when missing or unreadable.

        Read as data with the config loader's safe YAML (no tags, no self-referencing or
        exploding aliases): a tampered file is ignored with a warning.
        """
        from align.core.config_loader import _yaml_with_lines

        path = self.path / CONFIG
        try:
            loaded, _ = _yaml_with_lines(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError):
            return {}
        except ConfigError as exc:
            log.warning("ignored %s: %s", path, exc)
            return {}
        return loaded if isinstance(loaded, dict) else {}

    @property
    def status(self) -> str | None:
        m = self.manifest()
        return m.get("status") if m else None

    def is_finished(self) -> bool:
        return self.status == "finished"

    def matches(self, run_key: str, parent_run_id: str | None) -> bool:
        """A finished run with the same run key (config, base model, data) on the same parent run."""
        m = self.manifest()
        if not m or m.get("status") != "finished":
            return False
        parent = m.get("parent") or {}
        return m.get("run_key") == run_key and parent.get("run_id") == parent_run_id

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    def start(
        cls,
        path: Path,
        *,
        stage: str,
        config: dict,
        config_yaml: str,
        run_key: str,
        parent: "RunDir | None",
        base_model: dict,
        dataset: dict,
    ) -> "RunDir":
        """Replace the run dir at `path` (empty, missing, or marked as align's) with a fresh run in status `running`.

        A folder align did not create is refused untouched. The caller holds the run's lock (StageRun
        takes it), which survives the wipe.
        """
        run = cls(path)
        kind = check_output_dir(run.path)
        if kind == "legacy":
            log.info("output_dir %s: a run dir of an earlier align version (recognized by its manifest); marking it as align's", run.path)
        if kind in ("run", "legacy"):
            # A previous run of this stage: its outputs must not survive into the new one.
            for child in run.path.iterdir():
                if child.name == LOCK:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        _write_marker(run.path)
        parent_info = None
        if parent is not None:
            pm = parent.manifest() or {}
            parent_info = {"path": str(parent.path), "run_id": pm.get("run_id"), "stage": pm.get("stage")}
        atomic_write_text(run.path / CONFIG, redact(config_yaml))
        atomic_write_json(
            run.manifest_path,
            redact(
                {
                    MARKER_KEY: 1,
                    "format": 1,
                    "stage": stage,
                    "run_id": uuid.uuid4().hex,
                    "status": "running",
                    "error": None,
                    "run_key": run_key,
                    "parent": parent_info,
                    "base_model": base_model,
                    "dataset": dataset,
                    "versions": package_versions(),
                    "git_commit": git_commit(),
                    "started_at": now(),
                    "ended_at": None,
                    "outputs": {},
                    "summary": {},
                }
            ),
        )
        return run

    def reopen(self, resumed_from: str | None) -> "RunDir":
        """Continue an unfinished run in place: status back to running, history kept."""
        m = self.manifest() or {}
        resumes = list(m.get("resumes", [])) + [{"at": now(), "from_checkpoint": resumed_from}]
        if self.kind() == "legacy":  # resuming a run of an earlier align version: mark it as align's now
            _write_marker(self.path)
            m[MARKER_KEY] = 1
            atomic_write_json(self.manifest_path, redact(m))
        self.update(status="running", error=None, ended_at=None, resumes=resumes)
        return self

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past a checkpoint: the resumed run logs those steps again."""
        if not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("_step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def update(self, **fields: Any) -> None:
        m = self.manifest() or {}
        m.update(fields)
        atomic_write_json(self.manifest_path, redact(m))

    def finish(self, summary: dict, outputs: dict) -> None:
        self.update(status="finished", ended_at=now(), summary=summary, outputs=outputs)

    def fail(self, error: str, traceback_lines: list[str] | None = None, status: str = "failed") -> None:
        self.update(status=status, ended_at=now(), error=error, traceback=traceback_lines or [])
