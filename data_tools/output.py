"""Write a built dataset while the build runs: Parquet (`data/<split>.parquet`, the hub
layout), the `save_to_disk` layout (`dataset_dict.json`, `<split>/`: what align's `data.path`
and `datasets.load_from_disk` read) and, on request, JSONL (`jsonl/<split>.jsonl`). Everything
is written inside the build's temporary folder; the caller renames it into place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema(
    [
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("source", pa.string()),
        ("id", pa.string()),
    ]
)
# --kind unpaired: KTO rows (TRL's unpaired format), the score a label came from when there was one.
UNPAIRED_SCHEMA = pa.schema(
    [
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("label", pa.bool_()),
        ("score", pa.float64()),
        ("source", pa.string()),
        ("id", pa.string()),
    ]
)
BATCH_ROWS = 8192
ARROW_FILE = "data-00000-of-00001.arrow"


def _features(schema: pa.Schema = SCHEMA):
    import datasets

    return datasets.Features.from_arrow_schema(schema)


class SplitWriter:
    """Streams canonical rows, in batches of BATCH_ROWS, into `data/<split>.parquet` (the hub
    layout), `<split>/data-00000-of-00001.arrow` (the `save_to_disk` layout that
    `datasets.load_from_disk` and align's `data.path` read) and, on request,
    `jsonl/<split>.jsonl`. Each batch is one Parquet row group and one Arrow record batch:
    nothing is re-read, so memory stays at one batch. `write` returns the row's index."""

    def __init__(self, root: Path, jsonl: bool, schema: pa.Schema = SCHEMA) -> None:
        self.root, self.jsonl, self.schema = root, jsonl, schema
        (root / "data").mkdir(parents=True, exist_ok=True)
        if jsonl:
            (root / "jsonl").mkdir(parents=True, exist_ok=True)
        # datasets reads a saved split's features from this schema metadata.
        self.arrow_schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": _features(schema).to_dict()}})})
        self.parquet: dict[str, pq.ParquetWriter] = {}
        self.arrow: dict[str, pa.RecordBatchStreamWriter] = {}
        self.jsonl_files: dict[str, Any] = {}
        self.pending: dict[str, list[dict]] = {}
        self.rows: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def write(self, split: str, row: dict) -> int:
        if split not in self.parquet:
            self.parquet[split] = pq.ParquetWriter(self.root / "data" / f"{split}.parquet", self.schema)
            (self.root / split).mkdir()
            self.arrow[split] = pa.ipc.new_stream(str(self.root / split / ARROW_FILE), self.arrow_schema)
            self.pending[split], self.rows[split], self.bytes[split] = [], 0, 0
            if self.jsonl:
                self.jsonl_files[split] = open(self.root / "jsonl" / f"{split}.jsonl", "w", encoding="utf-8")
        batch = self.pending[split]
        batch.append(row)
        if self.jsonl:
            self.jsonl_files[split].write(json.dumps(row, ensure_ascii=False) + "\n")
        if len(batch) >= BATCH_ROWS:
            self._flush(split)
        index = self.rows[split]
        self.rows[split] += 1
        return index

    def _flush(self, split: str) -> None:
        if self.pending[split]:
            table = pa.Table.from_pylist(self.pending[split], self.schema)
            self.parquet[split].write_table(table)
            self.arrow[split].write_table(table.replace_schema_metadata(self.arrow_schema.metadata))
            self.bytes[split] += table.nbytes
            self.pending[split] = []

    def close(self) -> list[str]:
        """Finish every file and the save_to_disk metadata; returns the splits, train first."""
        import datasets

        splits = sorted(self.parquet, key=lambda s: (s != "train", s))
        for split in splits:
            self._flush(split)
            self.parquet[split].close()
            self.arrow[split].close()
            split_info = datasets.SplitDict()
            split_info.add(datasets.SplitInfo(name=split, num_bytes=self.bytes[split], num_examples=self.rows[split]))
            info = datasets.DatasetInfo(features=_features(self.schema), splits=split_info)
            info.write_to_directory(str(self.root / split), pretty_print=True)
            state = {
                "_data_files": [{"filename": ARROW_FILE}],
                "_fingerprint": hashlib.sha256(f"{self.root.name}/{split}/{self.rows[split]}".encode()).hexdigest()[:16],
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": split,
            }
            (self.root / split / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        for f in self.jsonl_files.values():
            f.close()
        if splits:
            (self.root / "dataset_dict.json").write_text(json.dumps({"splits": splits}) + "\n")
        return splits


def read_prompts_at(root: Path, locations: dict[str, list[int]]) -> dict[tuple[str, int], list[dict]]:
    """The `prompt` of a few rows, by (split, row index), reading only their row groups."""
    found = {}
    for split, indices in locations.items():
        pf = pq.ParquetFile(root / "data" / f"{split}.parquet")
        starts, total = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(total)
            total += pf.metadata.row_group(g).num_rows
        for index in sorted(set(indices)):
            g = max(i for i, start in enumerate(starts) if start <= index)
            column = pf.read_row_group(g, columns=["prompt"]).column("prompt")
            found[(split, index)] = column[index - starts[g]].as_py()
    return found


def card(name: str, splits: dict[str, int], provenance: list[str], report: list[str], kind: str = "pairs") -> str:
    """The dataset card: hub metadata (so `load_dataset(<dir>)` finds the Parquet files),
    provenance, how to load it, and the stats report."""
    head = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        head += [f"  - split: {split}", f"    path: data/{split}.parquet"]
    if kind == "unpaired":
        head += ["tags:", "- unpaired-preference", "- kto", "- align-data", "---", ""]
        what = ("Unpaired preference rows in TRL's conversational format (`prompt` and `completion` message lists, "
                "`label`: true for a desirable response, false for an undesirable one; plus `score`, the rating a "
                "label came from if any, `source`, `id`), built by `align-data` for KTO.")
    else:
        head += ["tags:", "- preference", "- dpo", "- align-data", "---", ""]
        what = ("Preference pairs in TRL's conversational format (`prompt`, `chosen`, `rejected` message lists, "
                "plus `score_chosen`, `score_rejected`, `source`, `id`), built by `align-data`.")
    body = [
        f"# {name}",
        "",
        what,
        "",
        "## Provenance",
        "",
        *provenance,
        "",
        "## Files",
        "",
        "- `dataset_dict.json`, " + ", ".join(f"`{s}/`" for s in splits) + ": `datasets.load_from_disk` / align `data.path`",
        "- " + ", ".join(f"`data/{s}.parquet`" for s in splits) + ": Parquet (hub layout)",
        "- `stats.md`, `plots/`: the stats report; `build.json`: counts and options, machine-readable",
        "",
        "Load it with `datasets.load_from_disk(\"<this folder>\")`, or train on it with align: "
        "`data.path: <this folder>`.",
        "",
    ]
    return "\n".join(head + body + report) + "\n"
