"""Data loading: canonical formats, normalization, and errors that name file, line and field."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from align.core.config import DataConfig
from align.core.data import load_splits, read_splits
from align.core.normalize import normalize_preference, normalize_sft
from align.core.errors import DataError


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def test_bundled_demo_sets_load_with_held_out_splits():
    sft = load_splits(DataConfig(path="bundled:demo-sft"), "sft", seed=0)
    prefs = load_splits(DataConfig(path="bundled:demo-prefs"), "preference", seed=0)
    assert len(sft.train) > 500 and len(sft.eval) > 100
    assert len(prefs.train) > 1000 and len(prefs.eval) >= 250
    assert sft.notes == [] and prefs.notes == []
    info = prefs.info()
    assert info["hash"].startswith("sha256:") and info["rows"] == {"train": len(prefs.train), "eval": len(prefs.eval)}


def test_unknown_bundled_name_lists_available():
    with pytest.raises(DataError, match="available: .*demo-prefs"):
        read_splits("bundled:nope")


def test_sft_row_shapes_normalize_to_messages():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert normalize_sft(chat, "w") == chat
    pc = normalize_sft({"prompt": "hi", "completion": "hello"}, "w")
    assert pc == chat
    alpaca = normalize_sft({"instruction": "Sum", "input": "1 2", "output": "3"}, "w")
    assert alpaca["messages"][0]["content"] == "Sum\n\n### Input:\n1 2"
    assert normalize_sft({"instruction": "Hi", "input": "", "output": "Yo"}, "w")["messages"][0]["content"] == "Hi"


def test_preference_shapes_normalize():
    p = [{"role": "user", "content": "q"}]
    c = [{"role": "assistant", "content": "good"}]
    r = [{"role": "assistant", "content": "bad"}]
    explicit = normalize_preference({"prompt": p, "chosen": c, "rejected": r}, "w")
    assert explicit == {"prompt": p, "chosen": c, "rejected": r}
    assert normalize_preference({"prompt": "q", "chosen": "good", "rejected": "bad"}, "w") == explicit
    implicit = normalize_preference({"chosen": p + c, "rejected": p + r}, "w")
    assert implicit == explicit
    multi = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "q"}]
    assert normalize_preference({"chosen": multi + c, "rejected": multi + r}, "w")["prompt"] == multi


def test_a_preference_row_trains_sft_on_its_chosen_answer(tmp_path):
    """One built preference dataset feeds SFT (its chosen answers) and DPO; the notes say so."""
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
           "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}
    assert normalize_sft(row, "x") == {"messages": row["prompt"] + row["chosen"]}
    assert normalize_sft({"prompt": "q", "chosen": "good", "rejected": "bad"}, "x")["messages"][-1] == {"role": "assistant", "content": "good"}
    with pytest.raises(DataError, match="^x: field 'rejected' missing"):
        normalize_sft({"prompt": "q", "chosen": "good"}, "x")
    path = write_jsonl(tmp_path / "prefs.jsonl", [row] * 3 + [{"messages": row["prompt"] + row["chosen"]}])
    splits = load_splits(cfg(path, eval_fraction=0.0), "sft", seed=0)
    assert len(splits.train) == 4 and "SFT on the chosen answers of 3 preference rows (their rejected answers are not used)" in splits.notes


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "field 'messages[0].role': 'bot' is not one of"),
        ({"messages": [{"role": "user"}]}, "field 'messages[0].content' missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content': expected a string, got int"),
        ({"text": "plain"}, "field 'messages' missing"),
        ({"messages": "hello"}, "expected a non-empty list of messages, got str"),
    ],
)
def test_bad_sft_rows_name_the_field(row, needle):
    with pytest.raises(DataError, match=rf"^f\.jsonl:7: .*{__import__('re').escape(needle)}"):
        normalize_sft(row, "f.jsonl:7")


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "q", "chosen": "a"}, "field 'rejected' missing"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "must be strings too"),
        ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}, "must be from the user"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}, "share no prompt prefix"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen[0].role"),
    ],
)
def test_bad_preference_rows_name_the_field(row, needle):
    with pytest.raises(DataError) as err:
        normalize_preference(row, "p.jsonl:3")
    assert str(err.value).startswith("p.jsonl:3: ") and needle in str(err.value)


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"messages": []}\n\n{"messages": [oops]}\n')
    with pytest.raises(DataError, match=rf"{bad_json}:3: malformed JSON"):
        read_splits(str(bad_json))
    bad_utf8 = tmp_path / "utf8.jsonl"
    bad_utf8.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{bad_utf8}:2: invalid UTF-8"):
        read_splits(str(bad_utf8))
    missing_field = write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=rf"{missing_field}:2: field 'rejected' missing"):
        load_splits(cfg(missing_field), "preference", seed=0)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_splits(str(tmp_path / "none.jsonl"))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_splits(str(odd))


def test_single_file_is_split_deterministically(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    a = load_splits(cfg(path, eval_fraction=0.25), "preference", seed=3)
    b = load_splits(cfg(path, eval_fraction=0.25), "preference", seed=3)
    c = load_splits(cfg(path, eval_fraction=0.25), "preference", seed=4)
    assert len(a.eval) == 10 and len(a.train) == 30
    assert a.eval == b.eval and a.eval != c.eval
    assert not ({json.dumps(r) for r in a.eval} & {json.dumps(r) for r in a.train})
    assert "held out 10 of the training rows" in a.notes[0]
    capped = load_splits(cfg(path, eval_fraction=0.25, max_train_samples=5), "preference", seed=3)
    assert len(capped.train) == 5 and any("first 5 of 30" in n for n in capped.notes)


def test_directory_of_split_files_and_csv(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    (folder / "test.csv").write_text('prompt,chosen,rejected\nq2,a2,b2\nq3,,b3\n')
    splits = read_splits(str(folder))
    assert set(splits) == {"train", "test"}
    where, row = splits["test"][1]
    assert where.endswith("test.csv:3") and row["prompt"] == "q3"
    with pytest.raises(DataError, match=r"test\.csv:3: field 'chosen' missing"):
        load_splits(cfg(folder), "preference", seed=0)


def test_saved_dataset_directory(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "saved")
    splits = load_splits(cfg(tmp_path / "saved"), "sft", seed=0)
    assert len(splits.train) == 3 and len(splits.eval) == 1
