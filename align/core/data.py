"""Datasets: load from bundled / local / hub sources, validate, normalize, split.

Canonical rows are TRL's conversational formats:
  SFT         {"messages": [{"role": ..., "content": ...}, ...]}
  preference  {"prompt": [...], "chosen": [...], "rejected": [...]}
  unpaired    {"prompt": [...], "completion": [...], "label": true|false}   (KTO's thumbs up/down)
Also accepted and normalized: SFT `prompt`+`completion` and Alpaca `instruction`/
`input`/`output` rows; preference rows in plain text, and rows without `prompt`
whose chosen/rejected conversations share a prefix (the implicit prompt). Unpaired
rows also come from preference pairs (chosen desirable, rejected undesirable) and from
scores with a threshold (`normalize_unpaired`).

Any malformed row stops loading with an error naming the file and line (or the
split and row) and the field. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.files import hash_json
from align.core.config import DataConfig
from align.core.errors import DataError
from align.core.normalize import merge_unpaired, normalize_preference, normalize_prompt, normalize_sft, normalize_unpaired
from align.core.readers import FILE_SUFFIXES, FILE_TYPES, RowError, file_stem, file_suffix, read_file, typed_csv_columns, unsupported_type
from align.core.rows import REASONS, pair_serial, preference_problems, serial, unpaired_problems

BUNDLED_DIR = Path(__file__).parents[1] / "bundled"


@dataclass
class Splits:
    """Normalized train and held-out rows, with where they came from."""

    source: str
    train: list[dict]
    eval: list[dict]
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> reason -> rows left out
    # Where each row came from (file:line or split and row), for errors about one row; empty where rows
    # were regrouped (unpaired rows are merged across the input rows they came from).
    train_where: list[str] = field(default_factory=list)
    eval_where: list[str] = field(default_factory=list)

    def where(self, split: str, index: int) -> str:
        """file:line (or split and row) of row `index` of split "train" or "eval"; the source when unknown."""
        wheres = self.train_where if split == "train" else self.eval_where
        return wheres[index] if index < len(wheres) else f"data.path '{self.source}' ({split} row {index})"

    def info(self) -> dict:
        out = {
            "path": self.source,
            "hash": hash_json({"train": self.train, "eval": self.eval}),
            "rows": {"train": len(self.train), "eval": len(self.eval)},
            "notes": self.notes,
        }
        if self.dropped:
            out["dropped"] = self.dropped
        return out


# --------------------------------------------------------------------------- reading sources


Row = tuple[str, Any]  # (where, raw row) - `where` names file:line or split+row for errors


def _read_file(path: Path) -> list[Row]:
    """Every row of a data file (align/core/readers.py, the reader align-data uses too); the first unreadable
    row stops loading. CSV columns are typed as `datasets` reads them (numbers, true/false)."""
    rows = []
    try:
        for where, row in read_file(path):
            if isinstance(row, RowError):
                raise row
            rows.append((where, row))
    except (OSError, EOFError) as exc:  # a damaged .gz (BadGzipFile is an OSError) or an unreadable file
        raise DataError(f"{path}: cannot read: {type(exc).__name__}: {exc}") from None
    return typed_csv_columns(rows) if file_suffix(path).startswith(".csv") else rows


def _read_dataset_dict(ds_dict: Any, label: str) -> dict[str, list[Row]]:
    return {
        split: [(f"{label}[{split}] row {i}", row) for i, row in enumerate(ds)] for split, ds in ds_dict.items()
    }


def read_splits(spec: str) -> dict[str, list[Row]]:
    """Every split of a data source as (where, raw row) pairs."""
    if spec.startswith("bundled:"):
        name = spec[len("bundled:"):]
        folder = BUNDLED_DIR / name.replace("-", "_")
        if not folder.is_dir():
            available = sorted(p.name.replace("_", "-") for p in BUNDLED_DIR.iterdir() if p.is_dir())
            raise DataError(f"data.path '{spec}': no bundled dataset '{name}' (available: {', '.join(available)})")
        return _read_folder(folder)
    path = Path(spec).expanduser()
    if path.is_file():
        if not file_suffix(path):
            raise unsupported_type(path)
        return {"train": _read_file(path)}
    if path.is_dir():
        return _read_folder(path)
    if spec.startswith(("/", ".", "~")) or file_suffix(Path(spec)) or spec.count("/") > 1:
        raise DataError(f"data.path '{spec}': file not found")
    return _read_hub(spec)


def _read_folder(folder: Path) -> dict[str, list[Row]]:
    if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        import datasets

        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.Dataset):
            loaded = {"train": loaded}
        return _read_dataset_dict(loaded, str(folder))
    splits: dict[str, list[Row]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and file_suffix(path):
            if file_stem(path) in splits:
                raise DataError(f"{folder}: two files for split '{file_stem(path)}'")
            splits[file_stem(path)] = _read_file(path)
    if not splits:
        raise DataError(f"{folder}: no split files (<split>{'|'.join(FILE_SUFFIXES)}) and no saved dataset ({FILE_TYPES})")
    return splits


def _read_hub(spec: str) -> dict[str, list[Row]]:
    import datasets

    try:
        loaded = datasets.load_dataset(spec)
    except Exception as exc:  # noqa: BLE001 - network, auth and format errors all mean "cannot load"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"data.path '{spec}': not a local file or directory, and the hub could not provide it: {first}") from None
    return _read_dataset_dict(loaded, f"hub:{spec}")


# --------------------------------------------------------------------------- splits


class _RowChecks:
    """align-data validate's row checks on the rows a recipe loads (align.core.rows: the same code);
    rejected rows are left out and counted by reason.

    Preference rows: preference_problems, plus exact duplicates across both splits. Unpaired rows
    (KTO): unpaired_problems on each response an input row gives (duplicates and conflicting labels
    are merge_unpaired's business, counted there).
    """

    def __init__(self, kind: str, normalize):
        self.kind, self.normalize = kind, normalize
        self.seen: set[str] = set()
        self.dropped: dict[str, dict[str, int]] = {}
        self.formed: dict[str, int] = {}

    def __call__(self, rows: list[Row], split: str) -> list[tuple[str, list[dict]]]:
        """The split's kept rows, grouped by the input row they came from (with its where)."""
        groups: list[tuple[str, list[dict]]] = []
        counts: dict[str, int] = {}
        formed = 0
        for where, raw in rows:
            kept = []
            for row in self.normalize(raw, where):
                formed += 1
                reason = self._problem(row, raw)
                if reason is None:
                    kept.append(row)
                else:
                    counts[reason] = counts.get(reason, 0) + 1
            if kept:
                groups.append((where, kept))
        self.formed[split] = formed
        if counts:
            self.dropped[split] = counts
        return groups

    def _problem(self, row: dict, raw: Any) -> str | None:
        if self.kind == "unpaired":
            problems = unpaired_problems(row)
            return problems[0][0] if problems else None
        problems = preference_problems(row, raw)
        if problems:
            return problems[0][0]
        key = pair_serial(row["prompt"], row["chosen"], row["rejected"])
        if key in self.seen:
            return "exact_duplicate"
        self.seen.add(key)
        return None

    def note(self, split: str) -> str | None:
        counts = self.dropped.get(split)
        if not counts:
            return None
        what = "responses" if self.kind == "unpaired" else "rows"
        reasons = ", ".join(f"{REASONS[r]}: {n}" for r, n in counts.items())
        return f"{split}: left out {sum(counts.values())} of {self.formed[split]} {what} that align-data validate rejects ({reasons})"


KINDS = ("sft", "preference", "prompt", "unpaired")


def load_splits(cfg: DataConfig, kind: str, seed: int, *, score_threshold: float | None = None) -> Splits:
    """Read, validate and split a dataset; kind is one of KINDS.

    Preference and unpaired rows that `align-data validate` rejects (turn order, empty turns, chosen
    identical to rejected, bad scores, exact duplicates) are left out and counted by reason in the notes.
    `score_threshold` (unpaired only): label responses by score (see normalize_unpaired). An input
    row that becomes several rows (a pair's two responses) stays on one side of a split.
    """
    if kind == "unpaired":
        def normalize(row, where):
            return normalize_unpaired(row, where, score_threshold)
    else:
        single = {"sft": normalize_sft, "preference": normalize_preference, "prompt": normalize_prompt}[kind]

        def normalize(row, where):
            return [single(row, where)]
    raw = read_splits(cfg.path)
    if cfg.train_split not in raw:
        raise DataError(f"data.path '{cfg.path}': no split '{cfg.train_split}' (available: {', '.join(sorted(raw))})")
    notes: list[str] = []
    checks = _RowChecks(kind, normalize) if kind in ("preference", "unpaired") else None

    def load(split: str) -> list[tuple[str, list[dict]]]:
        """The split's rows, grouped by the input row they came from, each group with that row's where."""
        if checks is not None:
            return checks(raw[split], split)
        return [(where, normalize(row, where)) for where, row in raw[split]]

    train = load(cfg.train_split)
    if checks is not None and (note := checks.note(cfg.train_split)):
        notes.append(note)
    if cfg.eval_split and cfg.eval_split in raw:
        held_out = load(cfg.eval_split)
        if checks is not None and (note := checks.note(cfg.eval_split)):
            notes.append(note)
        if kind == "preference":
            train_prompts = {serial(g[0]["prompt"]) for _, g in train}
            shared = sum(serial(g[0]["prompt"]) in train_prompts for _, g in held_out)
            if shared:
                notes.append(f"{cfg.eval_split}: {shared} held-out rows share their prompt with a training row "
                             "(align-data validate flags these; kept)")
    elif cfg.eval_fraction > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(round(len(train) * cfg.eval_fraction)))
        picked = set(order[:n_eval])
        held_out = [r for i, r in enumerate(train) if i in picked]
        train = [r for i, r in enumerate(train) if i not in picked]
        missing = f"no '{cfg.eval_split}' split" if cfg.eval_split else "eval_split is null"
        notes.append(f"{missing}: held out {len(held_out)} of the training rows ({cfg.eval_fraction:.0%}, seed {seed})")
    else:
        held_out = []
        notes.append("no held-out data: evaluation is skipped")
    if kind == "unpaired":
        (train, train_notes), (held_out, eval_notes) = merge_unpaired([g for _, g in train]), merge_unpaired([g for _, g in held_out])
        notes += [f"train: {n}" for n in train_notes] + [f"held-out: {n}" for n in eval_notes]
        good = sum(r["label"] for r in train)
        notes.append(f"training rows: {good} desirable, {len(train) - good} undesirable")
        train_where, eval_where = [], []
    else:
        train_where, eval_where = [w for w, g in train for _ in g], [w for w, g in held_out for _ in g]
        train, held_out = [r for _, g in train for r in g], [r for _, g in held_out for r in g]
    if not train:
        left_out = sum((checks.dropped.get(cfg.train_split) or {}).values()) if checks is not None else 0
        why = f" left after leaving out {left_out} that align-data validate rejects" if left_out else ""
        raise DataError(f"data.path '{cfg.path}': split '{cfg.train_split}' has no rows{why}")
    if kind == "sft":
        preference = sum(_is_preference_row(row) for _, row in raw[cfg.train_split])
        if preference:
            notes.append(f"SFT on the chosen answers of {preference} preference rows (their rejected answers are not used)")
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        notes.append(f"using the first {cfg.max_train_samples} of {len(train)} training rows (max_train_samples)")
        train, train_where = train[: cfg.max_train_samples], train_where[: cfg.max_train_samples]
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(held_out):
        notes.append(f"using the first {cfg.max_eval_samples} of {len(held_out)} held-out rows (max_eval_samples)")
        held_out, eval_where = held_out[: cfg.max_eval_samples], eval_where[: cfg.max_eval_samples]
    return Splits(cfg.path, train, held_out, notes, checks.dropped if checks is not None else {}, train_where, eval_where)


def _is_preference_row(row: Any) -> bool:
    return isinstance(row, dict) and "messages" not in row and "completion" not in row and "chosen" in row


def row_prompt(row: dict) -> list[dict]:
    """The prompt of a canonical row: a preference or prompt row's `prompt`, or an SFT row's turns before its last answer."""
    if "prompt" in row:
        return row["prompt"]
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def distinct_prompts(rows: list[dict], n: int | None = None) -> list[list[dict]]:
    """The first n distinct prompts of the rows, in row order (all of them when n is None)."""
    prompts: list[list[dict]] = []
    seen: set[str] = set()
    for row in rows:
        if n is not None and len(prompts) >= n:
            break
        prompt = row_prompt(row)
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if prompt and key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts
