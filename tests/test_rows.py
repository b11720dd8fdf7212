"""The recipes train on no row that `align-data validate` rejects: the same checks, through the same code."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import preference_rows, tiny_overrides, write_jsonl

from align.core.config import DataConfig

from align.core.config_loader import load_config
from align.core.data import load_splits


def msgs(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def bad_rows() -> list[dict]:
    """One row per problem the validator finds in a single row, then one exact duplicate."""
    good = preference_rows(1)[0]
    return [
        {**good, "chosen": msgs("assistant", "   ")},  # empty turn
        {**good, "chosen": msgs("assistant", "same"), "rejected": msgs("assistant", " same ")},  # identical
        {**good, "prompt": msgs("system", "be brief") + msgs("assistant", "hi") + msgs("user", "q?")},  # turn order
        {**good, "score_chosen": 1.0, "score_rejected": 3.0},  # scores rank rejected above chosen
        {**good, "score_chosen": float("nan"), "score_rejected": 0.0},  # not a finite number
        good,  # an exact duplicate of the first good row below
    ]


def test_load_splits_leaves_out_exactly_the_rows_validate_rejects(tmp_path):
    from data_tools.validate import problems

    rows = preference_rows(8) + bad_rows()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as JSON's NaN token
    flagged = {where for where, _ in _all(problems(str(path)))}
    splits = load_splits(DataConfig(path=str(path), eval_split=None, eval_fraction=0.0), "preference", seed=0)

    expected_lines = {f"{path}:{i}" for i in range(9, 15)}
    assert flagged == expected_lines, "the validator flags the six bad rows"
    assert len(splits.train) == len(rows) - len(flagged), "the recipe keeps every row the validator accepts and no other"
    assert splits.dropped == {"train": {"empty_turn": 1, "identical": 1, "malformed_roles": 1, "score_order": 1, "bad_score": 1,
                                        "exact_duplicate": 1}}
    (note,) = splits.notes[:1]
    assert "left out 6 of 14 rows that align-data validate rejects" in note and "chosen identical to rejected: 1" in note
    assert splits.info()["dropped"] == splits.dropped


def test_kto_loading_leaves_out_the_responses_validate_rejects(tmp_path):
    """Unpaired rows (and pairs split into rows) get the same structural checks; each bad response is counted."""
    from data_tools.validate import problems

    good = [{"prompt": msgs("user", f"q{i}?"), "completion": msgs("assistant", f"a{i}"), "label": i % 2 == 0} for i in range(6)]
    bad = [
        {"prompt": msgs("user", "q?"), "completion": msgs("assistant", "  "), "label": True},  # empty turn
        {"prompt": msgs("assistant", "hi") + msgs("user", "q?"), "completion": msgs("assistant", "a"), "label": False},  # turn order
    ]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, good + bad)
    flagged = {where for where, _ in _all(problems(str(path)))}
    splits = load_splits(DataConfig(path=str(path), eval_split=None, eval_fraction=0.0), "unpaired", seed=0)

    assert flagged == {f"{path}:7", f"{path}:8"}, "the validator flags the two bad rows"
    assert splits.train == good, "the recipe keeps every row the validator accepts and no other"
    assert splits.dropped == {"train": {"empty_turn": 1, "malformed_roles": 1}}
    assert any("left out 2 of 8 responses that align-data validate rejects" in n for n in splits.notes), splits.notes


def _all(gen):
    out = []
    while True:
        try:
            out.append(next(gen))
        except StopIteration:
            return out


def test_the_validator_and_the_recipes_share_one_implementation():
    import data_tools.clean as clean
    import data_tools.validate as validate

    from align.core import rows

    assert clean.role_problem is rows.role_problem and clean.empty_problem is rows.empty_problem
    assert clean.same_response is rows.same_response
    assert validate.preference_problems is rows.preference_problems


def test_dpo_recipe_counts_what_it_left_out_in_its_manifest(tmp_path, tiny_data, sft_parent):
    from align.stages.registry import run_stage
    from align.stages.dpo import DPOConfig

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12) + bad_rows())
    cfg = load_config(DPOConfig, None, tiny_overrides(None, data, tmp_path / "dpo", parent_run=str(sft_parent), tracking="none",
                                                      **{"train.max_steps": 1, "samples.num_prompts": 0}))
    run = run_stage(cfg)
    dataset = json.loads((Path(run.path) / "manifest.json").read_text())["dataset"]
    assert dataset["rows"]["train"] + dataset["rows"]["eval"] == 12
    assert sum(dataset["dropped"]["train"].values()) == 6
    assert any("align-data validate rejects" in note for note in dataset["notes"])


def test_validate_refuses_an_empty_file(tmp_path, capsys):
    from data_tools.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["validate", str(empty)]) == 1
    assert "no rows" in capsys.readouterr().err
