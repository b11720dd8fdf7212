"""align-data build --kind unpaired: KTO rows {prompt, completion, label} from ratings with a threshold,
thumbs rows and pairs (a shared response once, a conflicting one dropped: merge_unpaired's rule), the
label balance and KTO weights, errors, and training on the output as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.core.config import DataConfig
from align.core.data import load_splits
from align.core.normalize import KTO_WEIGHT_RATIO, kto_weights
from data_tools.cli import main

FIX = Path(__file__).parent / "fixtures" / "data_tools"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build(tmp_path, fmt, src, *extra, name="out", kind="unpaired"):
    """Run `align-data build` in-process, all prompts in train; returns (rows, build.json)."""
    out = tmp_path / name
    rc = main(["build", "--format", fmt, "--input", str(src), "--output", str(out), "--kind", kind,
               "--test-fraction", "0", "--no-plots", "--jsonl", *extra])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "jsonl" / "train.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "build.json").read_text())


def labels(rows):
    """(prompt text, completion text, label) of each row, in order."""
    return [(r["prompt"][-1]["content"], r["completion"][-1]["content"], r["label"]) for r in rows]


def loaded(path) -> set:
    """What KTO trains on: align's unpaired loader (merge_unpaired included), as a set of triples."""
    splits = load_splits(DataConfig(path=str(path), eval_split=None, eval_fraction=0.0), "unpaired", seed=0)
    return {(json.dumps(r["prompt"]), json.dumps(r["completion"]), r["label"]) for r in splits.train}


# --------------------------------------------------------------------------- ratings + threshold


def test_ratings_with_a_threshold_label_every_rated_response(tmp_path):
    rows, meta = build(tmp_path, "ratings", FIX / "ratings.jsonl", "--label-threshold", "5.5")
    assert sorted(labels(rows)) == sorted([
        ("Write a haiku about snow.", "Snow falls soft and white / quiet fields under the moon / the world holds its breath", True),
        ("Write a haiku about snow.", "Snow is cold.", False),
        ("Write a haiku about snow.", "White flakes drift and fall", True),  # 5.5 >= 5.5: the threshold is inclusive
        ("Give me a synonym for happy.", "Joyful.", True),
        ("Give me a synonym for happy.", "Sad.", False),
        ("Give me a synonym for happy.", "Glad.", True),
    ])
    assert {r["completion"][0]["content"]: r["score"] for r in rows}["Snow is cold."] == 2.0  # the rating travels along
    c = meta["counts"]
    assert meta["kind"] == "unpaired" and c["pairs_formed"] == 0 and c["responses_formed"] == 6
    assert c["labels"] == {"train": {"desirable": 4, "undesirable": 2}}
    assert meta["kto_balance"]["desirable_weight"] == 1.0 and meta["kto_balance"]["undesirable_weight"] == 1.71


def test_ultrafeedback_and_helpsteer_ratings_on_their_own_scales(tmp_path):
    rows, meta = build(tmp_path, "ultrafeedback", FIX / "ultrafeedback.jsonl", "--label-threshold", "4.5")
    # fine-grained scores: 3.25 4.75 1.5 2.5 | 5.0 5.0 | 5.0 1.25 -- ties are fine here, nothing is paired
    assert [x[2] for x in labels(rows)] == [False, True, False, False, True, True, True, False]
    assert meta["counts"]["pairing"] == {}
    rows, _ = build(tmp_path, "helpsteer", FIX / "helpsteer.jsonl", "--label-threshold", "3", name="hs")
    got = {x[1]: x[2] for x in labels(rows)}
    assert got["C# is an object-oriented programming language developed by Microsoft."] is True
    assert got["C# is a musical note."] is False


def test_scored_pairs_with_a_threshold_label_each_side_by_its_score(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1", "chosen": "good", "rejected": "fine", "score_chosen": 9, "score_rejected": 7},
        {"prompt": "q2", "chosen": "meh", "rejected": "bad", "score_chosen": 4, "score_rejected": 1},
    ])
    rows, _ = build(tmp_path, "trl", src, "--label-threshold", "6")
    assert labels(rows) == [("q1", "good", True), ("q1", "fine", True), ("q2", "meh", False), ("q2", "bad", False)]


