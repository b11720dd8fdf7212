"""`align-data build`: input rows -> format items -> pairs -> cleaning -> split -> outputs.

With `--kind unpaired` the items become labelled responses (KTO rows) instead of pairs, cleaned
response by response and reported with their label balance (data_tools.unpaired).

One pass over the input, in batches; the only state that grows is the compact dedup/cluster
index (see data_tools.dedup) and, for formats whose responses span rows, the shard files on
disk (data_tools.grouping). Everything is written into a temporary folder beside `--output`,
renamed into place only when complete: an interrupted or failed build leaves no output folder
(at most a hidden `.NAME.*.tmp` one).

The split is by prompt: a prompt's normalized text, hashed with the seed, decides its side, so
the same prompt never lands on both sides and the same seed always gives the same split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

from align.core.artifacts import now

from align.core.files import atomic_dir, atomic_write_text

from align.core.redaction import redact
from align.core.normalize import normalize_preference
from align.core.errors import ConfigError, DataError
from data_tools import output
from data_tools.clean import Cleaner, CleanOptions
from data_tools.dedup import NEAR_DUP_METHODS, digest64, shorten
from data_tools.grouping import Spill, shard_count
from align.core.pairing import STRATEGIES, pair_group
from data_tools.readers import input_size, iter_splits
from data_tools.report import Counts, Stats, counts_markdown, kto_balance, stats_markdown, write_plots
from data_tools.sources import make_format
from data_tools.sources.base import Drop, Format, Group, Item, Pair, RowError, SourceOptions
from data_tools.unpaired import check_format, write_unpaired

BATCH = 2048
BUILD_JSON = "build.json"
KINDS = ("pairs", "unpaired")


@dataclass
class BuildConfig:
    format: str
    inputs: list[str]
    output: str
    source_splits: list[str] | None = None
    hub_config: str | None = None
    limit: int | None = None
    skip_invalid: bool = False
    overwrite: bool = False
    source: SourceOptions = field(default_factory=SourceOptions)
    pairing: str = "best-vs-worst"
    min_margin: float = 0.0
    clean: CleanOptions = field(default_factory=CleanOptions)
    test_fraction: float = 0.05
    seed: int = 0
    jsonl: bool = False
    plots: bool = True
    push_to_hub: str | None = None
    private: bool = False
    command: str = ""
    kind: str = "pairs"  # or "unpaired": KTO rows {prompt, completion, label}
    label_threshold: float | None = None  # unpaired: a rated response is desirable when its score >= this

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.label_threshold is not None:
            if self.kind != "unpaired":
                raise ConfigError("--label-threshold: labels responses for --kind unpaired (KTO rows); add --kind unpaired")
            if not math.isfinite(self.label_threshold):
                raise ConfigError(f"--label-threshold: must be a finite number, got {self.label_threshold}")
        if self.pairing not in STRATEGIES:
            raise ConfigError(f"--pairing: {self.pairing!r} is not one of {', '.join(STRATEGIES)}")
        if self.min_margin < 0:
            raise ConfigError(f"--min-margin: must be >= 0, got {self.min_margin:g}")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"--test-fraction: must be in [0, 1), got {self.test_fraction:g}")
        c = self.clean
        if c.near_dup not in NEAR_DUP_METHODS:
            raise ConfigError(f"--near-dup: {c.near_dup!r} is not one of {', '.join(NEAR_DUP_METHODS)}")
        if not 0 < c.near_dup_threshold <= 1:
            raise ConfigError(f"--near-dup-threshold: must be in (0, 1], got {c.near_dup_threshold:g}")
        for name in ("near_dup_ngram", "decontam_ngram", "max_prompt_tokens", "max_response_tokens", "max_total_tokens"):
            value = getattr(c, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit: must be >= 1, got {self.limit}")


@dataclass
class BuildResult:
    output: Path
    counts: Counts
    stats: Stats
    report: str
    seconds: float


def split_of(prompt_key: str, seed: int, test_fraction: float) -> str:
    """'test' for a seeded hash share of prompts, else 'train'."""
    if test_fraction <= 0:
        return "train"
    return "test" if digest64(f"{seed}\x00{prompt_key}") / 2**64 < test_fraction else "train"


def check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--output {out}: exists and is not a folder")
    if any(out.iterdir()):
        # A build is recognized by its build.json carrying align-data's own key, not by the file name alone.
        if "align_data" not in (_json_dict(out / BUILD_JSON) or {}):
            raise DataError(f"--output {out}: a folder with other content (not an align-data build); choose another path")
        if not overwrite:
            raise DataError(f"--output {out}: already holds a build; pass --overwrite to replace it")


def _json_dict(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


# --------------------------------------------------------------------------- the stream


def open_inputs(cfg: BuildConfig) -> Iterator:
    """All input rows, in order; every input is resolved up front so a bad path fails first."""
    opened = [iter_splits(spec, cfg.source_splits, cfg.hub_config) for spec in cfg.inputs]
    return chain.from_iterable(rows for splits in opened for _, rows in splits)


def source_items(fmt: Format, cfg: BuildConfig, counts: Counts, workdir: Path, rows: Iterable) -> Iterator[Item]:
    """Items of every input row; unreadable rows stop the build or, with --skip-invalid, are counted."""
    if cfg.limit:
        rows = islice(rows, cfg.limit)
    rows = _progress(rows)

    def invalid(err: RowError, n: int = 1) -> None:
        if not cfg.skip_invalid:
            raise err
        counts.invalid[err.reason] += n

    if not fmt.grouped:
        for where, row in rows:
            counts.rows_read += 1
            if isinstance(row, RowError):
                invalid(row)
                continue
            try:
                items = list(fmt.items(row, where))
            except RowError as err:
                invalid(err)
                continue
            yield from items
        return
    sizes = [input_size(spec) for spec in cfg.inputs]
    spill = Spill(workdir / ".spill", shard_count(None if None in sizes else sum(sizes)))
    for where, row in rows:
        counts.rows_read += 1
        if isinstance(row, RowError):
            invalid(row)
            continue
        try:
            key, record = fmt.parse(row, where)
        except RowError as err:
            invalid(err)
            continue
        spill.add(key, record)
    for records in spill.groups():
        try:
            items = list(fmt.group_items(records))
        except RowError as err:
            invalid(err, n=len(records))  # the rows of that prompt (or message tree)
            continue
        yield from items


def _progress(rows: Iterable) -> Iterable:
    from align.core.progress import progress

    return progress(rows, "reading", unit="rows")


# --------------------------------------------------------------------------- build


def build(cfg: BuildConfig, items: Iterable[Item] | None = None, provenance: dict | None = None,
          extra_files: dict[str, str] | None = None, counts: Counts | None = None, quiet: bool = False) -> BuildResult:
    """Build a dataset from `cfg.inputs`, or from ready `items` (as `generate` does, passing the
    `counts` of what it read and `extra_files` it fills while the items are consumed)."""
    started = time.time()
    cfg.check()
    out = Path(cfg.output).expanduser()
    check_output(out, cfg.overwrite)
    fmt = make_format(cfg.format, cfg.source) if items is None else None
    unpaired = cfg.kind == "unpaired"
    check_format(fmt, cfg.kind, cfg.label_threshold, cfg.format)
    rows = open_inputs(cfg) if items is None else None
    cleaner = Cleaner(cfg.clean, unpaired=unpaired)  # loads the tokenizer and the evaluation set up front: errors come first
    counts = counts or Counts()
    counts.kind = cfg.kind
    stats = Stats(unit=cleaner.lengths.unit, seed=cfg.seed, unpaired=unpaired)
    stats.near_dup_method = cfg.clean.near_dup
    with atomic_dir(out) as tmp:
        writer = output.SplitWriter(tmp, cfg.jsonl, output.UNPAIRED_SCHEMA if unpaired else output.SCHEMA)
        stream = items if items is not None else source_items(fmt, cfg, counts, tmp, rows)
        write = write_unpaired if unpaired else write_pairs
        distinct, rep_rows, split_names = write(stream, cfg, cleaner, counts, stats, writer, tmp,
                                                lambda key: split_of(key, cfg.seed, cfg.test_fraction))
        counts.dropped = cleaner.dropped
        splits = writer.close()
        stats.prompts_per_split = distinct
        if not splits:
            print("\n".join(counts_markdown(counts)), file=sys.stderr)
            what = "rows" if unpaired else "pairs"
            raise DataError(f"no {what} left to write from {', '.join(cfg.inputs) or 'the input'} (the counts above say where they went)")
        stats.clusters = _top_clusters(cleaner, rep_rows, split_names, tmp)
        report = _write_report_files(tmp, out.name, cfg, counts, stats, splits, distinct, provenance, extra_files)
        check_output(out, cfg.overwrite)  # again: a folder may have appeared there while the build ran
    seconds = time.time() - started
    if cfg.push_to_hub:
        push(out, cfg.push_to_hub, cfg.private)
    if not quiet:
        print(report)
        print(summary_line(out, counts, seconds))
    return BuildResult(out, counts, stats, report, seconds)


def write_pairs(stream, cfg: BuildConfig, cleaner: Cleaner, counts: Counts, stats: Stats, writer, tmp: Path, split_for):
    """Pair the items (groups by cfg.pairing), clean them in batches and write the kept pairs to their splits.
    Returns (distinct prompts per split, each near-duplicate cluster's representative row, the split names)."""
    distinct: dict[str, int] = {}
    rep_rows = array("q")  # cluster id -> (split number << 40) | row index of its representative
    split_names: list[str] = []
    batch: list[Pair] = []

    def flush() -> None:
        for kept in cleaner.process(batch):
            split = split_for(kept.prompt_key)
            p = kept.pair
            row = {
                "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                "score_chosen": p.score_chosen, "score_rejected": p.score_rejected,
                "source": cfg.format, "id": p.id,
            }
            normalize_preference(row, p.where)  # align's own check: every row we write, align loads
            index = writer.write(split, row)
            if kept.new_prompt and kept.cluster >= 0:  # the cluster's representative row
                if split not in split_names:
                    split_names.append(split)
                assert kept.cluster == len(rep_rows)
                rep_rows.append(split_names.index(split) << 40 | index)
            counts.written[split] += 1
            distinct[split] = distinct.get(split, 0) + kept.new_prompt
            stats.add(split, p.prompt, kept.lengths, p.score_chosen, p.score_rejected)
        batch.clear()

    for item in stream:
        if isinstance(item, Drop):
            counts.left_out[item.reason] += item.count
            continue
        pairs = pair_group(item, cfg.pairing, cfg.min_margin, counts.pairing) if isinstance(item, Group) else (item,)
        for pair in pairs:
            counts.pairs_formed += 1
            batch.append(pair)
        if len(batch) >= BATCH:
            flush()
    flush()
    return distinct, rep_rows, split_names


def _write_report_files(tmp: Path, name: str, cfg: BuildConfig, counts: Counts, stats: Stats, splits, distinct: dict,
                        provenance: dict | None, extra_files: dict[str, str] | None) -> str:
    """stats.md, build.json, the plots, the extra files and README.md of a build; returns the report."""
    unpaired = cfg.kind == "unpaired"
    plots = write_plots(stats, tmp / "plots") if cfg.plots else {}
    report_lines = [f"# Build report: {name}", "", *counts_markdown(counts), *stats_markdown(stats, plots)]
    report = "\n".join(report_lines)
    atomic_write_text(tmp / "stats.md", report + "\n")
    meta = redact({
        "align_data": _version(),
        "created": now(),
        "command": cfg.command,
        "format": cfg.format,
        "kind": cfg.kind,
        "inputs": cfg.inputs,
        "options": _options(cfg),
        "length_unit": stats.unit,
        "counts": counts.to_json(),
        "distinct_prompts": distinct,
        **({"kto_balance": kto_balance(counts)} if unpaired else {}),
        **(provenance or {}),
    })
    atomic_write_text(tmp / BUILD_JSON, json.dumps(meta, indent=2, default=str) + "\n")
    for file_name, text in (extra_files or {}).items():
        atomic_write_text(tmp / file_name, text)
    card = output.card(name, {s: counts.written[s] for s in splits}, _provenance_lines(meta), report_lines[2:], cfg.kind)
    atomic_write_text(tmp / "README.md", card)
    return report


def _top_clusters(cleaner: Cleaner, rep_rows: array, split_names: list[str], root: Path):
    """The ten largest near-duplicate clusters, with their representatives' texts."""
    top = cleaner.clusters.top(10)
    wanted: dict[str, list[int]] = {}
    # -1 (or no entry): every row of the cluster was dropped after it formed (unpaired: conflicting labels)
    codes = {c.cid: rep_rows[c.cid] if c.cid < len(rep_rows) else -1 for c in top}
    for cluster in top:
        code = codes[cluster.cid]
        if code >= 0:
            wanted.setdefault(split_names[code >> 40], []).append(code & ((1 << 40) - 1))
    prompts = output.read_prompts_at(root, wanted)
    for cluster in top:
        code = codes[cluster.cid]
        if code < 0:
            continue
        prompt = prompts[(split_names[code >> 40], code & ((1 << 40) - 1))]
        cluster.rep_text = shorten("\n".join(m["content"] for m in prompt))
    return top


def summary_line(out: Path, counts: Counts, seconds: float) -> str:
    written = sum(counts.written.values())
    parts = ", ".join(f"{s} {n}" for s, n in sorted(counts.written.items(), key=lambda x: (x[0] != "train", x[0])))
    dropped = sum(counts.dropped.values())
    invalid = sum(counts.invalid.values())
    if counts.kind == "unpaired":
        b = kto_balance(counts)
        weights = (f"kto.desirable_weight {float(b['desirable_weight'])}, kto.undesirable_weight {float(b['undesirable_weight'])}"
                   if b.get("desirable_weight") is not None else "no KTO weights (one label is missing)")
        return (f"built {out}: {written} unpaired rows ({parts}) from {counts.rows_read} rows; {b['split']}: "
                f"{b['desirable']} desirable, {b['undesirable']} undesirable -> {weights}; "
                f"{counts.responses_formed} responses labelled, {dropped} dropped by cleaning, "
                f"{invalid} invalid rows skipped; {seconds:.1f} s")
    return (f"built {out}: {written} pairs ({parts}) from {counts.rows_read} rows; {counts.pairs_formed} pairs formed, "
            f"{dropped} dropped by cleaning, {invalid} invalid rows skipped; {seconds:.1f} s")


def _version() -> str:
    import align

    return align.__version__


def _options(cfg: BuildConfig) -> dict:
    opts = asdict(cfg)
    opts["source"] = cfg.source.given()
    for key in ("inputs", "output", "command", "format", "overwrite"):
        opts.pop(key)
    return opts


def _provenance_lines(meta: dict) -> list[str]:
    lines = [
        f"- built: {meta['created']} by align-data {meta['align_data']}",
        f"- command: `{meta['command']}`" if meta.get("command") else "- command: (called from Python)",
        f"- format: `{meta['format']}`",
        "- input: " + ", ".join(f"`{i}`" for i in meta["inputs"]),
    ]
    for key in ("model", "adapter", "judge", "sampling", "prompts"):
        if key in meta:
            lines.append(f"- {key}: `{json.dumps(meta[key]) if isinstance(meta[key], dict) else meta[key]}`")
    lines += ["", "Options:", "", "```json", json.dumps(meta["options"], indent=2, default=str), "```"]
    return lines


def push(out: Path, repo: str, private: bool) -> None:
    """Upload the card, Parquet files and report to a hub dataset repo (needs network and a token)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(out), repo_id=repo, repo_type="dataset",
            allow_patterns=["README.md", "data/*.parquet", "stats.md", "plots/*.png", BUILD_JSON],
            commit_message="align-data build",
        )
    except Exception as exc:  # noqa: BLE001 - auth, network and hub errors all mean "not pushed"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--push-to-hub {repo}: the build is in {out}, but pushing failed: {first}") from None
    print(f"pushed {out} to https://huggingface.co/datasets/{repo}")
