"""Exact and near-duplicate detection that stays compact on millions of rows.

Memory grows with the number of distinct pairs and distinct prompts, never with their text:
a pair costs one 8-byte hash; a distinct prompt costs 12 bytes (its digest and cluster) plus 8
(the cluster's representative) and, for MinHash, `bands` x 12 bytes of LSH keys (12 bands at
the default threshold 0.8) and a 128-byte signature: about 300 bytes per distinct prompt. Keys live
in sorted numpy arrays looked up in bulk; recent inserts wait in a small dict until merged in.

Near-duplicate prompts (`--near-dup`):
* normalized: the same text after lowercasing, dropping punctuation and collapsing spaces;
* minhash:    MinHash signatures (64 permutations) of word n-gram shingles; LSH banding finds
              candidates (tuned for recall), then the Jaccard similarity estimated from the two
              signatures must reach the threshold (seeded: the same input gives the same result);
* ngram:      the same candidates, then the exact n-gram Jaccard similarity must reach the
              threshold (keeps every kept prompt's shingle hashes: for small and medium sets).
The first prompt of a cluster is its representative; a later, different prompt that lands in
the cluster is a near duplicate.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np

_WORD = re.compile(r"\w+")
NEAR_DUP_METHODS = ("minhash", "ngram", "normalized", "off")


def digest64(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    return " ".join(words(text))


class U64Map:
    """A uint64 -> uint32 map: sorted numpy arrays plus a dict of recent inserts."""

    def __init__(self, merge_at: int = 65536) -> None:
        self.keys = np.empty(0, dtype=np.uint64)
        self.vals = np.empty(0, dtype=np.uint32)
        self.recent: dict[int, int] = {}
        self.merge_at = merge_at

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)

    def bulk_get(self, keys: np.ndarray) -> np.ndarray:
        """Values of `keys` in the merged arrays (int64, -1 if absent); check `recent` too."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(self.keys) and len(keys):
            pos = np.searchsorted(self.keys, keys)
            pos = np.minimum(pos, len(self.keys) - 1)
            hit = self.keys[pos] == keys
            out[hit] = self.vals[pos[hit]]
        return out

    def get(self, key: int, bulk_value: int = -1) -> int:
        if bulk_value >= 0:
            return bulk_value
        return self.recent.get(key, -1)

    def put(self, key: int, value: int) -> None:
        self.recent[key] = value

    def maybe_merge(self) -> None:
        """Fold recent inserts into the sorted arrays (call between batches)."""
        # A fixed bound: a dict entry costs ~8x an array slot, so the dict stays small.
        if len(self.recent) < self.merge_at:
            return
        self.merge()

    def merge(self) -> None:
        if not self.recent:
            return
        new_k = np.fromiter(self.recent.keys(), dtype=np.uint64, count=len(self.recent))
        new_v = np.fromiter(self.recent.values(), dtype=np.uint32, count=len(self.recent))
        order = np.argsort(new_k, kind="stable")
        new_k, new_v = new_k[order], new_v[order]
        pos = np.searchsorted(self.keys, new_k)
        self.keys = np.insert(self.keys, pos, new_k)
        self.vals = np.insert(self.vals, pos, new_v)
        self.recent = {}

    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes + len(self.recent) * 100


# --------------------------------------------------------------------------- MinHash + LSH