# --------------------------------------------------------------------------- thumbs


def test_thumbs_rows_in_the_field_names_and_values_real_data_uses(tmp_path):
    conv = [u("Hi"), a("Hello!"), u("Name a fruit.")]
    src = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": conv, "completion": [a("An apple.")], "label": True},  # TRL's unpaired format (kto-mix-14k)
        {"prompt": conv, "completion": [a("A carrot.")], "label": False},
        {"prompt": "2+2?", "response": "4", "thumbs_up": 1},  # a chat feedback log
        {"prompt": "2+2?", "response": "5", "thumbs_up": "false"},
        {"prompt": "3+3?", "response": "6", "thumbs_down": False},  # read inverted
        {"prompt": "3+3?", "response": "7", "label": "👎"},
        {"prompt": "4+4?", "response": "8", "label": "Thumbs_Up"},
    ])
    rows, meta = build(tmp_path, "thumbs", src)
    assert labels(rows) == [("Name a fruit.", "An apple.", True), ("Name a fruit.", "A carrot.", False),
                            ("2+2?", "4", True), ("2+2?", "5", False), ("3+3?", "6", True), ("3+3?", "7", False),
                            ("4+4?", "8", True)]
    assert rows[0]["prompt"] == conv and rows[0]["score"] is None and rows[0]["id"] == "t.jsonl:1"

    # Named columns, a +1/-1 rating (as Open WebUI exports), a system column, CSV cells.
    csv = tmp_path / "fb.csv"
    csv.write_text("q,answer,rating,sys,uid\nHi?,Hello.,1,Be kind.,a\nHi?,Go away.,-1,Be kind.,b\n", encoding="utf-8")
    rows, _ = build(tmp_path, "thumbs", csv, "--prompt-col", "q", "--response-col", "answer", "--label-col", "rating",
                    "--system-col", "sys", "--id-col", "uid", name="csv")
    assert [(r["prompt"], r["completion"], r["label"], r["id"]) for r in rows] == [
        ([{"role": "system", "content": "Be kind."}, u("Hi?")], [a("Hello.")], True, "a"),
        ([{"role": "system", "content": "Be kind."}, u("Hi?")], [a("Go away.")], False, "b"),
    ]


def test_thumbs_repeats_merge_and_contradictions_drop(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "q", "completion": "yes", "label": True},
        {"prompt": "q", "completion": "yes", "label": True},  # the same feedback twice: kept once
        {"prompt": "q", "completion": "no", "label": False},
        {"prompt": "r", "completion": "maybe", "label": True},
        {"prompt": "r", "completion": "maybe", "label": False},  # up and down: no single label
        {"prompt": "r", "completion": "maybe", "label": True},
        {"prompt": "r", "completion": "sure", "label": True},
    ])
    rows, meta = build(tmp_path, "thumbs", src)
    assert labels(rows) == [("q", "yes", True), ("q", "no", False), ("r", "sure", True)]
    dropped = meta["counts"]["responses_dropped"]
    assert dropped["repeated_response"] == 1 and dropped["conflicting_label"] == 3  # every copy of "maybe"
    c = meta["counts"]
    assert c["responses_formed"] == sum(c["responses_dropped"].values()) + sum(c["responses_written"].values())


# --------------------------------------------------------------------------- pairs


