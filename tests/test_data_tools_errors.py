"""align-data build on bad input: each kind of error names the file, line and field, exits with
status 2 and writes nothing; --skip-invalid skips the rows instead and counts them by reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.cli import main

HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}


def hh(i: int) -> dict:
    return {"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Good answer {i}.",
            "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: Bad answer {i}."}


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def fails(tmp_path, capsys, fmt, src, *extra) -> str:
    out = tmp_path / "out"
    assert main(["build", "--format", fmt, "--input", str(src), "--output", str(out), "--no-plots", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return err[len("error: "):]


@pytest.mark.parametrize(
    "content, expected",
    [
        (line(hh(1)) + line(hh(2)) + b'{"chosen": "x", "rejected": \n', "{src}:3: malformed JSON: Expecting value (column 29)"),
        (line(hh(1)) + line({"chosen": HH["chosen"]}), "{src}:2: field 'rejected' missing"),
        (line(hh(1)) + line(hh(2)) + line(hh(3)) + line({"chosen": 5, "rejected": "x"}),
         "{src}:4: field 'chosen': expected a string, got int"),
        (line(hh(1)) + b'{"chosen": "\xff\xfe", "rejected": "x"}\n', "{src}:2: invalid UTF-8 at byte 12 of the line"),
        (line(hh(1)) + line(["not", "an", "object"]), "{src}:2: expected a JSON object, got a list"),
    ],
    ids=["malformed-line", "missing-field", "wrong-type", "invalid-utf8", "not-an-object"],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, capsys, content, expected):
    src = tmp_path / "hh.jsonl"
    src.write_bytes(content)
    assert fails(tmp_path, capsys, "hh-rlhf", src) == expected.format(src=src)


def test_duplicate_ranks_in_a_row_across_rows_and_in_a_message_tree(tmp_path, capsys):
    nectar = tmp_path / "nectar.jsonl"
    answers = [{"answer": f"a{i}", "model": f"m{i}", "rank": r} for i, r in enumerate([1.0, 2.0, 3.0, 2.0])]
    nectar.write_bytes(line({"prompt": "\n\nHuman: Hi\n\nAssistant: ", "answers": answers[:3], "turns": 1,
                             "num_responses": 3, "source": ["x"], "good_natured": True})
                       + line({"prompt": "\n\nHuman: Yo\n\nAssistant: ", "answers": answers, "turns": 1,
                               "num_responses": 4, "source": ["x"], "good_natured": True}))
    assert fails(tmp_path, capsys, "nectar", nectar) == (
        f"{nectar}:2: field 'answers[3].rank': rank 2 repeats the rank of answers[1].rank (a ranking needs distinct ranks)")

    ranked = tmp_path / "ranked.jsonl"
    ranked.write_bytes(b"".join(line(r) for r in [
        {"prompt": "P", "response": "x", "rank": 1}, {"prompt": "Q", "response": "y", "rank": 1},
        {"prompt": "P", "response": "z", "rank": 2}, {"prompt": "P", "response": "w", "rank": 1}]))
    assert fails(tmp_path, capsys, "ranked", ranked) == (
        f"{ranked}:4: field 'rank': rank 1 repeats the rank of {ranked}:1 (rank) (a ranking needs distinct ranks)")

    oasst = tmp_path / "oasst.jsonl"
    base = {"role": "assistant", "message_tree_id": "t", "deleted": False, "lang": "en"}
    oasst.write_bytes(b"".join(line(r) for r in [
        {**base, "message_id": "p", "parent_id": None, "role": "prompter", "text": "Hi", "rank": None},
        {**base, "message_id": "a", "parent_id": "p", "text": "Hello", "rank": 0},
        {**base, "message_id": "b", "parent_id": "p", "text": "Hey", "rank": 0}]))
    assert fails(tmp_path, capsys, "oasst", oasst) == (
        f"{oasst}:3: field 'rank': rank 0 repeats the rank of {oasst}:2 (rank) (a ranking needs distinct ranks)")


def test_csv_and_json_errors_have_their_lines(tmp_path, capsys):
    csv_src = tmp_path / "ratings.csv"
    csv_src.write_text('prompt,response,score\nQ1,"first\nanswer",3\nQ1,second,high\n', encoding="utf-8")
    assert fails(tmp_path, capsys, "ratings", csv_src) == f"{csv_src}:4: field 'score': expected a number, got string 'high'"
    csv_src.write_text("prompt,response,score\nQ1,only two\n", encoding="utf-8")
    assert fails(tmp_path, capsys, "ratings", csv_src) == f"{csv_src}:2: malformed CSV: 2 cells for 3 columns"

    json_src = tmp_path / "pairs.json"
    json_src.write_text(json.dumps([hh(1), hh(2), {"chosen": "x"}], indent=1), encoding="utf-8")
    assert fails(tmp_path, capsys, "hh-rlhf", json_src) == f"{json_src}:10: field 'rejected' missing"
    json_src.write_text('[\n {"chosen": "a", "rejected": "b"},\n {"chosen": "a" "rejected": "b"}\n]\n', encoding="utf-8")
    assert fails(tmp_path, capsys, "hh-rlhf", json_src) == f"{json_src}:3: malformed JSON: Expecting ',' delimiter"


def test_format_fields_and_values(tmp_path, capsys):
    src = tmp_path / "uf.jsonl"
    src.write_bytes(line({"instruction": "Hi", "completions": [{"response": "Hello", "fine-grained_score": 4},
                                                               {"response": "Yo"}]}))
    assert fails(tmp_path, capsys, "ultrafeedback", src) == f"{src}:1: field 'completions[1].fine-grained_score' missing"
    src = tmp_path / "shp.jsonl"
    src.write_bytes(line({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2, "score_A": 3, "score_B": 1}))
    assert fails(tmp_path, capsys, "shp", src) == f"{src}:1: field 'labels': expected one of 0, 1, got 2"
    src = tmp_path / "trl.jsonl"
    src.write_bytes(line({"chosen": "a", "rejected": "b"}))
    assert fails(tmp_path, capsys, "trl", src) == (
        f"{src}:1: field 'prompt' missing (plain-text chosen/rejected need an explicit prompt; "
        "an implicit prompt is the messages the two conversations share)")


def test_skip_invalid_counts_each_reason(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    src.write_bytes(
        line(hh(1))
        + b'{"chosen": "x", \n'  # malformed JSON
        + line(hh(2))
        + line({"chosen": hh(3)["chosen"]})  # missing field
        + b'{"chosen": "\xff", "rejected": "x"}\n'  # invalid UTF-8
        + line({"chosen": 1, "rejected": 2})  # wrong type
        + line([1, 2])  # not an object
        + b"\n"  # blank lines are not rows
        + line(hh(4))
        + b'{"chosen": "y", \n'  # malformed JSON again
    )
    out = tmp_path / "out"
    assert main(["build", "--format", "hh-rlhf", "--input", str(src), "--output", str(out), "--no-plots",
                 "--skip-invalid", "--test-fraction", "0", "--jsonl"]) == 0
    c = json.loads((out / "build.json").read_text())["counts"]
    assert c["rows_read"] == 9
    assert c["invalid_rows"] == {"invalid_json": 2, "missing_field": 1, "invalid_utf8": 1, "wrong_type": 1, "not_a_mapping": 1}
    assert c["pairs_written"] == {"train": 3} and c["pairs_formed"] == 3
    assert [json.loads(x)["id"] for x in (out / "jsonl" / "train.jsonl").read_text().splitlines()] == [
        "hh.jsonl:1", "hh.jsonl:3", "hh.jsonl:9"]
    report = (out / "stats.md").read_text()
    assert "| invalid rows skipped (--skip-invalid) | 6 |" in report
    assert "| invalid input | malformed JSON line | 2 |" in report and "| invalid input | invalid UTF-8 | 1 |" in report
    assert "6 invalid rows skipped" in capsys.readouterr().out


def test_skip_invalid_skips_a_whole_group_with_duplicate_ranks(tmp_path):
    src = tmp_path / "ranked.jsonl"
    src.write_bytes(b"".join(line(r) for r in [
        {"prompt": "P", "response": "x", "rank": 1}, {"prompt": "Q", "response": "y", "rank": 1},
        {"prompt": "P", "response": "z", "rank": 1}, {"prompt": "Q", "response": "w", "rank": 2}]))
    out = tmp_path / "out"
    assert main(["build", "--format", "ranked", "--input", str(src), "--output", str(out), "--no-plots",
                 "--skip-invalid", "--test-fraction", "0"]) == 0
    c = json.loads((out / "build.json").read_text())["counts"]
    assert c["invalid_rows"] == {"duplicate_rank": 2} and c["pairs_written"] == {"train": 1}


def test_no_pairs_left_is_an_error_with_the_counts(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    src.write_bytes(line({"chosen": "\n\nHuman: Hi\n\nAssistant: Same.", "rejected": "\n\nHuman: Hi\n\nAssistant: Same."}))
    out = tmp_path / "out"
    assert main(["build", "--format", "hh-rlhf", "--input", str(src), "--output", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "| cleaning | chosen identical to rejected | 1 |" in err
    assert err.strip().splitlines()[-1] == f"error: no pairs left to write from {src} (the counts above say where they went)"
    assert not out.exists()


def test_missing_input_and_bad_options(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["build", "--format", "hh-rlhf", "--input", str(tmp_path / "nope.jsonl"), "--output", out]) == 2
    assert capsys.readouterr().err.strip() == f"error: --input '{tmp_path / 'nope.jsonl'}': no such file or directory"
    src = tmp_path / "x.txt"
    src.write_text("hello")
    assert main(["build", "--format", "hh-rlhf", "--input", str(src), "--output", out]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    src = tmp_path / "x.jsonl"
    src.write_bytes(line(hh(1)))
    for flags, message in [
        (["--test-fraction", "1"], "--test-fraction: must be in [0, 1), got 1"),
        (["--min-margin", "-1"], "--min-margin: must be >= 0, got -1"),
        (["--near-dup-threshold", "0"], "--near-dup-threshold: must be in (0, 1], got 0"),
    ]:
        assert main(["build", "--format", "hh-rlhf", "--input", str(src), "--output", out, *flags]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not Path(out).exists()
