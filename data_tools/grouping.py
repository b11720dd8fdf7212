"""Bring together the rows of one prompt (or message tree) wherever they are in the input.

Rows are partitioned by a hash of their group key into shard files on disk, then each shard is
grouped in memory. Memory is bounded by one shard (shards are sized to ~4 MB of input each),
not by the input; groups come out in shard order and, within a shard, in order of first
appearance: the same input always gives the same order.
"""

from __future__ import annotations

import hashlib
import marshal
from pathlib import Path
from typing import Any, Iterator

SHARD_BYTES = 4 << 20
MAX_SHARDS = 512


def shard_count(input_bytes: int | None) -> int:
    if input_bytes is None:
        return 64  # hub streams: size unknown
    return max(1, min(MAX_SHARDS, input_bytes // SHARD_BYTES + 1))


class Spill:
    def __init__(self, folder: Path, shards: int) -> None:
        self.folder, self.shards = folder, shards
        folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[int, Any] = {}

    def add(self, key: str, record: Any) -> None:
        # A 128-bit digest stands for the key (prompt texts can be long); records are plain
        # lists/strings/numbers, so marshal (fast, same-process only) stores them.
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        shard = int.from_bytes(digest[:8], "little") % self.shards
        f = self.files.get(shard)
        if f is None:
            f = self.files[shard] = open(self.folder / f"shard-{shard:04d}.bin", "wb")
        blob = marshal.dumps((digest, record))
        f.write(len(blob).to_bytes(4, "little"))
        f.write(blob)

    def groups(self) -> Iterator[list[Any]]:
        for f in self.files.values():
            f.close()
        for shard in sorted(self.files):
            path = self.folder / f"shard-{shard:04d}.bin"
            grouped: dict[bytes, list[Any]] = {}
            data = memoryview(path.read_bytes())  # one shard: bounded by SHARD_BYTES of input
            pos = 0
            while pos < len(data):
                size = int.from_bytes(data[pos : pos + 4], "little")
                digest, record = marshal.loads(data[pos + 4 : pos + 4 + size])
                grouped.setdefault(digest, []).append(record)
                pos += 4 + size
            path.unlink()
            yield from grouped.values()
        self.files = {}