def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimizing the weighted false positive and false
    negative areas around `threshold` of the collision curve 1 - (1 - s^rows)^bands. Candidates
    are verified afterwards, so missing a near duplicate costs more than a spurious candidate."""
    best, best_err = (1, num_perm), float("inf")
    xs = np.linspace(0.0, 1.0, 401)
    below = xs < threshold
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - xs**rows) ** bands
            err = fp_weight * np.trapezoid(np.where(below, p, 0.0), xs) + fn_weight * np.trapezoid(np.where(below, 0.0, 1.0 - p), xs)
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


class MinHasher:
    """MinHash signatures of word n-gram shingles, computed for many texts at once.

    A shingle hashes n consecutive word hashes (crc32: stable across processes); texts shorter
    than n words are padded, so each text has at least one shingle. The min over a multiset
    equals the min over its set, so repeated shingles need no removal."""

    def __init__(self, num_perm: int = 64, ngram: int = 3, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.mix = rng.integers(1, 2**63, size=ngram, dtype=np.uint64) | np.uint64(1)
        self.num_perm, self.ngram = num_perm, ngram

    def shingles(self, word_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(flat shingle hashes of all texts in order, shingles per text)."""
        n = self.ngram
        hashes: list[int] = []
        lengths = np.empty(len(word_lists), dtype=np.int64)
        for t, toks in enumerate(word_lists):
            hashes.extend(zlib.crc32(w.encode()) for w in toks)
            if len(toks) < n:
                hashes.extend([0] * (n - len(toks)))
            lengths[t] = max(len(toks), n)
        w = np.asarray(hashes + [0] * (n - 1), dtype=np.uint64)
        total = len(hashes)
        with np.errstate(over="ignore"):
            windows = sum((w[k : k + total] * self.mix[k] for k in range(n)), np.zeros(total, dtype=np.uint64))
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(total) - np.repeat(starts, lengths)
        valid = pos <= np.repeat(lengths - n, lengths)
        return windows[valid], lengths - n + 1

    def signatures(self, flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(texts, num_perm) uint32 signatures (multiply-shift hashing), in bounded chunks."""
        out = np.empty((len(counts), self.num_perm), dtype=np.uint32)
        ends = np.cumsum(counts)
        budget = 1 << 13  # shingles per numpy call: bounds the (num_perm x shingles) temporaries (4 MiB each)
        t = 0
        while t < len(counts):
            base = ends[t] - counts[t]
            stop = max(t + 1, int(np.searchsorted(ends, base + budget, side="right")))
            chunk = flat[base : ends[stop - 1]]
            offsets = (ends[t:stop] - counts[t:stop]) - base
            with np.errstate(over="ignore"):
                hashed = (self.a[:, None] * chunk[None, :] + self.b[:, None]) >> np.uint64(32)
            out[t:stop] = np.minimum.reduceat(hashed, offsets, axis=1).T.astype(np.uint32)
            t = stop
        return out


@dataclass
class Cluster:
    cid: int
    rep: int  # digest of the representative prompt
    members: int = 0  # near duplicates that landed here (distinct prompts)
    rows: int = 0  # rows (pairs) with those prompts
    example: str = ""  # one member's prompt text, shortened
    rep_text: str = ""  # the representative's text, shortened (filled in by whoever saw it)


@dataclass
class PromptClusters:
    """Assigns each distinct prompt to a cluster; new prompts near an existing cluster join it.

    `assign(batch)` is called with the digests and texts of a batch of prompts (in input order)
    and returns, per prompt, (cluster id, is_near_duplicate, is_new). A prompt seen before gets
    its earlier answer. Ids are dense ints; `rep_digest[cid]` is the representative's digest.
    """

    method: str = "minhash"
    threshold: float = 0.8
    ngram: int = 3
    num_perm: int = 64
    seed: int = 1
    prompts: U64Map = field(default_factory=U64Map)  # prompt digest -> cluster id * 2 + near-dup flag
    bands_index: U64Map = field(default_factory=U64Map)  # LSH band key (or normalized digest) -> cluster id
    rep_digest: array = field(default_factory=lambda: array("Q"))  # 8 bytes per cluster
    clusters: dict[int, Cluster] = field(default_factory=dict)  # only clusters that gained members
    rep_shingles: dict[int, np.ndarray] = field(default_factory=dict)  # ngram method: representatives' shingles

    def __post_init__(self) -> None:
        if self.method not in NEAR_DUP_METHODS:
            raise ValueError(f"near-dup method {self.method!r} is not one of {NEAR_DUP_METHODS}")
        # minhash: representatives' signatures, truncated to 16 bits (a chance match per slot is 1/65536)
        self.sigs = np.empty((0, self.num_perm), dtype=np.uint16)
        if self.method in ("minhash", "ngram"):
            # Candidates come from a looser threshold, so pairs at or just above it are found.
            self.bands, self.rows = lsh_bands(max(0.05, self.threshold - 0.1), self.num_perm)
            self.hasher = MinHasher(self.num_perm, self.ngram, self.seed)
            rng = np.random.default_rng(self.seed + 1)
            self.band_mix = rng.integers(1, 2**63, size=(self.bands, self.rows), dtype=np.uint64) | np.uint64(1)
            self.band_salt = rng.integers(0, 2**63, size=self.bands, dtype=np.uint64)

    def _keys(self, word_lists: list[list[str]]) -> tuple[np.ndarray, list]:
        """Per text: its index keys (LSH band keys, or the normalized digest) and what verifies
        a candidate (the 16-bit signature for minhash, the shingle set for ngram)."""
        if self.method == "normalized":
            keys = np.array([digest64(" ".join(ws)) for ws in word_lists], dtype=np.uint64)
            return keys.reshape(len(word_lists), 1), [None] * len(word_lists)
        flat, counts = self.hasher.shingles(word_lists)
        sig32 = self.hasher.signatures(flat, counts)
        sig = sig32[:, : self.bands * self.rows].astype(np.uint64).reshape(len(word_lists), self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (sig * self.band_mix[None]).sum(axis=2, dtype=np.uint64) + self.band_salt[None]
        if self.method == "ngram":
            ends = np.cumsum(counts)
            return keys, [np.unique(flat[e - c : e]) for e, c in zip(ends, counts)]
        return keys, list((sig32 & 0xFFFF).astype(np.uint16))

    def _similar(self, check, cid: int) -> bool:
        """Verify a candidate cluster: estimated (minhash) or exact (ngram) Jaccard >= threshold."""
        if self.method == "normalized":
            return True
        if self.method == "minhash":
            return float(np.mean(self.sigs[cid] == check)) >= self.threshold
        rep = self.rep_shingles[cid]
        inter = len(np.intersect1d(rep, check, assume_unique=True))
        return inter / (len(rep) + len(check) - inter) >= self.threshold

    def _store_sig(self, cid: int, sig: np.ndarray) -> None:
        if cid >= len(self.sigs):
            grown = np.empty((max(1024, 2 * len(self.sigs)), self.num_perm), dtype=np.uint16)
            grown[: len(self.sigs)] = self.sigs
            self.sigs = grown
        self.sigs[cid] = sig

    def assign(self, digests: list[int], word_lists: list[list[str]], texts: list[str]) -> list[tuple[int, bool, bool]]:
        """Per prompt (its digest, its words, its text): (cluster id, is a near duplicate,
        first time this prompt is seen)."""
        if self.method == "off":  # still track distinct prompts, for the counts
            known = self.prompts.bulk_get(np.asarray(digests, dtype=np.uint64))
            out = []
            for i, d in enumerate(digests):
                new = self.prompts.get(d, int(known[i])) < 0
                if new:
                    self.prompts.put(d, 0)
                out.append((-1, False, new))
            return out
        known = self.prompts.bulk_get(np.asarray(digests, dtype=np.uint64))
        fresh, seen = [], set()  # first occurrence of each prompt not seen before this batch
        for i, d in enumerate(digests):
            if known[i] < 0 and d not in self.prompts.recent and d not in seen:
                seen.add(d)
                fresh.append(i)
        keys, shingles = self._keys([word_lists[i] for i in fresh]) if fresh else (np.empty((0, 1), np.uint64), [])
        band_hits = self.bands_index.bulk_get(keys.reshape(-1)).reshape(keys.shape) if fresh else keys
        slot = {i: k for k, i in enumerate(fresh)}
        out = []
        for i, d in enumerate(digests):
            code = self.prompts.get(d, int(known[i]))
            if code >= 0:
                out.append((code >> 1, bool(code & 1), False))
                continue
            k = slot[i]
            row_keys = keys[k].tolist()
            cid, tried = -1, set()
            for b, key in enumerate(row_keys):
                hit = self.bands_index.get(key, int(band_hits[k, b]))
                if hit >= 0 and hit not in tried:
                    tried.add(hit)
                    if self._similar(shingles[k], hit):
                        cid = hit
                        break
            if cid >= 0:
                self.prompts.put(d, cid * 2 + 1)
                cluster = self.clusters.setdefault(cid, Cluster(cid, self.rep_digest[cid]))
                cluster.members += 1
                if not cluster.example:
                    cluster.example = shorten(texts[i])
                out.append((cid, True, True))
                continue
            cid = len(self.rep_digest)
            self.rep_digest.append(d)
            for b, key in enumerate(row_keys):
                if band_hits[k, b] < 0 and key not in self.bands_index.recent:
                    self.bands_index.put(key, cid)
            if self.method == "ngram":
                self.rep_shingles[cid] = shingles[k]
            elif self.method == "minhash":
                self._store_sig(cid, shingles[k])
            self.prompts.put(d, cid * 2)
            out.append((cid, False, True))
        return out

    def count_row(self, cid: int) -> None:
        if cid in self.clusters:
            self.clusters[cid].rows += 1

    def end_batch(self) -> None:
        self.prompts.maybe_merge()
        self.bands_index.maybe_merge()

    def top(self, n: int = 10) -> list[Cluster]:
        return sorted(self.clusters.values(), key=lambda c: (-c.members, -c.rows))[:n]

    def nbytes(self) -> int:
        return self.prompts.nbytes() + self.bands_index.nbytes() + 8 * len(self.rep_digest) + self.sigs.nbytes


def shorten(text: str, n: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"