def test_pairs_chosen_desirable_shared_once_conflicting_dropped_as_merge_unpaired_does(tmp_path):
    pairs = [
        {"prompt": "q", "chosen": "A", "rejected": "B"},
        {"prompt": "q", "chosen": "A", "rejected": "C"},  # A again: one desirable row
        {"prompt": "q", "chosen": "B", "rejected": "D"},  # B chosen here, rejected above: dropped
        {"prompt": "s", "chosen": "same", "rejected": "same"},  # identical: no preference, no rows
        {"prompt": "t", "chosen": "E", "rejected": "F"},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rows, meta = build(tmp_path, "trl", src)
    assert labels(rows) == [("q", "A", True), ("q", "C", False), ("q", "D", False), ("t", "E", True), ("t", "F", False)]
    assert [r["id"] for r in rows][:2] == ["pairs.jsonl:1:chosen", "pairs.jsonl:2:rejected"]
    c = meta["counts"]
    assert c["pairs_formed"] == 5 and c["responses_formed"] == 10
    assert c["responses_dropped"]["repeated_response"] == 1
    assert c["responses_dropped"]["conflicting_label"] == 2  # B's two copies
    assert c["responses_dropped"]["identical"] == 2
    assert c["responses_formed"] == sum(c["responses_dropped"].values()) + sum(c["responses_written"].values())
    # The same rows KTO gets when it reads the pairs directly (align.core.data.merge_unpaired).
    clean_pairs = write_jsonl(tmp_path / "clean.jsonl", [p for p in pairs if p["chosen"] != p["rejected"]])
    assert loaded(tmp_path / "out") == loaded(clean_pairs)


def test_rated_groups_paired_then_split_match_a_pairs_build_read_by_kto(tmp_path):
    """Without a threshold, rated responses are paired (--pairing) and each pair split by side: the same rows as a
    pairs build of the same input that KTO reads as pairs (all-pairs makes shared and conflicting responses)."""
    rows, meta = build(tmp_path, "ratings", FIX / "ratings.jsonl", "--pairing", "all-pairs")
    assert meta["counts"]["pairs_formed"] == 5  # snow: 3 pairs; happy: Joyful/Glad tie, 2 pairs
    assert meta["counts"]["responses_dropped"]["conflicting_label"] > 0  # middle-rated responses both ways
    build(tmp_path, "ratings", FIX / "ratings.jsonl", "--pairing", "all-pairs", name="pairs", kind="pairs")
    assert loaded(tmp_path / "out") == loaded(tmp_path / "pairs")
    best, _ = build(tmp_path, "ratings", FIX / "ratings.jsonl", name="bvw")  # best-vs-worst: no conflicts
    assert sorted(labels(best)) == sorted([
        ("Write a haiku about snow.", "Snow falls soft and white / quiet fields under the moon / the world holds its breath", True),
        ("Write a haiku about snow.", "Snow is cold.", False),
        ("Give me a synonym for happy.", "Joyful.", True), ("Give me a synonym for happy.", "Sad.", False),
    ])


def test_ranked_sources_label_the_pairs_their_ranks_form(tmp_path):
    rows, meta = build(tmp_path, "nectar", FIX / "nectar.jsonl")
    assert rows and meta["counts"]["pairs_formed"] * 2 == len(rows)
    assert [r["label"] for r in rows] == [True, False] * (len(rows) // 2)


# --------------------------------------------------------------------------- cleaning per response


def test_cleaning_applies_to_each_response(tmp_path):
    long = " ".join(["word"] * 30)
    evalset = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "please recite the secret benchmark question about the purple elephant now"}])
    src = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "q1", "completion": long, "label": True},  # too long: only this response goes
        {"prompt": "q1", "completion": "short", "label": False},
        {"prompt": "q2", "completion": "  ", "label": True},  # empty turn
        {"prompt": [a("hi"), u("q3")], "completion": "x", "label": True},  # turns out of order
        {"prompt": "q4", "completion": "please recite the secret benchmark question about the purple elephant now",
         "label": False},  # contaminated response
        {"prompt": "q5", "completion": "ok", "label": True},
    ])
    rows, meta = build(tmp_path, "thumbs", src, "--max-response-tokens", "20", "--decontaminate", str(evalset))
    assert labels(rows) == [("q1", "short", False), ("q5", "ok", True)]
    d = meta["counts"]["responses_dropped"]
    assert (d["response_too_long"], d["empty_turn"], d["malformed_roles"], d["contaminated"]) == (1, 1, 1, 1)


