"""Read an offline W&B run file (`run-*.wandb`) to check what a stage reported.

The file is a LevelDB-style log of protobuf `Record`s: a 7-byte header (":W&B",
magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: full/first/middle/last). wandb >= 0.20 no longer ships a
Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(blob: bytes):
    ident, _magic, _version = struct.unpack("<4sHB", blob[:_HEADER])
    assert ident == b":W&B", "not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(blob):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", blob[pos : pos + _HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        if pos + _HEADER + length > len(blob):
            return  # a chunk still being written
        data = blob[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            pending = data
        elif kind == _MIDDLE:
            pending += data
        elif kind == _LAST:
            yield pending + data
            pending = b""


@dataclass
class OfflineRun:
    project: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    config_keys: set[str] = field(default_factory=set)
    history_keys: set[str] = field(default_factory=set)
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (name, type)


def read_offline_run(run_folder: Path, timeout: float = 60.0) -> OfflineRun:
    """The run's records, once its file holds the exit record.

    `run.finish()` can return while wandb-core (a separate process) is still writing the run
    file, so a reader right after it may see a prefix; the exit record is written last.
    """
    (path,) = Path(run_folder).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = _parse(path.read_bytes())
        if any(kind == "exit" for kind, _ in records):
            break
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout:.0f} s (the run did not finish)"
        time.sleep(0.2)
    out = OfflineRun()
    for kind, rec in records:
        if kind == "run":
            out.project, out.group, out.job_type = rec.run.project, rec.run.run_group, rec.run.job_type
            out.name = rec.run.display_name
            out.config_keys |= {item.key for item in rec.run.config.update}
        elif kind == "config":
            out.config_keys |= {item.key for item in rec.config.update}
        elif kind == "history":
            out.history_keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif kind == "artifact":
            out.artifacts.append((rec.artifact.name, rec.artifact.type))
    return out


def _parse(blob: bytes) -> list[tuple[str, object]]:
    """(record type, record) for every complete record of a run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for data in _records(blob):
        rec = pb.Record()
        rec.ParseFromString(data)
        out.append((rec.WhichOneof("record_type"), rec))
    return out
