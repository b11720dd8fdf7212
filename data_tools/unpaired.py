"""`align-data build --kind unpaired`: KTO rows `{prompt, completion, label}` instead of pairs.

Where the labels come from, by what the format yields:
* ratings (`ultrafeedback`, `helpsteer`, `ratings`, `generate`'s judge scores) with
  `--label-threshold T`: every rated response is a row, desirable when its score >= T (the
  format's score, on its own scale: UltraFeedback's 1-5 fine-grained mean, HelpSteer's weighted
  0-4 ratings, ...); pairs that carry both scores (`trl`, `pairs` with score columns, `shp`) are
  labelled response by response the same way;
* thumbs rows (`--format thumbs`): the label as given;
* pairs (any pair format, or ranked / rated groups paired by `--pairing`): chosen desirable,
  rejected undesirable; a response several pairs share is kept once, one chosen in a pair and
  rejected in another is dropped (every copy), both counted; align's `merge_unpaired` applies
  the same rule when KTO reads pairs directly.

Cleaning is the pair builder's, applied to each response (data_tools.clean.UNPAIRED_REASONS).
Whether a response is labelled both ways is known only at the end of the input, so kept rows
are spilled to a file in the build's temporary folder and written in a second pass that leaves
out the conflicting ones; memory holds only the 64-bit digests of the responses.
"""

from __future__ import annotations

import marshal
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from align.core.normalize import normalize_unpaired
from align.core.errors import ConfigError
from align.core.pairing import pair_group
from align.core.rows import same_response
from data_tools.clean import Cleaner, KeptResponse
from data_tools.dedup import U64Map
from data_tools.output import SplitWriter
from data_tools.report import Counts, Stats
from data_tools.sources.base import Drop, Format, Group, Item, Labeled, Pair, RowError

BATCH = 2048
SPILL = ".unpaired-rows.bin"


def check_format(fmt: Format | None, kind: str, threshold: float | None, name: str) -> None:
    """Option combinations that cannot work, refused before any row is read."""
    yields = fmt.yields if fmt is not None else "scores"  # generate: judge scores
    if kind == "pairs":
        if yields == "labels":
            raise ConfigError(f"--format {name}: thumbs rows are single labelled responses, not pairs; "
                              "build KTO rows from them with --kind unpaired")
        return
    if threshold is not None and yields == "ranks":
        raise ConfigError(f"--label-threshold: --format {name} ranks responses without scores to compare with it; "
                          "leave it out to label the pairs --pairing forms (chosen desirable, rejected undesirable)")
    if threshold is not None and yields == "labels":
        raise ConfigError(f"--label-threshold: --format {name} rows carry their own labels")


def labelled(item: Pair | Group | Labeled, threshold: float | None, pairing: str, min_margin: float,
             counts: Counts, dropped: Counter) -> list[Labeled]:
    """The labelled responses of one item (see the module docstring); counts what pairing and the
    identical-pair rule leave out."""
    if isinstance(item, Labeled):
        return [item]
    if isinstance(item, Group):
        if threshold is not None:
            if not item.scored:  # check_format refuses ranked formats; this guards other producers
                raise ConfigError(f"--label-threshold: {item.where}: responses ranked without scores")
            return [Labeled(item.prompt, c.messages, c.score >= threshold, f"{item.id}:{c.id}", c.where, c.score)
                    for c in item.candidates]
        pairs: Iterable[Pair] = list(pair_group(item, pairing, min_margin, counts.pairing))
    else:
        pairs = (item,)
    out = []
    for p in pairs:
        counts.pairs_formed += 1
        if threshold is not None:
            for field, score in (("score_chosen", p.score_chosen), ("score_rejected", p.score_rejected)):
                if score is None:
                    raise RowError(p.where, field, f"field '{field}' missing: --label-threshold labels each response by "
                                   "its score (leave it out to label pairs by side: chosen desirable, rejected undesirable)",
                                   "missing_field")
            labels = (p.score_chosen >= threshold, p.score_rejected >= threshold)
        else:
            labels = (True, False)
        if same_response(p.chosen, p.rejected):  # no preference in it; both its rows would conflict
            counts.responses_formed += 2
            dropped["identical"] += 2
            continue
        out.append(Labeled(p.prompt, p.chosen, labels[0], f"{p.id}:chosen", p.where, p.score_chosen))
        out.append(Labeled(p.prompt, p.rejected, labels[1], f"{p.id}:rejected", p.where, p.score_rejected))
    return out


