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
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from align.core.errors import AlignError, ConfigError

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

# Values of these variables, and of any variable whose name looks like a secret, never reach a
# RunDir, a log or W&B.
SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "OPENAI_API_KEY")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Secrets recognizable by their shape, wherever they come from (a command line, a config value).
SECRET_PATTERNS = (
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "<redacted>"),  # Hugging Face tokens
    (re.compile(r"\b(?:sk|rk)-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"), "<redacted>"),  # OpenAI / Anthropic style API keys
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"), "<redacted>"),  # GitHub tokens
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "<redacted>"),  # Slack tokens
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "<redacted>"),  # AWS access key ids
    (re.compile(r"\blocal-[0-9a-f]{40}\b"), "<redacted>"),  # W&B local-server keys
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1<redacted>@"),  # user:password@ in a URL
    (re.compile(r"(?i)\b(api_?key|token|secret|password)=[^\s&]{8,}"), r"\1=<redacted>"),  # key=value in a query or argument
)
TRACKED_PACKAGES = ("align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "wandb")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def secret_values() -> list[str]:
    """Values of the secret environment variables set now (long enough to be worth finding), longest first."""
    names = set(SECRET_ENV_VARS) | {k for k in os.environ if _SECRET_NAME.search(k)}
    return sorted({v for k in names if len(v := os.environ.get(k, "")) >= 8}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret environment value and every secret-shaped token replaced by <redacted>."""
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, "<redacted>")
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(obj: Any) -> Any:
    """Replace any secret (from the environment, or shaped like a token) inside strings of a nested structure."""
    secrets = secret_values()

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return redact_text(x, secrets)
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


# --------------------------------------------------------------------------- ownership


def _read_json_dict(path: Path) -> dict | None:
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
    if MARKER in names and (_read_json_dict(path / MARKER) or {}).get(MARKER_KEY) == 1:
        return "run"
    if MANIFEST in names and is_legacy_manifest(_read_json_dict(path / MANIFEST)):
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
    if "align_output" in (_read_json_dict(path / OUTPUT_MARKER) or {}):
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


# --------------------------------------------------------------------------- run lock


class RunLocked(AlignError):
    """Another process is writing this run dir (exit status 2, naming the holder)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, Linux): tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _holder_alive(holder: dict) -> bool | None:
    """True or False for a holder on this machine; None when it is on another host (cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False  # the machine restarted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = holder.get("pid_start")
    return not (started and _process_start(pid) not in (None, started))


def _describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def live_holder(run_path: Path) -> dict | None:
    """The process writing a run dir now (its lock's holder, alive or on another host), or None."""
    holder = _read_json_dict(Path(run_path) / LOCK)
    if not holder:
        return None
    return holder if _holder_alive(holder) in (True, None) else None


def check_finished(run: "RunDir", allow_unfinished: bool = False, flag: str = "--allow-failed") -> None:
    """Refuse a run that did not finish as the source of a merge, export or combination: a failed run's
    adapter may be partial or non-finite. A run still being written is refused always; with `flag` set, a
    failed, interrupted or abandoned one is used, with a warning."""
    status = run.status
    if status == "finished":
        return
    holder = live_holder(run.path) if status == "running" else None
    if holder is not None:
        raise ConfigError(f"{run.path}: the run is still running ({_describe_holder(holder)}); wait for it to finish")
    m = run.manifest() or {}
    if status == "running":
        state = "the run is still running, or its process died (status: running, no process holds it)"
    else:
        error = " ".join(str(m.get("error") or "").split())
        state = f"the run {status}" + (f" ({error[:150]}{'...' if len(error) > 150 else ''})" if error else "")
    if not allow_unfinished:
        raise ConfigError(f"{run.path}: {state}; its adapter may be partial or non-finite; {flag} uses it anyway")
    log.warning("%s: %s; used anyway (%s)", run.path, state, flag)


class RunLock:
    """Exclusive use of a run dir while a stage writes it (`<run>/.align-lock`).

    The lock is an flock on the lock file (released by the kernel when the process dies) plus the
    holder's pid, host, boot id and start time written inside it, so a second run is refused with
    the holder named, and a lock whose process is gone is recognized and cleared with a message.
    A holder on another host cannot be checked from here: its lock is refused, naming the file to
    delete once that process is known to be gone.
    """

    def __init__(self, path: Path, fd: int, created: bool = False):
        self.path = path
        self._fd = fd
        self._created = created  # this lock created the run dir: remove it again if nothing was written

    @classmethod
    def acquire(cls, run_path: Path, command: str | None = None) -> "RunLock":
        run_path = Path(run_path)
        check_output_dir(run_path)
        created = not run_path.exists()
        try:
            run_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot create {run_path}: {exc.strerror or exc}") from None
        try:
            return cls._acquire(run_path, command, created)
        except BaseException:
            if created:  # a refused run leaves no empty folder behind
                with contextlib.suppress(OSError):
                    run_path.rmdir()
            raise

    @classmethod
    def _acquire(cls, run_path: Path, command: str | None, created: bool) -> "RunLock":
        import fcntl

        lock_path = run_path / LOCK
        for _ in range(20):
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(f"output_dir: cannot write {run_path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd_json(fd)
                os.close(fd)
                raise RunLocked(f"output_dir: {run_path} is in use by another align run ({_describe_holder(holder)}); "
                                "wait for it to end or choose another output_dir") from None
            except OSError:
                pass  # a filesystem without flock: the holder written in the file decides alone
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and removed) the file between our open and flock
                os.close(fd)
                continue
            holder = _read_fd_json(fd)
            if holder:
                alive = _holder_alive(holder)
                if alive is None or alive:
                    os.close(fd)
                    hint = f"; if that process has ended, delete {lock_path}" if alive is None else ""
                    raise RunLocked(f"output_dir: {run_path} is in use by another align run ({_describe_holder(holder)}); "
                                    f"wait for it to end or choose another output_dir{hint}")
                log.warning("output_dir %s: cleared a stale lock of %s (that process is no longer running)",
                            run_path, _describe_holder(holder))
            mine = {
                "pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
                "pid_start": _process_start(os.getpid()), "started_at": now(),
                "command": redact_text(" ".join(sys.argv)) if command is None else redact_text(command),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
            return cls(lock_path, fd, created)
        raise RunLocked(f"output_dir: {run_path}: could not take its lock (other runs keep taking it)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):  # fails, as it should, once the run wrote anything
                self.path.parent.rmdir()


def _read_fd_json(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        loaded = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": None, "host": "unknown (unreadable lock file)"}
    return loaded if isinstance(loaded, dict) else {}


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
        m = _read_json_dict(self.manifest_path)
        if m is None:
            return None
        if m.get(MARKER_KEY) == 1 and (_read_json_dict(self.marker_path) or {}).get(MARKER_KEY) == 1:
            return m
        return m if is_legacy_manifest(m) else None

    def config(self) -> dict:
        """The resolved config the run ran with (config.yaml); {} when missing or unreadable.

        Read as data with the config loader's safe YAML (no tags, no self-referencing or
        exploding aliases): a tampered file is ignored with a warning.
        """
        from align.core.config import _yaml_with_lines

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
