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
from align.core.readers import FILE_SUFFIXES, FILE_TYPES, RowError, file_stem, file_suffix, read_file, typed_csv_columns, unsupported_type
from align.core.rows import REASONS, pair_serial, preference_problems, serial, unpaired_problems

BUNDLED_DIR = Path(__file__).parents[1] / "bundled"
ROLES = ("system", "user", "assistant")


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


# --------------------------------------------------------------------------- validation


def _maybe_json(value: Any) -> Any:
    """CSV/Parquet store conversations as JSON strings."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _messages(value: Any, where: str, name: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    value = _maybe_json(value)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}': expected a non-empty list of messages, got {_kind(value)}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{name}[{i}]': expected a message mapping, got {_kind(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(f"{where}: field '{name}[{i}].{key}' missing")
        if msg["role"] not in roles:
            raise DataError(f"{where}: field '{name}[{i}].role': {msg['role']!r} is not one of {', '.join(roles)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: field '{name}[{i}].content': expected a string, got {_kind(msg['content'])}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return type(value).__name__


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: field '{key}' missing")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field '{key}': expected a string, got {_kind(row[key])}")
    return row[key]


def instruction_user_content(instruction: str, input_text: str | None) -> str:
    """An Alpaca-style row's user turn; its `input` renders under '### Input:'."""
    if input_text and input_text.strip():
        return f"{instruction}\n\n### Input:\n{input_text}"
    return instruction


