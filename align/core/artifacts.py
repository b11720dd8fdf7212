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
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from align.core.errors import ConfigError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
MERGED = "merged"
SAMPLES = "samples.jsonl"

# Values of these variables never reach a RunDir, a log or W&B.
SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "OPENAI_API_KEY")
TRACKED_PACKAGES = ("align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "wandb")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def redact(obj: Any) -> Any:
    """Replace any secret from the environment found inside strings of a nested structure."""
    secrets = [v for k in SECRET_ENV_VARS if len(v := os.environ.get(k, "")) >= 8]
    if not secrets:
        return obj

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            for s in secrets:
                x = x.replace(s, "<redacted>")
            return x
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(obj)


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual permissions."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _default_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    _default_mode(tmp, is_dir=True)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- hashing


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of files, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


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

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def config(self) -> dict:
        """The resolved config the run ran with (config.yaml); {} when missing or unreadable."""
        import yaml

        try:
            loaded = yaml.safe_load((self.path / CONFIG).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
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
        """Replace whatever was at `path` with a fresh run in status `running`."""
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()):
            if not run.manifest_path.exists():
                # Never wipe a directory we did not create.
                raise ConfigError(f"output_dir: {run.path} exists, is not empty and is not a RunDir; choose another")
            # A previous run of this stage: its outputs must not survive into the new one.
            for child in run.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        parent_info = None
        if parent is not None:
            pm = parent.manifest() or {}
            parent_info = {"path": str(parent.path), "run_id": pm.get("run_id"), "stage": pm.get("stage")}
        atomic_write_text(run.path / CONFIG, redact(config_yaml))
        atomic_write_json(
            run.manifest_path,
            redact(
                {
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
