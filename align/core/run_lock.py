"""Who is writing a run dir: the lock a running stage holds (`<run>/.align-lock`), and the refusal to read a run
that is still being written or did not finish."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path

from align.core.artifacts import LOCK, RunDir, check_output_dir, now, read_json_dict
from align.core.errors import AlignError, ConfigError
from align.core.redaction import redact_text

log = logging.getLogger("align")


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
    holder = read_json_dict(Path(run_path) / LOCK)
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
