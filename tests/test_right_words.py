"""Errors in the right words: command-line values located on the command line (list entries included),
sweep run names distinct for distinct values, sweeps and pipelines that include themselves named as such,
pickled checkpoints refused in one clean line, and the same data file types read by align-data and the recipes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, preference_rows, write_jsonl

from align.cli import sweep as S
from align.core.config_loader import load_config
from align.core.data import load_splits
from align.core.readers import FILE_SUFFIXES
from align.core.errors import ConfigError, DataError
from align.stages.registry import load_stage_config

SHIPPED = REPO / "recipes" / "configs" / "smollm2-135m"


@pytest.fixture()
def grpo_yaml(tmp_path) -> Path:
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "parent_run": str(tmp_path / "sft"), "data": {"path": "prompts.jsonl"},
        "train": {"max_steps": 2, "batch_size": 4}, "grpo": {"prompts_per_step": 2, "group_size": 2},
        "rewards": [{"judge": "format"}, {"judge": "length", "weight": 0.5}],
    }))
    return path


# --------------------------------------------------------------------------- command-line values


@pytest.mark.parametrize("overrides, message", [
    ({"rewards": [{"judge": "format", "weight": 0}]}, "command line: rewards[0].weight: must be a finite non-zero number"),
    ({"rewards[1].weight": 0}, "command line: rewards[1].weight: must be a finite non-zero number"),
    ({"rewards[0].judge": "nosuch"}, "command line: rewards[0].judge: unknown judge 'nosuch'"),
    ({"rewards[2].weight": 1}, "command line: rewards[2].weight: rewards has 2 entries (index 2 is past its end)"),
    ({"train.batch_size[0]": 1}, "command line: train.batch_size[0]: train.batch_size is not a list"),
])
def test_command_line_values_and_list_entries_are_located_on_the_command_line(grpo_yaml, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_stage_config("grpo", grpo_yaml, overrides)
    assert str(err.value).startswith(message), str(err.value)


def test_an_indexed_override_sets_one_entry_and_yaml_values_keep_their_line(grpo_yaml):
    from align.stages.grpo import GRPOConfig

    cfg = load_config(GRPOConfig, grpo_yaml, {"rewards[1].weight": 2, "rewards[0].default": 0.5})
    assert [(s.judge, s.weight, s.default) for s in cfg.rewards] == [("format", 1.0, 0.5), ("length", 2.0, None)]
    text = grpo_yaml.read_text().replace("weight: 0.5", "weight: 0")
    grpo_yaml.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "weight: 0" in t)
    with pytest.raises(ConfigError, match=rf"^{grpo_yaml}:{line}: rewards\[1\].weight: must be"):
        load_stage_config("grpo", grpo_yaml, {"rewards[0].weight": 3})


# --------------------------------------------------------------------------- sweeps and pipelines


def test_sweep_run_names_are_distinct_for_distinct_values(tmp_path):
    distinct = [0.1000001, 0.1000002, 0.1, 1.0, "a b", "a-b", "null", None, "x+y", ["x", "y"], "true", True]
    names = [S.format_value(v) for v in distinct]
    assert len(set(names)) == len(names), names
    assert S.format_value(1.0) == "1" and S.format_value(3e-4) == "0.0003"  # short where that is exact
    sweep = S.load_sweep(str(SHIPPED / "dpo.yaml"), ["lr=0.1000001,0.1000002"], None, None, {"output_dir": str(tmp_path / "s")})
    assert [p.name for p in sweep.points] == ["lr=0.1000001", "lr=0.1000002"]
    with pytest.raises(ConfigError, match=r"'1e-4' and 0.0001 are the same value"):  # the same value still collides
        S.load_sweep(str(SHIPPED / "dpo.yaml"), ["lr=1e-4,0.0001"], None, None, {"output_dir": str(tmp_path / "s")})
    assert not (tmp_path / "s").exists()


def test_a_sweep_or_pipeline_that_includes_itself_is_named_as_such(tmp_path):
    from align.cli.pipeline import load_pipeline

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"config": "sweep.yaml", "stage": "dpo", "values": {"beta": [0.1, 0.2]}}))
    with pytest.raises(ConfigError, match=rf"config: {sweep} is this sweep file: a sweep that includes itself"):
        S.load_sweep(str(sweep), [], None, None, {})
    pipeline = tmp_path / "pipeline.yaml"
    stages = [{"name": "a", "stage": "sft", "config": "pipeline.yaml"}]
    pipeline.write_text(yaml.safe_dump({"name": "p", "output_dir": str(tmp_path / "runs"), "stages": stages}))
    with pytest.raises(ConfigError, match=r"stages\[0\].config: .*pipeline.yaml is this pipeline file: a pipeline that includes itself"):
        load_pipeline(pipeline)
    with pytest.raises(ConfigError, match=r"stages\[0\].config: .*sweep.yaml is a sweep file, not a stage config"):
        load_pipeline(pipeline, {"stages": [{"name": "a", "stage": "dpo", "config": "sweep.yaml"}]})
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"config": "pipeline.yaml", "stage": "sft", "values": {"lr": [0.1]}}))
    with pytest.raises(ConfigError, match=r"pipeline.yaml is a pipeline file, not a stage config"):
        S.load_sweep(str(other), [], None, None, {})


# --------------------------------------------------------------------------- checkpoints


class WritesAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pickled code ran"))


def test_a_pickled_checkpoint_is_refused_in_one_clean_line_naming_the_file(tmp_path):
    import numpy as np

    from align.core.checkpoints import check_plain_checkpoint, load_plain

    marker = tmp_path / "RAN"
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    torch.save({"step": torch.tensor(3), "numpy": ("MT19937", np.arange(4, dtype=np.uint32))}, folder / "rng_state.pth")
    torch.save({"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}, folder / "optimizer.pt")
    check_plain_checkpoint(folder)  # tensors, containers, and numpy arrays in an RNG state: plain data
    torch.save({"optimizer": WritesAFile(str(marker))}, folder / "scheduler.pt")
    with pytest.raises(DataError) as err:
        check_plain_checkpoint(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'scheduler.pt'}: refused: not a checkpoint of plain data: a pickle that imports and calls")
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message, message
    assert not marker.exists()
    torch.save(("MT19937", np.arange(4)), tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other.pt: refused: not a checkpoint of plain data"):  # numpy: in RNG states only
        load_plain(tmp_path / "other.pt")


# --------------------------------------------------------------------------- data file types


def _write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the file type its name says (gzipped when it ends in .gz)."""
    from datasets import Dataset

    kind = path.name.split(".", 1)[1].removesuffix(".gz")
    plain = path.with_name(path.name.removesuffix(".gz"))
    if kind == "jsonl":
        write_jsonl(plain, rows)
    elif kind == "json":
        plain.write_text(json.dumps(rows))
    else:
        flat = Dataset.from_list([{k: json.dumps(v) for k, v in r.items()} for r in rows])
        flat.to_csv(str(plain), index=False) if kind == "csv" else flat.to_parquet(str(plain))
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    return path


