"""align-data generate: K samples per prompt from a model, judged, paired (tiny random model;
the embedded SmolLM2 run is marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.core.config import DataConfig
from align.core.data import load_splits
from align.evaluation.judges import AnswerJudge, JudgeSpecError
from data_tools.cli import main

PROMPTS = [
    {"prompt": "Name a fruit.", "answer": "apple"},
    {"prompt": "Say hi.", "answer": "hi"},
    {"prompt": "Count to three.", "answer": ["one two three", "1 2 3"]},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}], "answer": "4"},
    {"prompt": "Say hi."},  # a repeated prompt is generated once
]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


@pytest.fixture
def scorer(tmp_path, monkeypatch) -> str:
    """A user's own scorer, loaded as module:function: the response length in characters."""
    (tmp_path / "my_scorer.py").write_text("def chars(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scorer:chars"


def generate(model_dir, prompts, out, *extra, k=4):
    return main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--num-samples", str(k),
                 "--max-new-tokens", "8", "--output", str(out), "--test-fraction", "0", "--no-plots", "--jsonl",
                 "--device", "cpu", *extra])


def rows_of(out: Path):
    path = out / "jsonl" / "train.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def samples_of(out: Path):
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def test_generate_with_a_python_scorer(tmp_path, tiny_model_dir, prompts_file, scorer):
    out = tmp_path / "gen"
    assert generate(tiny_model_dir, prompts_file, out, "--judge", scorer) == 0
    samples = samples_of(out)
    assert [s["prompt"][-1]["content"] for s in samples] == ["Name a fruit.", "Say hi.", "Count to three.", "What is 2 + 2?"]
    assert all(len(s["responses"]) == 4 and s["scores"] == [float(len(r)) for r in s["responses"]] for s in samples)
    rows = rows_of(out)
    assert len(rows) == 4  # sampled at T=1, a random model never gives 4 equally long responses
    for r, s in zip(rows, samples):
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["prompt"] == s["prompt"] and r["score_chosen"] > r["score_rejected"]
        assert (r["score_chosen"], r["score_rejected"]) == (len(chosen), len(rejected))
        assert chosen == max(s["responses"], key=len) and rejected == min(s["responses"], key=len)
    assert r["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]  # the assistant turn of `messages` is cut
    meta = json.loads((out / "build.json").read_text())
    assert meta["counts"]["rows_read"] == 5 and meta["counts"]["left_out_by_format"] == {"duplicate prompt": 1}
    assert meta["judge"]["spec"] == "my_scorer:chars" and meta["sampling"]["num_samples"] == 4
    assert meta["model"] == str(tiny_model_dir) and meta["format"] == "generate"
    splits = load_splits(DataConfig(path=str(out), eval_split=None, eval_fraction=0.0), "preference", seed=0)
    assert len(splits.train) == 4


def test_generate_with_a_built_in_rule_judge(tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "gen"
    assert generate(tiny_model_dir, prompts_file, out, "--judge", "length", "--judge-arg", "max_words=5", k=6) == 0
    samples, rows = samples_of(out), rows_of(out)
    mixed = [s for s in samples if set(s["scores"]) == {0.0, 1.0}]
    assert len(rows) == len(mixed) > 0  # a pair wherever the judge told samples apart, nowhere else
    for r in rows:
        assert (r["score_chosen"], r["score_rejected"]) == (1.0, 0.0)
        assert 1 <= len(r["chosen"][0]["content"].split()) <= 5 < len(r["rejected"][0]["content"].split())
    c = json.loads((out / "build.json").read_text())["counts"]
    assert c["pairing"].get("all_tied", 0) == len(samples) - len(mixed)


def test_generate_with_an_adapter_changes_the_samples(tmp_path, tiny_model_dir, scorer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run_dir = tmp_path / "run"
    peft.save_pretrained(run_dir / "adapter")  # a RunDir-like folder: the adapter lives in adapter/
    prompts = tmp_path / "two.txt"
    prompts.write_text("Say hi.\nName a fruit.\n")
    assert generate(tiny_model_dir, prompts, tmp_path / "base", "--judge", scorer, k=2) == 0
    assert generate(tiny_model_dir, prompts, tmp_path / "lora", "--judge", scorer, "--adapter", str(run_dir), k=2) == 0
    base_samples = samples_of(tmp_path / "base")
    assert generate(tiny_model_dir, prompts, tmp_path / "again", "--judge", scorer, k=2) == 0
    assert samples_of(tmp_path / "again") == base_samples  # seeded: the same samples again
    assert samples_of(tmp_path / "lora") != base_samples  # the adapter changes the policy
    assert json.loads((tmp_path / "lora" / "build.json").read_text())["adapter"] == str(run_dir)


def test_generate_rejects_bad_judges_before_loading_the_model(tmp_path, prompts_file, capsys):
    out = tmp_path / "gen"
    for judge, message in [
        ("rm:runs/demo/reward", "judge 'rm:runs/demo/reward': not a finished reward-model RunDir"),
        ("nosuchjudge", "unknown judge 'nosuchjudge'"),
    ]:
        assert main(["generate", "--model", "no-such-model-dir/x/y", "--prompts", str(prompts_file), "--judge", judge,
                     "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
    plain = tmp_path / "plain.txt"
    plain.write_text("Say hi.\n")
    assert main(["generate", "--model", "x", "--prompts", str(plain), "--judge", "answer", "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --judge answer: no row of {plain} has an 'answer' field"
    assert main(["generate", "--model", "x", "--prompts", str(plain), "--judge", "length", "--num-samples", "1",
                 "--output", str(out)]) == 2
    assert "at least 2 responses per prompt" in capsys.readouterr().err
    assert not out.exists()


def test_answer_judge():
    judge = AnswerJudge({"What is the capital of France?": "Paris", "Count to three.": ["one two three", "1 2 3"]})
    q = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assert judge.score(
        [q("What is the capital of France?")] * 3 + [q("Count to three.")] * 2 + [q("Unknown?")],
        ["It is Paris.", "paris", "Lyon, not Parisian.", "One, two, three!", "1, 2, 4", "Paris"],
    ) == [1.0, 1.0, 0.0, 1.0, 0.0, None]
    with pytest.raises(JudgeSpecError):
        AnswerJudge({})


@pytest.mark.slow
def test_generate_on_the_embedded_model_gives_ordered_pairs(tmp_path):
    """The acceptance run: SmolLM2-135M-Instruct, format instructions, the format judge."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([
        "What is the capital of France? Answer in all caps.",
        "Name three fruits. Answer as a bulleted list.",
        "What is 2 + 2? Begin your reply with 'Answer:'.",
        "What color is the sky? Reply with only the answer.",
        "Name a large animal. Write your reply in lowercase letters only.",
        "What is the opposite of hot? End your reply with an exclamation mark.",
    ]) + "\n")
    out = tmp_path / "gen"
    assert main(["generate", "--model", "smollm2-135m-instruct", "--prompts", str(prompts), "--num-samples", "4",
                 "--judge", "format", "--max-new-tokens", "32", "--temperature", "1.0", "--output", str(out),
                 "--test-fraction", "0", "--jsonl", "--no-plots"]) == 0
    rows = rows_of(out)
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    splits = load_splits(DataConfig(path=str(out), eval_split=None, eval_fraction=0.0), "preference", seed=0)
    assert len(splits.train) == len(rows)
