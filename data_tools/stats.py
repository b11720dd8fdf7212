"""`align-data stats PATH`: the stats report (markdown, and PNG plots with --output) of any
canonical preference dataset, or of unpaired KTO rows (lengths by label, the label balance and the
KTO weights it calls for). Near-duplicate clusters are reported, not removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from align.core.files import atomic_write_text
from collections import Counter

from align.core.normalize import normalize_preference, normalize_unpaired
from align.core.errors import DataError
from data_tools.clean import Lengths, prompt_digest, prompt_text
from data_tools.dedup import PromptClusters, U64Map, shorten, words
from data_tools.readers import iter_splits
from data_tools.report import Counts, Stats, balance_markdown, stats_markdown, write_plots
from data_tools.sources.base import Labeled, Pair, RowError

BATCH = 2048


def is_unpaired(raw) -> bool:
    """An unpaired (KTO) row: a completion and no chosen/rejected."""
    return isinstance(raw, dict) and "completion" in raw and "chosen" not in raw and "rejected" not in raw


def _canonical(path: str, splits: list[str] | None):
    kind = None  # the first row decides; a dataset holds one kind
    for split, stream in iter_splits(path, splits):
        for where, raw in stream:
            if isinstance(raw, RowError):
                raise DataError(f"{raw} (align-data validate lists every problem)")
            unpaired = is_unpaired(raw)
            if kind is None:
                kind = unpaired
            elif kind != unpaired:
                what = "an unpaired row (completion, label)" if unpaired else "a preference row"
                raise DataError(f"{where}: {what} among rows of the other kind (a dataset holds one kind)")
            row = normalize_unpaired(raw, where)[0] if unpaired else normalize_preference(raw, where)
            yield split, row, raw


def collect(path: str, splits: list[str] | None = None, tokenizer: str | None = None, near_dup: str = "minhash",
            threshold: float = 0.8, ngram: int = 3) -> Stats:
    lengths = Lengths(tokenizer)
    first = next(_canonical(path, splits), None)
    unpaired = first is not None and "completion" in first[1]
    stats = Stats(unit=lengths.unit, unpaired=unpaired)
    stats.labels = {}  # unpaired: split -> desirable / undesirable rows
    stats.near_dup_method = near_dup
    clusters = PromptClusters(method=near_dup, threshold=threshold, ngram=ngram)
    split_of_prompt = U64Map()  # prompt digest -> bitmask of the splits it appears in
    names: list[str] = []
    distinct: dict[str, int] = {}

    def flush(batch):
        if unpaired:
            pairs = [Labeled(r["prompt"], r["completion"], r["label"], "", "") for _, r, _ in batch]
            lens = lengths.responses(pairs)
        else:
            pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], "", "") for _, r, _ in batch]
            lens = lengths.pairs(pairs)
        digests = [prompt_digest(p.prompt) for p in pairs]
        texts = [prompt_text(p.prompt) for p in pairs]
        assigned = clusters.assign(digests, [words(t) for t in texts], texts)
        known = split_of_prompt.bulk_get(np.asarray(digests, dtype=np.uint64))
        for (split, row, raw), p, ln, d, k, (cid, near, _) in zip(batch, pairs, lens, digests, known, assigned):
            if split not in names:
                names.append(split)
            bit = 1 << names.index(split)
            mask = max(split_of_prompt.get(d, int(k)), 0)
            if not mask & bit:
                distinct[split] = distinct.get(split, 0) + 1
                split_of_prompt.put(d, mask | bit)
            if near:
                clusters.count_row(cid)
            if unpaired:
                stats.add_response(split, row["prompt"], ln, row["label"])
                stats.labels.setdefault(split, Counter())["desirable" if row["label"] else "undesirable"] += 1
            else:
                stats.add(split, row["prompt"], ln, _num(raw.get("score_chosen")), _num(raw.get("score_rejected")))
        split_of_prompt.maybe_merge()
        clusters.end_batch()
        batch.clear()

    batch = []
    for item in _canonical(path, splits):
        batch.append(item)
        if len(batch) >= BATCH:
            flush(batch)
    flush(batch)
    if not stats.total:
        raise DataError(f"{path}: no rows")
    stats.prompts_per_split = distinct
    top = clusters.top(10)
    want = {c.rep: c for c in top}
    if want:  # a second pass finds the representatives' texts
        for _, row, _ in _canonical(path, splits):
            cluster = want.get(prompt_digest(row["prompt"]))
            if cluster is not None and not cluster.rep_text:
                cluster.rep_text = shorten(prompt_text(row["prompt"]))
    stats.clusters = top
    return stats


def _num(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stats_command(path: str, splits=None, tokenizer=None, near_dup="minhash", threshold=0.8, ngram=3, output=None) -> str:
    stats = collect(path, splits, tokenizer, near_dup, threshold, ngram)
    plots = {}
    if output:
        out = Path(output)
        plots = write_plots(stats, out / "plots")
    lines = [f"# Stats: {path}", "", f"{stats.total} {stats.noun}.", ""]
    if stats.unpaired:
        lines += balance_markdown(Counts(kind="unpaired", labels=stats.labels))
    lines += stats_markdown(stats, plots)
    text = "\n".join(lines)
    if output:
        atomic_write_text(Path(output) / "stats.md", text + "\n")
    print(text)
    return text