@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
def test_align_data_and_the_recipes_read_the_same_file_types(suffix, tmp_path):
    from align.core.config import DataConfig
    from data_tools.readers import iter_splits

    path = _write(tmp_path / f"prefs{suffix}", preference_rows(6))
    splits = load_splits(DataConfig(path=str(path), eval_split=None, eval_fraction=0.0), "preference", seed=0)
    assert len(splits.train) == 6 and splits.where("train", 0).startswith(str(path))
    assert [(name, len(list(rows))) for name, rows in iter_splits(str(path))] == [("prefs", 6)]


def test_a_folder_of_gzipped_split_files_and_unsupported_types(tmp_path):
    from align.core.config import DataConfig
    from data_tools.readers import iter_splits

    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "train.jsonl.gz", preference_rows(6))
    _write(folder / "test.json.gz", preference_rows(8)[6:])
    splits = load_splits(DataConfig(path=str(folder)), "preference", seed=0)
    assert (len(splits.train), len(splits.eval)) == (6, 2)
    for name in ("prefs.parquet.gz", "prefs.txt"):
        bad = tmp_path / name
        bad.write_bytes(b"x")
        shown = ".parquet.gz" if name.endswith(".gz") else ".txt"
        for read in (lambda: load_splits(DataConfig(path=str(bad)), "preference", seed=0), lambda: iter_splits(str(bad))):
            with pytest.raises(DataError, match=rf"unsupported file type '{shown}' \(align-data and the recipes read .jsonl, .*\.csv\.gz\)"):
                read()
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"broken.jsonl.gz: cannot read: BadGzipFile"):
        load_splits(DataConfig(path=str(tmp_path / "broken.jsonl.gz")), "preference", seed=0)