class _Spill:
    """Kept rows, in order, on disk until the conflicts are known."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")

    def add(self, split: str, k: KeptResponse) -> None:
        r = k.row
        marshal.dump((split, r.prompt, r.completion, r.label, r.score, r.id, r.where, k.lengths, k.key,
                      k.prompt_digest, k.cluster), self.file)

    def read(self) -> Iterator[tuple]:
        self.file.close()
        with open(self.path, "rb") as f:
            while True:
                try:
                    yield marshal.load(f)
                except EOFError:
                    break
        self.path.unlink()


def write_unpaired(stream: Iterable[Item], cfg, cleaner: Cleaner, counts: Counts, stats: Stats, writer: SplitWriter,
                   workdir: Path, split_of) -> tuple[dict[str, int], array, list[str]]:
    """Label, clean, split and write every response of `stream`; returns the distinct prompts per
    split and each near-duplicate cluster's representative row (as build's pair loop does)."""
    spill = _Spill(workdir / SPILL)
    batch: list[Labeled] = []

    def flush() -> None:
        for kept in cleaner.process_unpaired(batch):
            spill.add(split_of(kept.prompt_key), kept)
        batch.clear()

    for item in stream:
        if isinstance(item, Drop):
            counts.left_out[item.reason] += item.count
            continue
        try:
            rows = labelled(item, cfg.label_threshold, cfg.pairing, cfg.min_margin, counts, cleaner.dropped)
        except RowError as err:
            if not cfg.skip_invalid:
                raise
            counts.invalid[err.reason] += 1
            continue
        counts.responses_formed += len(rows)
        batch.extend(rows)
        if len(batch) >= BATCH:
            flush()
    flush()

    distinct: dict[str, int] = {}
    rep_rows = array("q")  # cluster id -> (split number << 40) | row index of its first written row, -1 if none
    split_names: list[str] = []
    prompts_written = U64Map()
    records = spill.read()
    while True:
        chunk = [rec for _, rec in zip(range(BATCH), records)]
        if not chunk:
            break
        for rec, keep in zip(chunk, cleaner.settle([rec[8] for rec in chunk])):
            split, prompt, completion, label, score, rid, where, lengths, _, pdigest, cluster = rec
            if not keep:
                continue
            row = {"prompt": prompt, "completion": completion, "label": label, "score": score,
                   "source": cfg.format, "id": rid}
            normalize_unpaired(row, where)  # align's own check: every row we write, align loads
            index = writer.write(split, row)
            if split not in split_names:
                split_names.append(split)
            if cluster >= 0:
                while len(rep_rows) <= cluster:
                    rep_rows.append(-1)
                if rep_rows[cluster] < 0:
                    rep_rows[cluster] = split_names.index(split) << 40 | index
            if prompts_written.recent.get(pdigest, int(prompts_written.bulk_get(_u64(pdigest))[0])) < 0:
                prompts_written.put(pdigest, 1)
                distinct[split] = distinct.get(split, 0) + 1
            counts.written[split] += 1
            counts.labels.setdefault(split, Counter())["desirable" if label else "undesirable"] += 1
            stats.add_response(split, prompt, tuple(lengths), label)
        prompts_written.maybe_merge()
    return distinct, rep_rows, split_names


def _u64(value: int):
    import numpy as np

    return np.array([value], dtype=np.uint64)
