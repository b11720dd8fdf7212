"""KTO: unpaired desirable/undesirable data from every source, its formula, its step-0 reference invariant.

Data (align/core/data.py, kind "unpaired"): TRL's unpaired rows; preference pairs (chosen
desirable, rejected undesirable); scored responses with a threshold, from rows with `score` or
from align-data builds of rated and ranked sources; errors name file, line and field.
Training (align/stages/kto.py, TRL's KTOTrainer): the loss and rewards of the KTO formula on
hand-set reference log-probs; at step 0 the policy is the reference (rewards and KL 0, loss 0.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_overrides, write_jsonl
from test_stages import Recorder, assert_only_adapter_changed, probe_ids

from align.core.config import DataConfig

from align.core.config_loader import describe, load_config
from align.core.data import load_splits
from align.core.normalize import normalize_unpaired
from align.core.errors import ConfigError, DataError
from align.stages.kto import KTOConfig

FIXTURES = Path(__file__).parent / "fixtures" / "data_tools"
U = [{"role": "user", "content": "q"}]


def A(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def load(path, threshold=None, **kw):
    return load_splits(DataConfig(path=str(path), eval_split=None, eval_fraction=0.0, **kw), "unpaired", 0,
                       score_threshold=threshold)


# --------------------------------------------------------------------------- data from each source


def test_unpaired_rows_as_given(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "q", "completion": "good", "label": True},
        {"prompt": U, "completion": A("bad"), "label": False},
        {"prompt": "q", "completion": "good", "label": True},  # given twice: kept twice (a weighting choice)
    ])
    splits = load(path)
    assert splits.train == [
        {"prompt": U, "completion": A("good"), "label": True},
        {"prompt": U, "completion": A("bad"), "label": False},
        {"prompt": U, "completion": A("good"), "label": True},
    ]
    assert "training rows: 2 desirable, 1 undesirable" in splits.notes and not any("merged" in n for n in splits.notes)


def test_labels_from_csv_zero_one(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nq,good,1\nq,bad,0\n")
    assert [r["label"] for r in load(path).train] == [True, False]


def test_pairs_become_a_desirable_and_an_undesirable_row_on_one_side_of_the_split(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    splits = load_splits(DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), eval_split=None, eval_fraction=0.25),
                         "unpaired", 0)
    assert len(splits.train) == 30 and len(splits.eval) == 10, "5 of 20 pairs held out, 2 rows each"
    for part in (splits.train, splits.eval):
        by_prompt = {}
        for r in part:
            by_prompt.setdefault(r["prompt"][0]["content"], []).append((r["completion"][0]["content"].split()[0], r["label"]))
        assert all(sorted(v) == [("bad", False), ("good", True)] for v in by_prompt.values()), "both halves of a pair together"
    assert not {r["prompt"][0]["content"] for r in splits.train} & {r["prompt"][0]["content"] for r in splits.eval}


def test_bundled_demo_prefs_give_one_row_per_response():
    splits = load_splits(DataConfig(path="bundled:demo-prefs"), "unpaired", 0)
    prefs = load_splits(DataConfig(path="bundled:demo-prefs"), "preference", 0)
    assert len(splits.train) == 2 * len(prefs.train) and len(splits.eval) == 2 * len(prefs.eval)
    assert splits.train[0] == {"prompt": prefs.train[0]["prompt"], "completion": prefs.train[0]["chosen"], "label": True}
    assert splits.train[1] == {"prompt": prefs.train[0]["prompt"], "completion": prefs.train[0]["rejected"], "label": False}


def test_rated_rows_need_a_threshold(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "completion": "a", "score": 7}, {"prompt": "q", "completion": "b", "score": 3.5}])
    assert [r["label"] for r in load(path, threshold=5.0).train] == [True, False]
    assert [r["label"] for r in load(path, threshold=3.5).train] == [True, True], "score >= threshold is desirable"
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}:1: field 'label' missing (a row with 'score' needs kto.score_threshold)" in str(err.value)


def build(tmp_path, fixture: str, fmt: str, *extra: str) -> Path:
    from data_tools.cli import main

    out = tmp_path / f"built-{fmt}"
    assert main(["build", "--format", fmt, "--input", str(FIXTURES / fixture), "--output", str(out), "--no-plots",
                 "--test-fraction", "0", "--near-dup", "off", *extra]) == 0
    return out


def test_rated_data_via_align_data_labelled_by_threshold(tmp_path):
    """align-data pairs every response of a rated prompt (all-pairs); the threshold labels each once, by its score."""
    out = build(tmp_path, "ratings.jsonl", "ratings", "--pairing", "all-pairs")
    splits = load(out, threshold=5.0)
    got = {(r["prompt"][0]["content"], r["completion"][0]["content"]): r["label"] for r in splits.train}
    raw = [json.loads(line) for line in (FIXTURES / "ratings.jsonl").read_text().splitlines()]
    assert got == {(r["prompt"], r["response"]): r["score"] >= 5.0 for r in raw}, "every rated response, labelled by score"
    assert len(splits.train) == len(raw)
    assert any("repeated responses of pairs merged" in n for n in splits.notes)


def test_pairs_by_side_drop_a_response_that_is_both(tmp_path):
    """Without a threshold, a response chosen in one pair and rejected in another has no label: dropped and counted."""
    out = build(tmp_path, "ratings.jsonl", "ratings", "--pairing", "all-pairs")
    splits = load(out)
    texts = {r["completion"][0]["content"] for r in splits.train}
    assert "White flakes drift and fall" not in texts, "5.5 lost to 8.5 and beat 2"
    assert "1 responses dropped: desirable in one pair and undesirable in another (no single label)" in " ".join(splits.notes)
    assert {r["completion"][0]["content"]: r["label"] for r in splits.train}["Sad."] is False


def test_ranked_data_via_align_data_by_side_and_threshold_refused(tmp_path):
    """Ranked sources carry no scores (align-data writes none): pairs by side, and a threshold names what is missing."""
    out = build(tmp_path, "ranked.csv", "ranked", "--prompt-col", "question", "--response-col", "answer",
                "--rank-col", "position")
    splits = load(out)
    labels = {r["completion"][0]["content"]: r["label"] for r in splits.train}
    assert labels["Jupiter."] is True and labels["Mars."] is False
    with pytest.raises(DataError) as err:
        load(out, threshold=0.5)
    assert "field 'score_chosen' missing; kto.score_threshold labels responses by their score" in str(err.value)
    assert str(out) in str(err.value)


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label': expected true/false (or 1/0), got 'yes'"),
        ({"prompt": "q", "completion": "a", "label": 2}, "field 'label': expected true/false"),
        ({"prompt": "q", "label": True}, "field 'completion' missing"),
        ({"completion": "a", "label": True}, "field 'prompt' missing"),
        ({"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": True}, "field 'completion[0].role'"),
        ({"prompt": "q", "chosen": "a"}, "field 'rejected' missing"),
        ({"prompt": "q", "completion": "a", "score": "high"}, "field 'label' missing"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "ok", "label": True}, row])
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}:2:" in str(err.value) and needle in str(err.value)


def test_score_of_the_wrong_type_is_named(tmp_path):
    with pytest.raises(DataError, match="field 'score' expected a number, got 'high'"):
        normalize_unpaired({"prompt": "q", "completion": "a", "score": "high"}, "f:3", score_threshold=1.0)


# --------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def kto_trainer_factory(sft_parent, tiny_data, tmp_path_factory):
    """KTO trainers built by the stage's own build_trainer on the SFT run's merged model."""
    from align.core.artifacts import RunDir
    from align.modeling import models
    from align.stages import kto
    from align.stages.stage_run import resolve_base

    def make(**extra):
        out = tmp_path_factory.mktemp("kto")
        cfg = load_config(KTOConfig, None, tiny_overrides(None, tiny_data["prefs"], out, parent_run=str(sft_parent), **{
            "tracking": "none", "train.batch_size": 8, **extra}))
        base, _ = resolve_base(cfg)
        tokenizer = models.load_tokenizer(base, cfg.model)
        splits = load_splits(cfg.data, "unpaired", 0)
        train_ds, eval_ds, _ = kto.prepare(splits, tokenizer, cfg.train.max_length, seed=0)
        model = models.load_model(base, cfg.model)
        return kto.build_trainer(cfg, model, tokenizer, train_ds, eval_ds, RunDir(out))

    return make


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_loss_and_rewards_follow_the_formula_on_hand_set_reference(kto_trainer_factory, loss_type):
    beta, wd, wu = 0.5, 1.5, 0.7
    trainer = kto_trainer_factory(**{"kto.beta": beta, "kto.loss_type": loss_type, "kto.desirable_weight": wd,
                                     "kto.undesirable_weight": wu})
    batch = _batch(trainer)
    labels = batch["label"].tolist()
    assert 0 < sum(labels) < len(labels), "the shuffled batch mixes desirable and undesirable rows"
    with torch.no_grad():
        policy, policy_kl = trainer.compute_ref_log_probs(trainer.model, batch)  # adapter off = policy at step 0
    offsets = torch.linspace(-1.0, 1.5, len(labels))  # designed log-ratios log p - log p_ref
    kl_offsets = torch.linspace(0.1, 0.5, len(labels))
    batch["ref_logps"] = policy - offsets
    trainer.precompute_ref_logps = True  # TRL reads the reference from the batch
    if loss_type == "kto":
        batch["ref_KL_logps"] = policy_kl - kl_offsets
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    kl = max(0.0, kl_offsets.mean().item()) if loss_type == "kto" else 0.0
    losses = []
    for label, r in zip(labels, offsets.tolist()):
        if loss_type == "kto":  # Eq. 7: v = sigmoid(beta (r - z0)) for desirable, sigmoid(beta (z0 - r)) for undesirable
            value = 1 / (1 + math.exp(-beta * ((r - kl) if label else (kl - r))))
            losses.append((wd if label else wu) * (1 - value))
        else:  # APO-zero, unpaired: push desirable up, undesirable down, no KL
            losses.append(wd * (1 - 1 / (1 + math.exp(-beta * r))) if label else wu / (1 + math.exp(-beta * r)))
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    m = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    good = [beta * r for label, r in zip(labels, offsets.tolist()) if label]
    bad = [beta * r for label, r in zip(labels, offsets.tolist()) if not label]
    assert m["rewards/chosen"] == pytest.approx(sum(good) / len(good), rel=1e-5)
    assert m["rewards/rejected"] == pytest.approx(sum(bad) / len(bad), rel=1e-5)
    assert m["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-7)


def test_step0_policy_is_the_reference(sft_parent, tiny_data, tmp_path, tiny_model_dir):
    """At step 0 every reward and the KL estimate are 0 and the loss is 1 - sigmoid(0) = 0.5; then only the adapter trains."""
    from align.stages import kto
    from align.stages.registry import run_stage

    rec = Recorder(probe_ids(tiny_model_dir))
    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / "kto", parent_run=str(sft_parent),
                               **{"tracking": "none", "samples.num_prompts": 0})
    run = run_stage(load_config(KTOConfig, None, overrides), callbacks=[rec])
    step0 = next(r for r in read_metrics(run.path) if r["_step"] == 0 and "eval/loss" in r)
    assert step0["eval/loss"] == pytest.approx(0.5, abs=1e-6)
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/kl"):
        assert abs(step0[key]) < 1e-5, key
    assert_only_adapter_changed(rec)
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["eval_rewards/margins_after"] > 0, "desirable responses gain on undesirable ones"
    lines = kto.summary_lines(summary)
    assert "KTO reward margin" in lines[0] and "0 (step 0)" in lines[0]


def test_weighted_step0_loss(kto_trainer_factory):
    trainer = kto_trainer_factory(**{"kto.desirable_weight": 1.5, "kto.undesirable_weight": 0.5})
    batch = _batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    n_good = int(batch["label"].sum())
    n = len(batch["label"])
    assert loss == pytest.approx(0.5 * (1.5 * n_good + 0.5 * (n - n_good)) / n, rel=1e-5)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"train.batch_size": 1}, "train.batch_size: kto estimates its KL term"),
        ({"kto.beta": 0.0}, "kto.beta: must be positive"),
        ({"kto.desirable_weight": 0.0}, "kto.desirable_weight: must be positive"),
        ({"kto.undesirable_weight": -1.0}, "kto.undesirable_weight: must be positive"),
        ({"kto.loss_type": "bco"}, "kto.loss_type: expected one of 'kto', 'apo_zero_unpaired'"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(KTOConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d.jsonl", **overrides})
    assert needle in str(err.value)
    ok = load_config(KTOConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d.jsonl",
                                       "train.batch_size": 1, "kto.loss_type": "apo_zero_unpaired"})
    assert ok.train.batch_size == 1, "apo_zero_unpaired has no KL term: batch size 1 is fine"


def test_keys_and_cli(tmp_path):
    from test_cli import run_recipe

    lines = {line.split(" (")[0].strip(): line for line in describe(KTOConfig)}
    for key, needle in {"kto.beta": "positive", "kto.desirable_weight": "positive", "kto.undesirable_weight": "positive",
                        "kto.loss_type": "apo_zero_unpaired", "kto.score_threshold": "score >= threshold"}.items():
        assert needle in lines[key], lines[key]
    cfg = tmp_path / "kto.yaml"
    cfg.write_text("output_dir: out/kto\nmodel:\n  name_or_path: m\ndata:\n  path: bundled:demo-prefs\n"
                   "train:\n  batch_size: 1\ntracking: none\n")
    proc = run_recipe("kto", "--config", str(cfg), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "train.batch_size" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_kto_balance_outside_the_papers_range_is_named_with_the_weights_that_fix_it():
    from align.core.normalize import kto_balance_note

    assert kto_balance_note(10, 10, 1.0, 1.0) is None  # ratio 1: inside [1, 4/3]
    assert kto_balance_note(12, 10, 1.0, 1.0) is None  # 1.2: inside
    note = kto_balance_note(10, 100, 1.0, 1.0)
    assert "weighted ratio 0.10" in note and "kto.desirable_weight=11.67 kto.undesirable_weight=1" in note
    assert kto_balance_note(10, 100, 11.67, 1.0) is None, "the suggested weights bring it in"
    note = kto_balance_note(30, 10, 1.0, 1.0)
    assert "weighted ratio 3.00" in note and "kto.undesirable_weight=2.57" in note
    assert kto_balance_note(10, 0, 1.0, 1.0) is None  # one label only: nothing to balance


def test_the_kto_stage_names_an_unbalanced_weighting_in_its_data_notes(sft_parent, tiny_data, tmp_path):
    from align.stages.registry import run_stage

    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / "kto-weights", parent_run=str(sft_parent),
                               **{"tracking": "none", "samples.num_prompts": 0, "train.max_steps": 1, "kto.desirable_weight": 3.0})
    run = run_stage(load_config(KTOConfig, None, overrides))
    manifest = (run.path / "manifest.json").read_text()
    assert "weighted ratio 3.00" in manifest and "kto.desirable_weight=1 kto.undesirable_weight=1 would bring it in" in manifest