def test_near_duplicate_prompts_and_split_by_prompt(tmp_path):
    rows = []
    for i in range(40):
        rows += [{"prompt": f"question number {i} about topic {i * 7}", "completion": f"good {i}", "label": True},
                 {"prompt": f"question number {i} about topic {i * 7}", "completion": f"bad {i}", "label": False}]
    rows.append({"prompt": "question number 3 about topic 21 ?", "completion": "dup", "label": True})
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "split"
    assert main(["build", "--format", "thumbs", "--kind", "unpaired", "--input", str(src), "--output", str(out),
                 "--test-fraction", "0.3", "--near-dup", "normalized", "--no-plots", "--jsonl"]) == 0
    meta = json.loads((out / "build.json").read_text())
    assert meta["counts"]["responses_dropped"]["near_duplicate_prompt"] == 1
    split_rows = {s: [json.loads(x) for x in (out / "jsonl" / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")}
    prompts = {s: {json.dumps(r["prompt"]) for r in rs} for s, rs in split_rows.items()}
    assert prompts["train"] and prompts["test"] and not prompts["train"] & prompts["test"]  # both responses of a prompt together
    assert meta["distinct_prompts"] == {s: len(p) for s, p in prompts.items()}
    assert {s: dict(v) for s, v in meta["counts"]["labels"].items()} == {
        s: {"desirable": sum(r["label"] for r in rs), "undesirable": sum(not r["label"] for r in rs)} for s, rs in split_rows.items()}


# --------------------------------------------------------------------------- balance and weights


@pytest.mark.parametrize("n_good, n_bad", [(10, 100), (100, 10), (1, 1000), (1000, 1), (14, 10), (9, 10), (4, 3), (7, 7)])
def test_suggested_kto_weights_keep_the_papers_ratio(n_good, n_bad):
    good_w, bad_w = kto_weights(n_good, n_bad)
    low, high = KTO_WEIGHT_RATIO
    assert low <= good_w * n_good / (bad_w * n_bad) <= high
    assert min(good_w, bad_w) == 1.0  # the majority keeps weight 1, the minority is weighted up
    if low <= n_good / n_bad <= high:
        assert (good_w, bad_w) == (1.0, 1.0)


def test_kto_weights_follow_the_papers_example_and_need_both_labels():
    good_w, bad_w = kto_weights(1, 10)  # the paper: 1:10 -> desirable weight in [10, 13.33] with undesirable 1
    assert bad_w == 1.0 and 10 <= good_w <= 40 / 3
    assert kto_weights(5, 0) is None and kto_weights(0, 5) is None


def test_balance_is_reported_printed_and_in_the_card(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": f"r{i}", "label": i % 5 == 0} for i in range(50)])
    rows, meta = build(tmp_path, "thumbs", src)
    b = meta["kto_balance"]
    assert (b["split"], b["desirable"], b["undesirable"]) == ("train", 10, 40)
    assert (b["desirable_weight"], b["undesirable_weight"]) == kto_weights(10, 40) == (4.67, 1.0)
    out = capsys.readouterr().out
    assert "Suggested: `kto.desirable_weight: 4.67`, `kto.undesirable_weight: 1.0`" in out
    assert "10 desirable, 40 undesirable -> kto.desirable_weight 4.67, kto.undesirable_weight 1.0" in out.splitlines()[-1]
    for name in ("stats.md", "README.md"):
        text = (tmp_path / "out" / name).read_text()
        assert "## Label balance (KTO)" in text and "| train | 10 | 40 | 20.0% |" in text
    assert "- kto" in (tmp_path / "out" / "README.md").read_text()

    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": f"q{i}", "completion": "r", "label": True} for i in range(3)])
    _, meta = build(tmp_path, "thumbs", one, name="one")
    assert "desirable_weight" not in meta["kto_balance"]
    assert "has no undesirable rows" in capsys.readouterr().out


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rows, extra, expected",
    [
        ([{"prompt": "q", "completion": "r", "label": "meh"}], (),
         "t.jsonl:1: field 'label': expected a thumbs label (true/false, 1/0, 1/-1, up/down, good/bad, ...), got 'meh'"),
        ([{"prompt": "q", "completion": "r", "label": True}, {"prompt": "q", "completion": "r", "label": 3}], (),
         "t.jsonl:2: field 'label': expected a thumbs label"),
        ([{"prompt": "q", "completion": "r"}], (), "t.jsonl:1: field 'label' / 'thumbs_up' / 'thumbs_down' missing"),
        ([{"prompt": "q", "label": True}], (), "t.jsonl:1: field 'completion' missing"),
        ([{"prompt": "q", "response": "r", "stars": 1}], ("--label-col", "stars", "--response-col", "response"), None),
    ],
)
def test_bad_thumbs_rows_name_file_line_and_field(tmp_path, capsys, rows, extra, expected):
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out"
    rc = main(["build", "--format", "thumbs", "--kind", "unpaired", "--input", str(src), "--output", str(out), *extra])
    if expected is None:
        assert rc == 0
        return
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_combinations_and_unscored_pairs(tmp_path, capsys):
    thumbs = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": "r", "label": True}])
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 1},
        {"prompt": "r", "chosen": "a", "rejected": "b"},
    ])
    cases = [
        (["--format", "thumbs", "--input", str(thumbs)], "--format thumbs: thumbs rows are single labelled responses, not pairs"),
        (["--format", "trl", "--input", str(pairs), "--label-threshold", "1"], "--label-threshold: labels responses for --kind unpaired"),
        (["--format", "nectar", "--input", str(FIX / "nectar.jsonl"), "--kind", "unpaired", "--label-threshold", "1"],
         "--label-threshold: --format nectar ranks responses without scores"),
        (["--format", "thumbs", "--input", str(thumbs), "--kind", "unpaired", "--label-threshold", "1"],
         "--label-threshold: --format thumbs rows carry their own labels"),
        (["--format", "trl", "--input", str(pairs), "--kind", "unpaired", "--label-threshold", "1.5"],
         f"{pairs}:2: field 'score_chosen' missing: --label-threshold labels each response by its score"),
        (["--format", "ratings", "--input", str(thumbs), "--label-col", "label"], "--label-col: not an option of --format ratings"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        rc = main(["build", *args, "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and expected in err[0], (args, err)
        assert not out.exists()
    # --skip-invalid counts the unscored pair instead of stopping.
    rows, meta = build(tmp_path, "trl", pairs, "--label-threshold", "1.5", "--skip-invalid", name="skip")
    assert labels(rows) == [("q", "a", True), ("q", "b", False)]
    assert meta["counts"]["invalid_rows"] == {"missing_field": 1}


# --------------------------------------------------------------------------- KTO trains on it as is


def test_kto_loads_the_built_rows_as_they_are_and_its_recipe_config_accepts_them(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": f"question {i}?", "completion": f"answer {i}", "label": i % 3 != 0} for i in range(30)])
    out = tmp_path / "kto_data"
    assert main(["build", "--format", "thumbs", "--kind", "unpaired", "--input", str(src), "--output", str(out),
                 "--test-fraction", "0.3", "--seed", "1", "--no-plots", "--jsonl"]) == 0
    meta = json.loads((out / "build.json").read_text())
    written = {s: [json.loads(x) for x in (out / "jsonl" / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")}

    splits = load_splits(DataConfig(path=str(out), eval_split="test"), "unpaired", seed=0)
    strip = [{k: r[k] for k in ("prompt", "completion", "label")} for r in written["train"]]
    assert splits.train == strip  # nothing merged, dropped or relabelled on the way in
    assert len(splits.eval) == len(written["test"])
    assert f"training rows: {meta['kto_balance']['desirable']} desirable, {meta['kto_balance']['undesirable']} undesirable" in splits.notes

    from align.stages.registry import load_stage_config

    recipe = Path(__file__).parents[1] / "recipes" / "configs" / "smollm2-135m" / "kto.yaml"
    b = meta["kto_balance"]
    cfg = load_stage_config("kto", recipe, {"data.path": str(out), "kto.desirable_weight": b["desirable_weight"],
                                             "kto.undesirable_weight": b["undesirable_weight"], "tracking": "none"})
    assert cfg.data.path == str(out) and cfg.data.eval_split == "test"
    assert (cfg.kto.desirable_weight, cfg.kto.undesirable_weight) == (b["desirable_weight"], b["undesirable_weight"])


def test_validate_checks_unpaired_rows_and_passes_a_build(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": "q", "completion": "a", "label": False},
        {"prompt": "q", "completion": " ", "label": False},
        {"prompt": [a("hi"), u("q")], "completion": "b", "label": True},
        {"prompt": "q", "completion": "c", "label": "x"},
        {"prompt": "q", "completion": "d", "label": 0},
    ])
    assert main(["validate", str(src)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{src}:2: exact duplicate of {src}:1",
        f"{src}:3: the same response as {src}:1 with the other label (desirable and undesirable)",
        f"{src}:4: 'completion[0].content' is empty or whitespace",
        f"{src}:5: 'prompt[0]' is a assistant turn where a user turn belongs (turns alternate from user)",
        f"{src}:6: field 'label': expected true/false (or 1/0), got 'x'",
    ]
    out = tmp_path / "built"
    assert main(["build", "--format", "thumbs", "--kind", "unpaired", "--input", str(src), "--output", str(out),
                 "--skip-invalid", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("no problems")


def test_ratings_lists_per_prompt(tmp_path):
    src = write_jsonl(tmp_path / "lists.jsonl", [
        {"q": "Name a color.", "outs": ["Blue.", "Banana.", "Red."], "stars": [5, 1, 4]}])
    rows, _ = build(tmp_path, "ratings", src, "--prompt-col", "q", "--responses-col", "outs", "--scores-col", "stars",
                    "--label-threshold", "4")
    assert labels(rows) == [("Name a color.", "Blue.", True), ("Name a color.", "Banana.", False), ("Name a color.", "Red.", True)]


def test_generate_labels_on_policy_samples_by_the_judge_score(tmp_path, tiny_model_dir):
    (tmp_path / "my_len.py").write_text("def chars(prompt, response):\n    return float(len(response))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Name a fruit."}])
        out = tmp_path / "gen"
        assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-samples", "3",
                     "--max-new-tokens", "8", "--judge", "my_len:chars", "--kind", "unpaired", "--label-threshold", "20",
                     "--output", str(out), "--test-fraction", "0", "--no-plots", "--jsonl", "--device", "cpu"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    expected = []
    for s in samples:  # every sample once (a repeated sample is merged), labelled len >= 20; empty ones dropped
        for r in dict.fromkeys(s["responses"]):
            if r.strip():
                expected.append((s["prompt"][-1]["content"], r, len(r) >= 20))
    rows = [json.loads(x) for x in (out / "jsonl" / "train.jsonl").read_text().splitlines()]
    assert labels(rows) == expected and all(r["score"] == len(r["completion"][0]["content"]) for r in rows)


def test_stats_of_unpaired_rows_report_lengths_by_label_and_the_balance(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "completion": "yes " * (i % 3 + 1), "label": i < 3}
                                             for i in range(12)])
    assert main(["stats", str(src)]) == 0
    out = capsys.readouterr().out
    assert "12 rows." in out and "| t | 3 | 9 | 25.0% |" in out  # a lone file's split is its name
    assert "Desirable : undesirable in the rows = 3 : 9" in out
    assert f"`kto.desirable_weight: {kto_weights(3, 9)[0]}`" in out
    assert "| desirable | 3 | 1 | 2 | 2.0 | 3 | 3 |" in out  # i = 0, 1, 2: 1, 2, 3 words
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                              {"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert main(["stats", str(mixed)]) == 2
    assert f"{mixed}:2: a preference row among rows of the other kind" in capsys.readouterr().err
