"""On-disk cache of DPO reference log-probs.

Under the implicit-reference design the reference (the frozen base, adapters disabled) never
changes, so its log-probs for a pair are a pure function of the base weights, the numeric
setting they run in, and the pair's exact tokens. They are computed once, the first time a
pair is seen, and reused by later epochs, later runs, beta or learning-rate sweeps and eval.

Keys:
- the file: the base model's content hash, its quantization, the compute dtype, device type
  and attention kernel (a bf16 CUDA reference differs from an fp32 CPU one, a FlexAttention
  one from an sdpa one in its last bits);
- the row: a digest of the pair as the model sees it (prompt, chosen and rejected token ids
  after truncation, and where each response starts). A change of data, chat template,
  tokenizer or max_length changes the tokens and so misses; unchanged rows still hit.

Each process writes its own file (`<key>.rank<N>.npz`), atomically, at checkpoints, after
evaluation and at the end of training; every file of the key is read at start.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from align.core.files import atomic_write, atomic_write_json, hash_json

log = logging.getLogger("align")

DIGEST_BYTES = 16


def default_dir() -> Path:
    """ALIGN_REF_CACHE_DIR, else ref-logps/ under the model cache root."""
    from align.modeling.models import cache_root

    return Path(os.environ.get("ALIGN_REF_CACHE_DIR") or cache_root() / "ref-logps")


def pair_digests(batch: dict[str, torch.Tensor]) -> list[bytes]:
    """One digest per pair of a collated TRL batch ([chosen rows; rejected rows])."""
    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n_pairs = ids.size(0) // 2
    digests = []
    for i in range(n_pairs):
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for r in (i, n_pairs + i):
            length = int(attn[r].sum())
            h.update(np.asarray(ids[r, :length], dtype=np.int64).tobytes())
            h.update(np.asarray(completion[r, :length], dtype=np.int8).tobytes())
            h.update(b"|")
        digests.append(h.digest())
    return digests


class RefLogpCache:
    """Reference log-probs (chosen, rejected) by pair digest, for one base model and numeric setting."""

    def __init__(self, directory: Path, key: dict, rank: int = 0):
        self.directory = Path(directory)
        self.key = key
        self.name = hash_json(key).split(":", 1)[1][:24]
        self.path = self.directory / f"{self.name}.rank{rank}.npz"
        self.values: dict[bytes, tuple[float, float]] = {}
        self.unsaved = 0
        self.hits = self.misses = 0
        for file in sorted(self.directory.glob(f"{self.name}.rank*.npz")):
            try:
                with np.load(file) as data:
                    digests, logps = data["digests"], data["logps"]
            except (OSError, ValueError, KeyError) as exc:  # a damaged file costs a recompute, never a wrong value
                log.warning("reference cache: ignoring unreadable %s (%s)", file, exc)
                continue
            for digest, (chosen, rejected) in zip(digests, logps):
                self.values[digest.tobytes()] = (float(chosen), float(rejected))

    def lookup(self, digests: list[bytes]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both columns for every pair, or None if any pair is missing (the batch is then recomputed)."""
        try:
            rows = [self.values[d] for d in digests]
        except KeyError:
            self.misses += len(digests)
            return None
        self.hits += len(digests)
        chosen, rejected = zip(*rows)
        return torch.tensor(chosen, dtype=torch.float32), torch.tensor(rejected, dtype=torch.float32)

    def add(self, digests: list[bytes], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        for d, c, r in zip(digests, chosen.tolist(), rejected.tolist()):
            if d not in self.values:
                self.unsaved += 1
            self.values[d] = (c, r)

    def flush(self) -> None:
        """Write this process's file (all known rows) atomically; a no-op when nothing is new."""
        if not self.unsaved:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        digests = np.frombuffer(b"".join(self.values), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        logps = np.asarray(list(self.values.values()), dtype=np.float32).reshape(-1, 2)
        npz = io.BytesIO()
        np.savez(npz, digests=digests, logps=logps)
        atomic_write({self.path: npz.getvalue()})
        atomic_write_json(self.directory / f"{self.name}.json", self.key)  # what the name stands for
        log.info("reference cache: %d pairs in %s", len(self.values), self.path)
        self.unsaved = 0
