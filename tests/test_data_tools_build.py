"""align-data build: pairing, every cleaning rule, the split, outputs, atomic writes, and the
validate / stats commands."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from data_tools import grouping
from data_tools.cli import main
from align.core.pairing import pair_group
from data_tools.sources.base import Candidate, Group

FIX = Path(__file__).parent / "fixtures" / "data_tools"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def row(prompt, chosen, rejected, **extra):
    return {"prompt": [u(prompt)] if isinstance(prompt, str) else prompt,
            "chosen": [a(chosen)] if isinstance(chosen, str) else chosen,
            "rejected": [a(rejected)] if isinstance(rejected, str) else rejected, **extra}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path, src, *extra, name="out", fmt="trl"):
    out = tmp_path / name
    rc = main(["build", "--format", fmt, "--input", str(src), "--output", str(out), "--no-plots", "--jsonl", *extra])
    return rc, out


def read(out: Path, split="train"):
    path = out / "jsonl" / f"{split}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def counts(out: Path) -> dict:
    return json.loads((out / "build.json").read_text())["counts"]


# --------------------------------------------------------------------------- pairing


def group(*scores):
    return Group([u("q")], [Candidate([a(f"r{i}")], s, str(i), "w") for i, s in enumerate(scores)], "g", "w")


@pytest.mark.parametrize(
    "strategy, margin, scores, expected, outcome",
    [
        ("best-vs-worst", 0, (3, 5, 1, 5), [("1", "2")], {"unpaired_responses": 2}),  # first of the tied best
        ("best-vs-worst", 0, (2, 2, 2), [], {"all_tied": 1}),
        ("best-vs-worst", 0, (4,), [], {"single_response": 1}),
        ("best-vs-worst", 5, (3, 5, 1), [], {"below_margin": 1}),
        ("best-vs-each", 0, (3, 5, 1, 5), [("1", "0"), ("1", "2")], {"skipped_tie": 1, "unpaired_responses": 1}),
        ("best-vs-each", 2.5, (3, 5, 1), [("1", "2")], {"skipped_margin": 1, "unpaired_responses": 1}),
        ("all-pairs", 0, (3, 5, 1, 5), [("1", "0"), ("0", "2"), ("3", "0"), ("1", "2"), ("3", "2")],
         {"skipped_tie": 1, "unpaired_responses": 0}),
        ("all-pairs", 3, (3, 5, 1), [("1", "2")], {"skipped_margin": 2, "unpaired_responses": 1}),
    ],
)
def test_pairing_strategies(strategy, margin, scores, expected, outcome):
    counts = Counter()
    pairs = list(pair_group(group(*scores), strategy, margin, counts))
    assert [(p.id.split(":")[1].split(">")[0], p.id.split(">")[1]) for p in pairs] == expected
    assert all(p.score_chosen > p.score_rejected and p.score_chosen - p.score_rejected >= margin for p in pairs)
    assert dict(counts) == outcome


# --------------------------------------------------------------------------- cleaning


ROWS = [
    row("What is the capital of Spain?", "Madrid.", "Barcelona."),  # kept
    row([u("Hi"), u("Still there?")], "Yes.", "No."),  # malformed: two user turns in a row
    row([u("Hi"), a("Hello")], "Yes.", "No."),  # malformed: the prompt ends with an assistant turn
    row("Name a color.", [{"role": "bot", "content": "Red."}], "Blue."),  # malformed: unknown role
    row("Name an animal.", "   ", "A cat."),  # empty turn
    row("Name a tree.", "An oak. ", "An oak."),  # identical (whitespace aside)
    row("What is the capital of Spain?", "Madrid.", "Barcelona."),  # exact duplicate of the first row
    row("What is the capital of Italy? Please answer briefly and clearly right now.", "Rome.", "Milan."),  # kept
    row("what is the capital of italy?? please answer briefly and clearly right now!", "Rome!", "Turin."),  # near dup
    row("Write a long poem " + "about the sea " * 10, "Waves.", "Sand."),  # 34-word prompt
    row("Describe the water cycle in three short sentences for a child please.", "Rain falls.", "No."),  # contaminated
]


def test_every_cleaning_rule_drops_and_counts(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    evalset = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": [u("Describe the water cycle in three short sentences for a child.")],
         "chosen": [a("x")], "rejected": [a("y")]},
        {"messages": [u("A completely unrelated question that has more than thirteen words in it, to be sure."),
                      a("ok")]},
    ])
    rc, out = run(tmp_path, src, "--test-fraction", "0", "--max-prompt-tokens", "30", "--decontaminate", str(evalset))
    assert rc == 0
    c = counts(out)
    assert c["pairs_dropped"] == {
        "malformed_roles": 3, "empty_turn": 1, "identical": 1, "prompt_too_long": 1, "response_too_long": 0,
        "total_too_long": 0, "contaminated": 1, "exact_duplicate": 1, "near_duplicate_prompt": 1,
    }
    assert [r["chosen"][0]["content"] for r in read(out)] == ["Madrid.", "Rome."]
    assert c["pairs_formed"] == len(ROWS) == sum(c["pairs_dropped"].values()) + sum(c["pairs_written"].values())
    report = (out / "stats.md").read_text()
    assert "| cleaning | near-duplicate prompt (--near-dup) | 1 |" in report
    assert "| 1 | 1 | What is the capital of Italy? Please answer briefly and clearly right now. | " \
           "what is the capital of italy?? please answer briefly and clearly right now! |" in report


def test_near_duplicate_methods_and_threshold(tmp_path):
    base = " ".join(f"word{i}" for i in range(20))  # 18 word 3-grams
    rows = [row(base, "one", "two"), row(base + " extra", "three", "four"),  # 18 of 19 shingles shared: 0.947
            row(base.upper() + "!", "five", "six"),  # the same as the first after normalization
            row("an unrelated prompt about something else", "seven", "eight")]
    src = write_jsonl(tmp_path / "near.jsonl", rows)
    expect = {("ngram", "0.94"): 2, ("ngram", "0.95"): 1, ("normalized", "0.8"): 1, ("minhash", "0.8"): 2, ("off", "0.8"): 0}
    for (method, threshold), dropped in expect.items():
        rc, out = run(tmp_path, src, "--test-fraction", "0", "--near-dup", method, "--near-dup-threshold", threshold,
                      name=f"{method}-{threshold}")
        assert rc == 0
        assert counts(out)["pairs_dropped"]["near_duplicate_prompt"] == dropped, (method, threshold)
        kept = [r["chosen"][0]["content"] for r in read(out)]
        assert kept[0] == "one" and kept[-1] == "seven"  # the first prompt of a cluster is kept


def test_length_limits_in_tokens_of_a_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    short, long_ = "Fine.", "Photosynthesis converts light energy into chemical energy stored in glucose molecules."
    rows = [row("Say something.", short, "Ok."), row("Say more.", long_, "Ok.")]
    src = write_jsonl(tmp_path / "len.jsonl", rows)
    limit = n(long_) - 1
    assert n(short) <= limit
    rc, out = run(tmp_path, src, "--test-fraction", "0", "--tokenizer", str(tiny_model_dir),
                  "--max-response-tokens", str(limit))
    assert rc == 0 and [r["chosen"][0]["content"] for r in read(out)] == [short]
    assert counts(out)["pairs_dropped"]["response_too_long"] == 1
    total = n("Say more.") + n(long_)
    rc, out = run(tmp_path, src, "--test-fraction", "0", "--tokenizer", str(tiny_model_dir),
                  "--max-total-tokens", str(total - 1), name="total")
    assert counts(out)["pairs_dropped"]["total_too_long"] == 1
    assert f"## Lengths (tokens ({tiny_model_dir}))" in (out / "stats.md").read_text()


# --------------------------------------------------------------------------- split


def many_rows(n_prompts=120, per_prompt=2, seed=0):
    rng = random.Random(seed)
    rows = [row(f"Question number {i}: what is {i} times {i + 1}?", f"{i * (i + 1)}", f"{i * (i + 1) + k + 1}")
            for i in range(n_prompts) for k in range(per_prompt)]
    rng.shuffle(rows)
    return rows


def test_split_is_by_prompt_deterministic_and_seeded(tmp_path):
    rows = many_rows()
    src = write_jsonl(tmp_path / "many.jsonl", rows)
    _, first = run(tmp_path, src, "--test-fraction", "0.3", "--seed", "1", name="a")
    _, again = run(tmp_path, src, "--test-fraction", "0.3", "--seed", "1", name="b")
    _, other = run(tmp_path, src, "--test-fraction", "0.3", "--seed", "2", name="c")
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", list(reversed(rows)))
    _, reordered = run(tmp_path, shuffled, "--test-fraction", "0.3", "--seed", "1", name="d")

    def prompts(out, split):
        return {r["prompt"][0]["content"] for r in read(out, split)}

    train, test = prompts(first, "train"), prompts(first, "test")
    assert train and test and not train & test  # a prompt never lands on both sides
    assert len(train | test) == 120
    assert sum(1 for r in read(first, "test") for _ in [0]) == 2 * len(test)  # both pairs of a test prompt are in test
    assert 0.15 < len(test) / 120 < 0.45
    for split in ("train", "test"):  # same seed: byte-identical outputs
        assert (first / "jsonl" / f"{split}.jsonl").read_bytes() == (again / "jsonl" / f"{split}.jsonl").read_bytes()
        assert (first / "data" / f"{split}.parquet").read_bytes() == (again / "data" / f"{split}.parquet").read_bytes()
    assert prompts(other, "test") != test  # another seed, another split
    assert prompts(reordered, "test") == test  # the split depends on the prompt, not on its position
    assert counts(first)["pairs_written"] == {"train": 2 * len(train), "test": 2 * len(test)}
    assert json.loads((first / "build.json").read_text())["distinct_prompts"] == {"train": len(train), "test": len(test)}


def test_grouping_is_the_same_across_many_shards(tmp_path, monkeypatch):
    _, one = run(tmp_path, FIX / "helpsteer.jsonl", "--test-fraction", "0", fmt="helpsteer", name="one")
    monkeypatch.setattr(grouping, "SHARD_BYTES", 64)  # ~20 shards for this small file
    _, many = run(tmp_path, FIX / "helpsteer.jsonl", "--test-fraction", "0", fmt="helpsteer", name="many")
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(read(one), key=key) == sorted(read(many), key=key) and len(read(one)) == 2


# --------------------------------------------------------------------------- outputs


def test_outputs_card_report_and_plots(tmp_path):
    out = tmp_path / "uf"
    assert main(["build", "--format", "ultrafeedback", "--input", str(FIX / "ultrafeedback.jsonl"),
                 "--output", str(out), "--test-fraction", "0"]) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "stats.md", "build.json", "dataset_dict.json", "data/train.parquet",
            "plots/lengths.png", "plots/margins.png", "plots/turns.png", "train/dataset_info.json"} <= names
    assert not any(n.startswith((".work", ".spill", ".cache", "jsonl/")) for n in names)
    for png in ("lengths", "margins", "turns"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.parquet\n")
    assert f"- command: `align-data build --format ultrafeedback --input {FIX / 'ultrafeedback.jsonl'} --output {out} --test-fraction 0`" in card
    assert "| input rows read | 3 |" in card and "| pairs written: train | 2 |" in card
    stats = (out / "stats.md").read_text()
    assert "2 pairs with scores: min 3.25, median 3.5, mean 3.5, max 3.75." in stats
    assert "chosen longer than rejected in **100.0%** of pairs (2 of 2)" in stats
    assert "| prompt | 2 | 4 | 4 | 4.0 | 4 | 4 |" in stats  # words: "Is the sky green?" and the other prompt
    assert "![score margin histogram](plots/margins.png)" in stats
    meta = json.loads((out / "build.json").read_text())
    assert meta["format"] == "ultrafeedback" and meta["options"]["pairing"] == "best-vs-worst"


def test_output_folder_rules(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run(tmp_path, FIX / "trl.jsonl", name="other")[0] == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output {other}: a folder with other content (not an align-data build); choose another path")
    assert (other / "notes.txt").read_text() == "mine"
    rc, out = run(tmp_path, FIX / "trl.jsonl", name="built")
    assert rc == 0
    capsys.readouterr()
    assert run(tmp_path, FIX / "trl.jsonl", name="built")[0] == 2
    assert capsys.readouterr().err.strip() == f"error: --output {out}: already holds a build; pass --overwrite to replace it"
    assert run(tmp_path, FIX / "shp.jsonl", "--overwrite", fmt="shp", name="built")[0] == 0
    assert json.loads((out / "build.json").read_text())["format"] == "shp"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_interrupted_or_failed_build_leaves_no_output(tmp_path, monkeypatch, capsys):
    from data_tools import clean

    rows = many_rows(n_prompts=3000, per_prompt=1)  # more than one batch
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    calls = {"n": 0}
    original = clean.Cleaner.process

    def interrupt_second_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(clean.Cleaner, "process", interrupt_second_batch)
    rc, out = run(tmp_path, src)
    assert rc == 130 and calls["n"] == 2
    assert capsys.readouterr().err.strip().endswith("interrupted: no output was written")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["big.jsonl"]
    monkeypatch.undo()
    # A bad row late in the input: the error, and nothing written either.
    with open(src, "a", encoding="utf-8") as f:
        f.write('{"prompt": "x", "chosen": 5, "rejected": "y"}\n')
    rc, out = run(tmp_path, src)
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"error: {src}:3001: field 'chosen': expected a string or a list of messages, got int"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["big.jsonl"]


# --------------------------------------------------------------------------- validate and stats


def test_validate_lists_every_problem_with_its_row(tmp_path, capsys):
    good = row("Q1?", "A.", "B.", score_chosen=2, score_rejected=1)
    lines = [
        json.dumps(good),
        '{"prompt": [{"role": "user", "content": "Q2?"}], "chosen": [{"role": "assistant", "content": "A."}]',
        json.dumps({"prompt": [u("Q3?")], "chosen": [a("A.")]}),
        json.dumps(row([u("Q4?"), u("again?")], "A.", "B.")),
        json.dumps(row("Q5?", " ", "B.")),
        json.dumps(row("Q6?", "Same.", "Same.")),
        json.dumps(good),
        json.dumps(row("Q8?", "A.", "B.", score_chosen=1, score_rejected=3)),
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(["validate", str(src)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{src}:2: malformed JSON: Expecting ',' delimiter (column {len(lines[1]) + 1})",
        f"{src}:3: field 'rejected' missing (a preference row has 'prompt', 'chosen', 'rejected')",
        f"{src}:4: 'prompt[1]' is a user turn where an assistant turn belongs (turns alternate from user)",
        f"{src}:5: 'chosen[0].content' is empty or whitespace",
        f"{src}:6: chosen identical to rejected",
        f"{src}:7: exact duplicate of {src}:1",
        f"{src}:8: score_chosen 1 is below score_rejected 3",
    ]
    assert err.strip() == f"{src}: 7 problems in 7 of 8 rows (train)"
    clean = tmp_path / "clean"
    clean.mkdir()
    write_jsonl(clean / "train.jsonl", [row("Q1?", "A.", "B."), row("Q2?", "A.", "B.")])
    write_jsonl(clean / "test.jsonl", [row("Q2?", "C.", "D.")])
    assert main(["validate", str(clean)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{clean / 'train.jsonl'}:2: prompt also in split 'test' (a prompt belongs to one split)"]
    (clean / "test.jsonl").unlink()
    assert main(["validate", str(clean)]) == 0
    assert capsys.readouterr().out.strip() == f"{clean}: 2 rows (train), no problems"


def test_stats_of_any_dataset(tmp_path, capsys):
    rows = [
        row("Tell me about the moon and its phases in detail please.", "The moon has phases.", "No.",
            score_chosen=5, score_rejected=1),
        row("tell me about the moon and its phases in detail please!", "It waxes and wanes.", "Cheese is tasty, really.",
            score_chosen=4, score_rejected=3),
        row([u("Hi"), a("Hello"), u("Count to three.")], "One two three.", "One two three four five.",
            score_chosen=3, score_rejected=1),
    ]
    src = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert main(["stats", str(src), "--output", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "| prefs | 3 | 3 |" in text  # one split named after the file, three distinct prompts
    assert "chosen longer than rejected in **33.3%** of pairs (1 of 3); shorter in 33.3%, equal in 33.3%." in text
    assert "3 pairs with scores: min 1, median 2, mean 2.33333, max 4." in text
    assert "| 1 | 2 |\n| 2 | 1 |" in text  # user turns: two single-turn prompts, one with two turns
    assert ("| 1 | 1 | Tell me about the moon and its phases in detail please. | "
            "tell me about the moon and its phases in detail please! |") in text
    assert (tmp_path / "report" / "stats.md").read_text().strip() == text.strip()
    assert (tmp_path / "report" / "plots" / "lengths.png").is_file()


def test_inputs_gz_folders_splits_and_limit(tmp_path):
    import gzip

    folder = tmp_path / "in"
    folder.mkdir()
    with gzip.open(folder / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps(row(f"Train question {i}?", "Yes.", "No.")) + "\n")
    write_jsonl(folder / "validation.jsonl", [row("Held-out question?", "Yes.", "No.")])
    rc, out = run(tmp_path, folder, "--test-fraction", "0", name="all")
    assert rc == 0 and counts(out)["rows_read"] == 6
    rc, out = run(tmp_path, folder, "--test-fraction", "0", "--split", "validation", name="val")
    assert [r["prompt"][0]["content"] for r in read(out)] == ["Held-out question?"]
    rc, out = run(tmp_path, folder, "--test-fraction", "0", "--split", "train", "--limit", "2", name="lim")
    assert [r["prompt"][0]["content"] for r in read(out)] == ["Train question 0?", "Train question 1?"]
    assert counts(out)["rows_read"] == 2


def test_push_to_hub_uploads_the_card_parquet_and_report(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    rc, out = run(tmp_path, FIX / "trl.jsonl", "--push-to-hub", "me/prefs", "--private")
    assert rc == 0
    assert calls[0] == ("create", "me/prefs", {"repo_type": "dataset", "private": True, "exist_ok": True})
    upload = calls[1][2]
    assert upload["folder_path"] == str(out) and upload["repo_type"] == "dataset"
    assert upload["allow_patterns"] == ["README.md", "data/*.parquet", "stats.md", "plots/*.png", "build.json"]
    assert "pushed" in capsys.readouterr().out

    class Offline(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    rc, out = run(tmp_path, FIX / "trl.jsonl", "--push-to-hub", "me/prefs", name="offline")
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"error: --push-to-hub me/prefs: the build is in {out}, but pushing failed: no network"
    assert (out / "build.json").is_file()


def test_terminated_build_process_leaves_no_output(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = write_jsonl(tmp_path / "big.jsonl", many_rows(n_prompts=60000, per_prompt=1))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", "build", "--format", "trl", "--input", str(src),
                             "--output", str(out), "--no-plots"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
        time.sleep(0.05)  # wait until the temporary folder beside the output exists
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("interrupted: no output was written"), (proc.returncode, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]
    assert os.path.getsize(src) > 0
