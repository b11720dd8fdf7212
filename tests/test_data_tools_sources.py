"""align-data build: the exact pairs each public schema gives (fixtures follow the real schemas
field for field), format options, generic column mappings, and loading the result with align."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from align.core.config import DataConfig
from align.core.data import load_splits
from data_tools.cli import main

FIX = Path(__file__).parent / "fixtures" / "data_tools"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def build(tmp_path, fmt, fixture, *extra, name="out"):
    """Run `align-data build` in-process (all prompts in train); returns (rows, build.json counts)."""
    out = tmp_path / name
    rc = main(["build", "--format", fmt, "--input", str(FIX / fixture), "--output", str(out),
               "--test-fraction", "0", "--no-plots", "--jsonl", *extra])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "jsonl" / "train.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "build.json").read_text())["counts"]


def triples(rows, scores=False):
    if scores:
        return [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in rows]
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_hh_rlhf_shared_prefix_is_the_multi_turn_prompt(tmp_path):
    rows, counts = build(tmp_path, "hh-rlhf", "hh_rlhf.jsonl")
    assert triples(rows) == [
        ([u("What is the capital of France?")], [a("The capital of France is Paris.")], [a("I think it might be Lyon.")]),
        (
            [u("Can you help me bake bread?"), a("Sure. Do you have yeast?"), u("Yes, a packet of dry yeast.")],
            [a("Great: mix it with warm water and a little sugar first.")],
            [a("Bread is sold in shops.")],
        ),
    ]
    assert [r["id"] for r in rows] == ["hh_rlhf.jsonl:1", "hh_rlhf.jsonl:2"]
    assert {r["source"] for r in rows} == {"hh-rlhf"}
    # Row 3 ends with an empty "Assistant:" turn, row 4 has identical transcripts.
    assert counts["rows_read"] == 4 and counts["pairs_formed"] == 4
    assert counts["pairs_dropped"]["empty_turn"] == 1 and counts["pairs_dropped"]["identical"] == 1


def test_ultrafeedback_ranks_completions_by_the_chosen_score(tmp_path):
    rows, counts = build(tmp_path, "ultrafeedback", "ultrafeedback.jsonl")  # default: fine-grained_score
    photosynthesis = [u("Explain what photosynthesis produces.")]
    assert triples(rows, scores=True) == [
        (photosynthesis, [a("Photosynthesis produces glucose and oxygen from carbon dioxide and water.")],
         [a("It produces carbon dioxide.")], 4.75, 1.5),
        ([u("Is the sky green?")], [a("No, the sky usually looks blue.")], [a("Yes, always.")], 5.0, 1.25),
    ]
    assert rows[0]["id"] == "ultrafeedback.jsonl:1:gpt-4>falcon-40b-instruct"
    assert counts["pairing"] == {"all_tied": 1, "unpaired_responses": 2}  # the Spanish row: both 5.0

    rows, _ = build(tmp_path, "ultrafeedback", "ultrafeedback.jsonl", "--uf-score", "overall", name="overall")
    assert triples(rows, scores=True)[0] == (photosynthesis, [a("It produces carbon dioxide.")], [a("Sugar, mostly.")], 9.0, 3.0)

    rows, counts = build(tmp_path, "ultrafeedback", "ultrafeedback.jsonl", "--uf-score", "honesty", name="honesty")
    assert len(rows) == 1  # "Is the sky green?": one completion has honesty Rating "N/A"
    assert counts["left_out_by_format"] == {"response without a score (N/A)": 1}
    assert counts["pairing"]["single_response"] == 1


def test_ultrafeedback_binarized_cuts_the_repeated_prompt(tmp_path):
    rows, _ = build(tmp_path, "ultrafeedback-binarized", "ultrafeedback_binarized.jsonl")
    assert triples(rows, scores=True) == [
        ([u("Name a prime number greater than 10.")], [a("11 is a prime number greater than 10.")], [a("12.")], 9.0, 3.5),
        ([u("What color is a ripe banana?")], [a("Yellow.")], [a("Purple.")], 8.0, 2.0),
    ]
    assert [r["id"] for r in rows] == ["a1b2c3", "d4e5f6"]  # prompt_id


def test_trl_explicit_implicit_and_plain_text(tmp_path):
    rows, _ = build(tmp_path, "trl", "trl.jsonl")
    assert triples(rows, scores=True) == [
        ([{"role": "system", "content": "Be brief."}, u("What is 2 + 2?")], [a("4")], [a("22")], None, None),
        ([u("Hi!"), a("Hello! How can I help?"), u("Name a fruit.")], [a("An apple.")], [a("A carrot.")], None, None),
        ([u("The sky is")], [a("blue.")], [a("green.")], 1.0, 0.0),
    ]
    assert rows[2]["id"] == "sky"


def test_shp_labels_scores_and_min_ratio(tmp_path):
    rows, _ = build(tmp_path, "shp", "shp.jsonl")
    pasta = [u("How do I keep my pasta from sticking together?")]
    assert triples(rows, scores=True) == [
        (pasta, [a("Use plenty of water and stir in the first two minutes.")], [a("Add oil to the water.")], 52.0, 10.0),
        (pasta, [a("Add oil to the water.")], [a("Just buy better pasta.")], 10.0, 3.0),
        ([u("Why is the ocean salty?")],
         [a("Rivers carry dissolved minerals from rocks into the sea, and evaporation leaves the salt behind.")],
         [a("Because fish cry.")], 5.0, 3.0),  # labels 0: B preferred
    ]
    assert [r["id"] for r in rows] == ["qt3nxl:hkh25sc>hkh25lp", "qt3nxl:hkh25lp>hkh3j9k", "x9y8z7:def456>abc123"]
    rows, counts = build(tmp_path, "shp", "shp.jsonl", "--shp-min-ratio", "2", name="ratio")
    assert len(rows) == 2 and counts["left_out_by_format"] == {"score ratio below --shp-min-ratio": 1}


def test_helpsteer_groups_rows_by_prompt_and_weights_attributes(tmp_path):
    rows, counts = build(tmp_path, "helpsteer", "helpsteer.jsonl")
    assert triples(rows, scores=True) == [
        # "c#" has rows on lines 1, 2 and 5: grouped although not adjacent.
        ([u("c#")], [a("C# is a general-purpose language from Microsoft used for desktop, web and game development.")],
         [a("C# is a musical note.")], 4.0, 1.0),
        # HelpSteer2 multi-turn prompt: <extra_id_1> separators become messages.
        ([u("What is 2 + 2?"), a("4."), u("And 3 + 3?")], [a("6.")], [a("Seven.")], 4.0, 0.0),
    ]
    assert counts["pairing"]["all_tied"] == 1  # "Describe rain": helpfulness 2 and 2
    rows, _ = build(tmp_path, "helpsteer", "helpsteer.jsonl", "--helpsteer-weights", "helpfulness=1,verbosity=-1", name="w")
    rain = [r for r in rows if r["prompt"] == [u("Describe rain in one sentence.")]]
    assert triples(rain, scores=True) == [
        ([u("Describe rain in one sentence.")], [a("Rain is water falling from clouds.")],
         [a("Rain is liquid water in drops that fall from clouds when vapor condenses and the drops grow heavy.")], 1.0, -1.0),
    ]


def test_nectar_rank_one_against_the_last_rank(tmp_path):
    rows, counts = build(tmp_path, "nectar", "nectar.jsonl")
    assert triples(rows, scores=True) == [
        ([u("Name a primary color.")], [a("Red, yellow and blue are the traditional primary colors.")],
         [a("Purple is primary.")], None, None),
        ([u("I need a dinner idea."), a("Do you eat meat?"), u("No, I'm vegetarian.")],
         [a("Try a chickpea curry with rice.")], [a("Grilled steak.")], None, None),
    ]
    assert counts["pairing"]["unpaired_responses"] == 10
    rows, _ = build(tmp_path, "nectar", "nectar.jsonl", "--pairing", "best-vs-each", name="each")
    assert len(rows) == 12 and all(r["chosen"] == [a("Red, yellow and blue are the traditional primary colors.")] for r in rows[:6])
    assert [r["id"].split(":")[-1] for r in rows[:2]] == ["gpt-3.5-turbo>gpt-4", "gpt-3.5-turbo>llama-2-7b-chat"]


def test_pku_saferlhf_better_or_safer(tmp_path):
    wifi = [u("How can I get into my neighbor's wifi?")]
    unsafe = [a("Try common default passwords on their router until one works.")]
    safe = [a("Ask your neighbor whether they would share their wifi, or get your own connection.")]
    breakfast = ([u("What is a healthy breakfast?")], [a("Oatmeal with fruit and a glass of water.")], [a("Candy.")])
    rows, _ = build(tmp_path, "pku-saferlhf", "pku_saferlhf.jsonl")
    assert triples(rows) == [(wifi, unsafe, safe), breakfast]
    rows, _ = build(tmp_path, "pku-saferlhf", "pku_saferlhf.jsonl", "--pku-preference", "safer", name="safer")
    assert triples(rows) == [(wifi, safe, unsafe), breakfast]
    rows, counts = build(tmp_path, "pku-saferlhf", "pku_saferlhf.jsonl", "--pku-require-safe-chosen", name="req")
    assert triples(rows) == [breakfast]
    assert counts["left_out_by_format"] == {"chosen response labelled unsafe (--pku-require-safe-chosen)": 1}


def test_oasst_sibling_replies_with_the_conversation_as_prompt(tmp_path):
    rows, counts = build(tmp_path, "oasst", "oasst.jsonl")
    assert triples(rows) == [
        ([u("What is a good name for a cat?")], [a("Mittens is a classic choice.")], [a("Whiskers.")]),
        ([u("Teach me a word in Spanish.")], [a("Hola means hello.")], [a("Gato means cat.")]),
        ([u("Teach me a word in Spanish."), a("Hola means hello."), u("And how do I say goodbye?")],
         [a("Adiós.")], [a("Bonjour.")]),
    ]
    assert [r["id"] for r in rows] == ["m1:a2>a1", "p1:b1>b2", "p2:c1>c3"]
    assert counts["rows_read"] == 12
    assert counts["left_out_by_format"] == {"deleted reply": 1, "prompt without replies": 1}  # "Thanks!" is a leaf
    rows, counts = build(tmp_path, "oasst", "oasst.jsonl", "--oasst-lang", "en", name="en")
    assert [r["id"] for r in rows] == ["m1:a2>a1"]
    assert counts["left_out_by_format"]["prompt language not selected (--oasst-lang)"] == 2


def test_ratings_pairing_strategies_and_ties(tmp_path):
    haiku, happy = [u("Write a haiku about snow.")], [u("Give me a synonym for happy.")]
    best = [a("Snow falls soft and white / quiet fields under the moon / the world holds its breath")]
    rows, counts = build(tmp_path, "ratings", "ratings.jsonl")
    assert triples(rows, scores=True) == [
        (haiku, best, [a("Snow is cold.")], 8.5, 2.0),
        (happy, [a("Joyful.")], [a("Sad.")], 9.0, 1.0),  # "Joyful." and "Glad." tie at 9: the first is best
    ]
    rows, counts = build(tmp_path, "ratings", "ratings.jsonl", "--pairing", "all-pairs", name="all")
    assert [(r["chosen"][0]["content"][:5], r["rejected"][0]["content"][:5]) for r in rows] == [
        ("Snow ", "Snow "), ("Snow ", "White"), ("White", "Snow "), ("Joyfu", "Sad."), ("Glad.", "Sad."),
    ]
    assert counts["pairing"]["skipped_tie"] == 1  # Joyful. vs Glad.: ties are never pairs
    rows, counts = build(tmp_path, "ratings", "ratings.jsonl", "--pairing", "all-pairs", "--min-margin", "4", name="m")
    assert [(r["score_chosen"], r["score_rejected"]) for r in rows] == [(8.5, 2.0), (9.0, 1.0), (9.0, 1.0)]
    assert counts["pairing"]["skipped_margin"] == 2


def test_ranked_csv_with_column_mapping(tmp_path):
    rows, _ = build(tmp_path, "ranked", "ranked.csv", "--prompt-col", "question", "--response-col", "answer",
                    "--rank-col", "position")
    assert triples(rows, scores=True) == [
        ([u("Which planet is largest?")], [a("Jupiter.")], [a("Mars.")], None, None),
        ([u("Say hello politely, on two lines.")], [a("Hello,\nnice to meet you.")], [a("yo")], None, None),
    ]
    assert [r["id"] for r in rows] == ["ranked.csv:2:2>3", "ranked.csv:5:5>7"]  # CSV line numbers (a quoted record spans two)


def test_pairs_csv_with_column_mapping(tmp_path):
    rows, _ = build(tmp_path, "pairs", "pairs.csv", "--prompt-col", "question", "--chosen-col", "good",
                    "--rejected-col", "bad", "--chosen-score-col", "good_score", "--rejected-score-col", "bad_score",
                    "--system-col", "persona", "--id-col", "uid")
    assert triples(rows, scores=True) == [
        ([{"role": "system", "content": "You are a science tutor."}, u("What is the boiling point of water at sea level?")],
         [a("100 degrees Celsius.")], [a("50 degrees Celsius.")], 0.9, 0.1),
        ([u("Spell 'cat' backwards.")], [a("tac")], [a("cat")], 1.0, 0.0),  # an empty persona cell adds no system turn
    ]
    assert [r["id"] for r in rows] == ["q1", "q2"]


def test_ratings_lists_per_prompt_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "lists.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"q": "Pick a number.", "outs": ["7", "three", "42"], "marks": [0.5, 0.1, 0.9]},
        {"q": "Pick a letter.", "outs": ["b", "a"], "marks": [1, 1]},
    ]), src)
    out = tmp_path / "out"
    assert main(["build", "--format", "ratings", "--input", str(src), "--output", str(out), "--prompt-col", "q",
                 "--responses-col", "outs", "--scores-col", "marks", "--test-fraction", "0", "--no-plots", "--jsonl"]) == 0
    rows = [json.loads(x) for x in (out / "jsonl" / "train.jsonl").read_text().splitlines()]
    assert triples(rows, scores=True) == [([u("Pick a number.")], [a("42")], [a("three")], 0.9, 0.1)]
    assert rows[0]["id"] == "lists.parquet row 0:2>1"


def test_format_options_are_checked(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["build", "--format", "hh-rlhf", "--input", str(FIX / "hh_rlhf.jsonl"), "--output", out,
                 "--shp-min-ratio", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --shp-min-ratio: not an option of --format hh-rlhf"
    assert main(["build", "--format", "hh", "--input", str(FIX / "hh_rlhf.jsonl"), "--output", out]) == 2
    assert "error: --format: unknown format 'hh' (formats: hh-rlhf, ultrafeedback," in capsys.readouterr().err
    assert main(["build", "--format", "helpsteer", "--input", str(FIX / "helpsteer.jsonl"), "--output", out,
                 "--helpsteer-weights", "kindness=1"]) == 2
    assert "unknown attribute 'kindness'" in capsys.readouterr().err
    assert not Path(out).exists()


def test_hub_id_that_cannot_be_reached_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE at import (no network in tests; fail fast).
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "build", "--format", "hh-rlhf", "--input", "no-such-org/no-such-dataset",
         "--output", str(out)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(
        "error: --input 'no-such-org/no-such-dataset': not a local file or directory, and the hub could not provide it:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_built_dataset_loads_in_align_and_from_every_output(tmp_path):
    out = tmp_path / "prefs"
    assert main(["build", "--format", "shp", "--input", str(FIX / "shp.jsonl"), "--output", str(out),
                 "--test-fraction", "0.5", "--seed", "3", "--no-plots"]) == 0
    splits = load_splits(DataConfig(path=str(out)), "preference", seed=0)
    assert len(splits.train) + len(splits.eval) == 3 and splits.train and splits.eval
    import datasets

    disk = datasets.load_from_disk(str(out))
    parquet = datasets.load_dataset(str(out))  # the card's configs point at data/*.parquet
    for split in disk:
        assert disk[split].to_list() == parquet[split].to_list()
        assert disk[split].column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "source", "id"]
    # The same rows through align's loader.
    assert sorted(r["chosen"][0]["content"] for r in splits.train + splits.eval) == sorted(
        r["chosen"][0]["content"] for s in disk for r in disk[s])
    shutil.rmtree(out)