def normalize_sft(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    if "messages" in row:
        messages = _messages(row["messages"], where, "messages")
    elif "prompt" in row and "completion" in row:
        prompt, completion = _maybe_json(row["prompt"]), _maybe_json(row["completion"])
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        else:
            messages = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
    elif "chosen" in row and "prompt" in row:
        # A preference row trains SFT on its chosen answer (as HuggingFaceH4's `train_sft` splits
        # do), so one built preference dataset feeds both SFT and DPO; load_splits notes it.
        pair = normalize_preference(row, where)
        messages = pair["prompt"] + pair["chosen"]
    elif "instruction" in row and "output" in row:
        input_text = _text(row, "input", where) if row.get("input") is not None else None
        user = instruction_user_content(_text(row, "instruction", where), input_text)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
    else:
        raise DataError(
            f"{where}: field 'messages' missing (an SFT row has 'messages', 'prompt'+'completion', "
            f"'prompt'+'chosen' (a preference row), or 'instruction'+'output'; found: {', '.join(map(repr, row)) or 'nothing'})"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages': no assistant turn to train on")
    return {"messages": messages}


def normalize_preference(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: field '{key}' missing (a preference row has 'prompt', 'chosen', 'rejected')")
    prompt, chosen, rejected = _maybe_json(row.get("prompt")), _maybe_json(row["chosen"]), _maybe_json(row["rejected"])
    if prompt is None:
        # Implicit prompt: the shared message prefix of the two conversations.
        chosen = _messages(chosen, where, "chosen")
        rejected = _messages(rejected, where, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the completion starts with an assistant turn
            n -= 1
        if n == 0 or n == len(chosen) or n == len(rejected):
            raise DataError(f"{where}: field 'prompt' missing and chosen/rejected share no prompt prefix")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt, str):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: field 'chosen'/'rejected': with a text prompt they must be strings too")
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    else:
        prompt = _messages(prompt, where, "prompt")
        chosen = _messages(chosen, where, "chosen") if not isinstance(chosen, str) else [{"role": "assistant", "content": chosen}]
        rejected = (
            _messages(rejected, where, "rejected") if not isinstance(rejected, str) else [{"role": "assistant", "content": rejected}]
        )
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the last message must be from the user, got {prompt[-1]['role']!r}")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}[0].role': a response starts with an assistant turn, got {msgs[0]['role']!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _response(value: Any, where: str, name: str) -> list[dict]:
    value = _maybe_json(value)
    msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, where, name)
    if msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}[0].role': a response starts with an assistant turn, got {msgs[0]['role']!r}")
    return msgs


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # CSV and Parquet often store labels as 0/1
        return bool(value)
    raise DataError(f"{where}: field 'label': expected true/false (or 1/0), got {value!r}")


def _score(row: dict, key: str, where: str, threshold: float) -> bool:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        missing = "missing" if value is None else f"expected a number, got {value!r}"
        raise DataError(
            f"{where}: field '{key}' {missing}; kto.score_threshold labels responses by their score "
            "(leave it null to label pairs by side, chosen desirable and rejected undesirable)"
        )
    return float(value) >= threshold


def normalize_unpaired(row: Any, where: str, score_threshold: float | None = None) -> list[dict]:
    """Unpaired rows (prompt, completion, label) from one input row, in row order.

    - `{"prompt", "completion", "label"}`: TRL's unpaired format, as is (text or messages);
    - `{"prompt", "completion", "score"}`: label = score >= score_threshold (a rated response);
    - a preference pair: two rows, chosen desirable and rejected undesirable; with score_threshold,
      each response labelled by its own score_chosen / score_rejected >= score_threshold instead
      (align-data writes those scores for rated sources).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    if "chosen" in row or "rejected" in row:
        pair = normalize_preference(row, where)
        if score_threshold is None:
            labels = (True, False)
        else:
            labels = (_score(row, "score_chosen", where, score_threshold), _score(row, "score_rejected", where, score_threshold))
        return [
            {"prompt": pair["prompt"], "completion": pair[side], "label": label}
            for side, label in zip(("chosen", "rejected"), labels)
        ]
    if "completion" not in row or row["completion"] is None:
        raise DataError(
            f"{where}: field 'completion' missing (an unpaired row has 'prompt', 'completion' and 'label'; "
            f"found: {', '.join(map(repr, row)) or 'nothing'})"
        )
    prompt = normalize_prompt({"prompt": row.get("prompt")}, where)["prompt"] if row.get("prompt") is not None else None
    if prompt is None:
        raise DataError(f"{where}: field 'prompt' missing (an unpaired row has 'prompt', 'completion' and 'label')")
    if row.get("label") is not None:
        label = _label(row["label"], where)
    elif "score" in row and score_threshold is not None:
        label = _score(row, "score", where, score_threshold)
    else:
        hint = " (a row with 'score' needs kto.score_threshold)" if "score" in row else ""
        raise DataError(f"{where}: field 'label' missing{hint}")
    return [{"prompt": prompt, "completion": _response(row["completion"], where, "completion"), "label": label}]


def merge_unpaired(groups: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """Flatten the unpaired rows of each input row; a response several pairs share is kept once.

    With several pairs per prompt (align-data's best-vs-each or all-pairs) a response recurs: its
    copies are merged, and a response labelled both ways (chosen in one pair, rejected in another)
    is dropped, having no single label. Rows given as unpaired rows (one per input row) are kept as
    they are. Both counts go to the notes.
    """
    rows: list[dict] = []
    labels: dict[str, list[bool]] = {}  # (prompt, completion) of a pair's response -> its labels
    index: dict[str, int] = {}
    for group in groups:
        from_pair = len(group) == 2  # a pair gives two rows, an unpaired row one
        for row in group:
            if not from_pair:
                rows.append(row)
                continue
            key = json.dumps([row["prompt"], row["completion"]], sort_keys=True, ensure_ascii=False)
            if key not in labels:
                labels[key], index[key] = [], len(rows)
                rows.append(row)
            labels[key].append(row["label"])
    repeats = sum(len(v) - 1 for v in labels.values())
    mixed = {index[k] for k, v in labels.items() if len(set(v)) > 1}
    notes = []
    if repeats:
        notes.append(f"{repeats} repeated responses of pairs merged (a response in several pairs counts once)")
    if mixed:
        notes.append(f"{len(mixed)} responses dropped: desirable in one pair and undesirable in another (no single label)")
    return [r for i, r in enumerate(rows) if i not in mixed], notes


# The KTO paper (Ethayarajh et al. 2024, sec. 4.2) keeps
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in this range.
KTO_WEIGHT_RATIO = (1.0, 4 / 3)


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float] | None:
    """(desirable_weight, undesirable_weight) that bring the weighted ratio of desirable to undesirable
    rows into KTO_WEIGHT_RATIO: (1, 1) when it already is; otherwise the minority side is weighted up
    and the majority kept at 1, as in the paper's example (1:10 -> desirable_weight 10 to 13.33), aiming
    at the middle of the range (7/6) so the 2-decimal rounding stays inside it. None without both labels."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return None
    ratio = n_desirable / n_undesirable
    low, high = KTO_WEIGHT_RATIO
    if low <= ratio <= high:
        return 1.0, 1.0
    middle = (low + high) / 2
    if ratio < low:
        return round(middle / ratio, 2), 1.0
    return 1.0, round(ratio / middle, 2)


def kto_balance_note(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """A line for a KTO run whose weighted balance falls outside KTO_WEIGHT_RATIO, with the weights
    that would bring it in (kto_weights); None when it is inside, or when a label is missing."""
    suggested = kto_weights(n_desirable, n_undesirable)
    if suggested is None:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = KTO_WEIGHT_RATIO
    if low <= ratio <= high:
        return None
    return (
        f"{n_desirable} desirable and {n_undesirable} undesirable training rows: weighted ratio {ratio:.2f}, outside the "
        f"paper's [{low:g}, {high:.3g}]; kto.desirable_weight={suggested[0]:g} kto.undesirable_weight={suggested[1]:g} would bring it in"
    )


def normalize_prompt(row: Any, where: str) -> dict:
    """A prompt to sample from: `prompt` (messages or text) of any row, or an SFT conversation
    up to its last assistant turn; an optional `answer` (text or list) is kept as the reference
    of the `answer` judge."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a row mapping, got {_kind(row)}")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _maybe_json(row["prompt"])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
    elif "messages" in row:
        messages = normalize_sft(row, where)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        if not prompt:
            raise DataError(f"{where}: field 'messages': no turn before the assistant's to use as a prompt")
    else:
        raise DataError(f"{where}: field 'prompt' missing (a prompt row has 'prompt', or 'messages')")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': the last message must be from the user, got {prompt[-1]['role']!r}")
    out = {"prompt": prompt}
    if row.get("answer") is not None:  # the reference of the verifiable-answer judge (online stages)
        answer = _maybe_json(row["answer"])
        answer = [answer] if isinstance(answer, str) else answer
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str) for a in answer):
            raise DataError(f"{where}: field 'answer': expected a string or a non-empty list of strings, got {_kind(row['answer'])}")
        out["answer"] = answer
    return out


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
