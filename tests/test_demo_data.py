"""Tests for data_tools/demo_data.py: the generated demo SFT and preference datasets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from align.evaluation.judges import FORMAT_CONSTRAINTS, FormatJudge, find_format_instructions
from data_tools import demo_data

REPO = Path(__file__).resolve().parents[1]
FILES = [f"{name}/{split}.jsonl" for name in ("demo_sft", "demo_prefs") for split in ("train", "test")]
CARDS = ["demo_sft/README.md", "demo_prefs/README.md"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    assert demo_data.main(["--output-dir", str(path)]) == 0
    return path


def read(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(lines), f"blank line in {path}"
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data(out_dir) -> dict[str, list[dict]]:
    return {name: read(out_dir / name) for name in FILES}


def question_of(row: dict) -> str:
    """The bare question of a row (the format instruction cut off for preference rows)."""
    if "messages" in row:
        return row["messages"][0]["content"]
    matches, question = find_format_instructions(row["prompt"][-1]["content"])
    assert len(matches) == 1
    return question


def test_files_and_summary(out_dir, capsys):
    for name in FILES + CARDS:
        assert (out_dir / name).is_file(), name
    leftovers = [p.name for p in out_dir.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []
    demo_data.main(["--output-dir", str(out_dir / "again")])
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "demo_sft/train=" in summary[0] and "demo_prefs/test=" in summary[0]


def test_counts(data):
    assert 600 <= len(data["demo_sft/train.jsonl"]) <= 1000
    assert 100 <= len(data["demo_sft/test.jsonl"]) <= 150
    assert 1200 <= len(data["demo_prefs/train.jsonl"]) <= 2000
    test_prompts = {r["prompt"][0]["content"] for r in data["demo_prefs/test.jsonl"]}
    assert len(data["demo_prefs/test.jsonl"]) >= 250
    assert len(test_prompts) == len(data["demo_prefs/test.jsonl"])  # >= 250 distinct held-out prompts


def test_sft_rows_are_canonical(data):
    judge = FormatJudge()
    for name in ("demo_sft/train.jsonl", "demo_sft/test.jsonl"):
        ids = [r["id"] for r in data[name]]
        assert len(set(ids)) == len(ids)
        for row in data[name]:
            assert set(row) == {"id", "messages", "source"}
            assert row["source"] == "align-demo"
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["messages"])
            question, answer = (m["content"] for m in row["messages"])
            assert judge.score([row["messages"][:1]], [answer]) == [None], "SFT prompts carry no instruction"
            assert answer.endswith(".") and "\n" not in answer and 3 <= len(answer.split()) <= 25, answer
            assert answer[0].isupper() or answer[0].isdigit()


def test_preference_rows_are_canonical(data):
    for name in ("demo_prefs/train.jsonl", "demo_prefs/test.jsonl"):
        ids = [r["id"] for r in data[name]]
        assert len(set(ids)) == len(ids)
        for row in data[name]:
            assert set(row) == {"id", "prompt", "chosen", "rejected", "source"}
            assert row["source"] == "align-demo"
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == ["assistant"]
            assert [m["role"] for m in row["rejected"]] == ["assistant"]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert chosen.strip() and rejected.strip() and chosen != rejected
            assert len(chosen.split()) <= 25 and len(rejected.split()) <= demo_data.MAX_RAMBLE_WORDS


def test_chosen_pass_and_rejected_fail_the_judge(data):
    judge = FormatJudge()
    for name in ("demo_prefs/train.jsonl", "demo_prefs/test.jsonl"):
        rows = data[name]
        prompts = [r["prompt"] for r in rows]
        assert judge.score(prompts, [r["chosen"][0]["content"] for r in rows]) == [1.0] * len(rows)
        assert judge.score(prompts, [r["rejected"][0]["content"] for r in rows]) == [0.0] * len(rows)


def test_every_constraint_and_family_is_held_out(data):
    for name in ("demo_prefs/train.jsonl", "demo_prefs/test.jsonl"):
        constraints = Counter(r["id"].split("-", 5)[5] for r in data[name])
        assert set(constraints) == set(FORMAT_CONSTRAINTS), name
        families = Counter(r["id"].split("-")[4] for r in data[name])
        assert set(families) == set(demo_data.FAMILIES), name
        assert len(families) >= 10
    for row in data["demo_prefs/test.jsonl"]:
        key = row["id"].split("-", 5)[5]
        matches, _ = find_format_instructions(row["prompt"][0]["content"])
        assert [m.constraint.key for m in matches] == [key]


def test_no_question_overlap_between_test_and_train(data):
    train = {question_of(r) for name in FILES if "/train" in name for r in data[name]}
    test = {question_of(r) for name in FILES if "/test" in name for r in data[name]}
    assert train and test
    assert not train & test
    # Stricter: the split is by fact group (e.g. "opposite of hot" and "opposite of cold").
    generated = demo_data.generate(0)
    train_groups = {q.group for q in generated.train_questions}
    test_groups = {q.group for q in generated.test_questions}
    assert not train_groups & test_groups
    by_text = {q.text: q.group for q in generated.train_questions + generated.test_questions}
    assert {by_text[t] for t in test} <= test_groups
    assert {by_text[t] for t in train} <= train_groups
    # SFT and preference splits draw on the same held-out questions.
    sft_test = {question_of(r) for r in data["demo_sft/test.jsonl"]}
    prefs_test = {question_of(r) for r in data["demo_prefs/test.jsonl"]}
    assert sft_test == prefs_test


def test_deterministic_for_a_seed(out_dir, tmp_path):
    demo_data.main(["--output-dir", str(tmp_path / "a"), "--seed", "0"])
    demo_data.main(["--output-dir", str(tmp_path / "b"), "--seed", "1"])
    for name in FILES + CARDS:
        assert (tmp_path / "a" / name).read_bytes() == (out_dir / name).read_bytes(), name
    assert (tmp_path / "b" / FILES[2]).read_bytes() != (out_dir / FILES[2]).read_bytes()


def test_other_seed_is_also_valid(tmp_path):
    generated = demo_data.generate(7)
    sets = generated.datasets
    assert 100 <= len(sets["demo_sft"]["test"]) <= 150
    assert len(sets["demo_prefs"]["test"]) >= 250
    assert not {q.group for q in generated.train_questions} & {q.group for q in generated.test_questions}


def test_cards(out_dir, data):
    for card in CARDS:
        text = (out_dir / card).read_text(encoding="utf-8")
        assert text.startswith("---\nlicense: apache-2.0\n")
        assert demo_data.REGENERATE_COMMAND in text
        assert "Apache-2.0" in text
        for family in demo_data.FAMILIES:
            assert f"`{family}`" in text
        for split in ("train", "test"):
            name = f"{card.split('/')[0]}/{split}.jsonl"
            assert f"| {split} | {len(data[name])} |" in text
    prefs_card = (out_dir / CARDS[1]).read_text(encoding="utf-8")
    for constraint in FORMAT_CONSTRAINTS.values():
        assert all(p in prefs_card for p in constraint.phrasings)


def test_bundled_files_are_up_to_date(out_dir):
    """align/bundled must be exactly what the documented command produces (regenerate if this fails)."""
    bundled = REPO / "align" / "bundled"
    if not (bundled / FILES[0]).exists():
        pytest.skip("align/bundled not generated yet")
    for name in FILES + CARDS:
        assert (bundled / name).read_bytes() == (out_dir / name).read_bytes(), (
            f"align/bundled/{name} is stale: run `{demo_data.REGENERATE_COMMAND}`"
        )


def test_align_data_demo_command_writes_the_same_files(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "demo", "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (REPO / "align" / "bundled" / name).read_bytes(), name
