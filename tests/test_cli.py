"""Recipes on bad input: exit status 2, one line naming the key, file or field, no finished RunDir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl


def run_recipe(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / f"{stage}.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def write_config(folder: Path, data: str, extra: str = "") -> Path:
    path = folder / "sft.yaml"
    path.write_text(
        "output_dir: out/sft\n"
        "model:\n  name_or_path: {model}\n"
        f"data:\n  path: {data}\n  eval_split: null\n"
        "train:\n  max_steps: 1\n"
        "tracking: none\n" + extra
    )
    return path


@pytest.fixture()
def good_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 4)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("misspelled key", ["sft.yaml:9", "unknown key 'train.learnin_rate'", "did you mean 'train.learning_rate'"]),
        ("wrong type", ["sft.yaml:9", "train.batch_size: expected an integer, got 'big'"]),
        ("missing data file", ["data.path", "missing.jsonl", "file not found"]),
        ("data lacking fields", ["bad.jsonl:2", "field 'messages' missing"]),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_model_dir, good_data, case, expected):
    data = str(good_data)
    extra = ""
    if case == "misspelled key":
        extra = "  learnin_rate: 0.1\n"
    elif case == "wrong type":
        extra = "  batch_size: big\n"
    elif case == "missing data file":
        data = str(tmp_path / "missing.jsonl")
    elif case == "data lacking fields":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good_data.read_text().splitlines()[0] + '\n{"text": "no messages here"}\n')
        data = str(bad)
    cfg = write_config(tmp_path, data)
    text = cfg.read_text().replace("{model}", str(tiny_model_dir)).replace("train:\n  max_steps: 1\n", "train:\n  max_steps: 1\n" + extra)
    cfg.write_text(text)
    proc = run_recipe("sft", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in expected:
        assert needle in lines[0], lines[0]
    manifest = tmp_path / "out" / "sft" / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "finished"


def test_bad_override_and_missing_parent(tmp_path, tiny_model_dir, good_data):
    cfg = write_config(tmp_path, str(good_data))
    cfg.write_text(cfg.read_text().replace("{model}", str(tiny_model_dir)))
    proc = run_recipe("sft", "--config", str(cfg), "train.max_step=3", cwd=tmp_path)
    assert proc.returncode == 2 and "error: command line: unknown key 'train.max_step'" in proc.stderr
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4)
    dpo_cfg = tmp_path / "dpo.yaml"
    dpo_cfg.write_text(f"output_dir: out/dpo\nparent_run: out/never-ran\ndata:\n  path: {prefs}\ntracking: none\n")
    proc = run_recipe("dpo", "--config", str(dpo_cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "parent_run: out/never-ran does not exist" in proc.stderr
    assert not (tmp_path / "out" / "dpo").exists()


def test_keys_lists_the_schema(tmp_path):
    proc = run_recipe("dpo", "--keys", cwd=tmp_path)
    assert proc.returncode == 0 and "dpo.beta" in proc.stdout and "train.learning_rate" in proc.stdout
