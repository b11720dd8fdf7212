"""Reward model and PPO on a tiny model: the invariants of the RLHF comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_overrides

from align.core.config_loader import load_config
from align.stages.ppo import PPOConfig
from align.stages.reward import RewardConfig
from align.stages.sft import SFTConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_data):
    """SFT, then a reward model on its merged model."""
    from align.stages.registry import run_stage

    root = tmp_path_factory.mktemp("rlhf")
    run_stage(load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], root / "sft", tracking="none")))
    reward_cfg = load_config(
        RewardConfig, None,
        tiny_overrides(None, tiny_data["prefs"], root / "reward", parent_run=str(root / "sft"),
                       **{"train.max_steps": 6, "reward.stats_samples": 16, "samples.num_prompts": 3}),
    )
    run_stage(reward_cfg)
    return {"root": root, "reward_cfg": reward_cfg}


def ppo_config(runs, tiny_data, **extra):
    root = runs["root"]
    overrides = tiny_overrides(
        None, tiny_data["prefs"], root / extra.pop("name", "ppo"), parent_run=str(root / "sft"), reward_run=str(root / "reward"),
        **{"train.max_steps": 2, "ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2, "ppo.max_new_tokens": 6,
           "tracking": "none", **extra},
    )
    return load_config(PPOConfig, None, overrides)


def build(cfg):
    from align.modeling import models
    from align.core.artifacts import RunDir
    from align.stages.stage_run import resolve_base
    from align.rlhf.ppo_model import PolicyValueReward

    base, _ = resolve_base(cfg)
    tok = models.load_tokenizer(base, cfg.model)
    return PolicyValueReward(cfg, base, RunDir(cfg.reward_run), tok)


def test_reward_run_outputs(runs):
    path = runs["root"] / "reward"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["stage"] == "reward"
    stats = json.loads((path / "reward_stats.json").read_text())
    assert stats["n"] == 16 and stats["std"] > 0
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert "eval/accuracy" in {k for r in read_metrics(path) for k in r}


def test_reward_adapter_reloads_with_identical_scores(runs):
    """The known upstream pitfall: a reward adapter saved without its score head scores randomly."""
    from peft import PeftModel

    from align.modeling import models
    from align.stages.stage_run import resolve_base
    from align.modeling.scoring import score_with_model as score_conversations

    cfg = runs["reward_cfg"]
    base, _ = resolve_base(cfg)
    tok = models.load_tokenizer(base, cfg.model)
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(5)]
    scores = []
    for seed in (0, 1):  # a different seed would initialize a missing head differently
        torch.manual_seed(seed)
        model = PeftModel.from_pretrained(models.load_model(base, cfg.model, head="score"), str(runs["root"] / "reward" / "adapter"))
        model.config.pad_token_id = tok.pad_token_id
        scores.append(score_conversations(model, tok, convs))
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    assert len(set(round(s, 5) for s in scores[0])) > 1
    # ... and the same adapter loaded onto the causal LM inside PPO scores identically.
    pvr = build(ppo_config(runs, {"prefs": runs["reward_cfg"].data.path}))
    inside = pvr.scores(convs).tolist()
    assert inside == pytest.approx(scores[0], abs=1e-5)


def test_fresh_policy_has_zero_kl_to_the_reference(runs, tiny_data):
    from align.rlhf.ppo_model import sample

    cfg = ppo_config(runs, tiny_data)
    pvr = build(cfg)
    prompts = [[{"role": "user", "content": f"What is {i} plus one?"}] for i in range(3)]
    roll = sample(pvr, prompts, cfg, seeds=[0, 1, 2])
    with torch.no_grad():
        policy = pvr.logprobs(roll.seq, roll.attn, roll.n_resp)
        with pvr.model.disable_adapter():
            ref = pvr.logprobs(roll.seq, roll.attn, roll.n_resp)
    torch.testing.assert_close(policy, ref, atol=0, rtol=0)
    from align.rlhf.losses import kl_per_token

    assert (kl_per_token(policy, ref, "k1") * roll.mask).abs().sum().item() == 0.0


def test_ppo_step_changes_only_policy_value_and_head(runs, tiny_data):
    from transformers import get_scheduler

    from align.rlhf.ppo import ppo_step
    from align.modeling.scoring import read_stats
    from align.core.artifacts import RunDir

    cfg = ppo_config(runs, tiny_data, **{"train.learning_rate": 5e-3})
    pvr = build(cfg)
    before = {n: p.detach().clone() for n, p in pvr.model.named_parameters()}
    score_head = {n: p.detach().clone() for n, p in pvr.score_head.named_parameters()}
    value_head = {n: p.detach().clone() for n, p in pvr.value_head.named_parameters()}
    params = pvr.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=5e-3)
    sched = get_scheduler("constant", opt)
    prompts = [[{"role": "user", "content": f"What is {i} plus one? Reply with only the answer."}] for i in range(4)]
    stats = read_stats(RunDir(cfg.reward_run))
    torch.manual_seed(0)
    for _ in range(2):  # lora_A moves from the second update on (lora_B starts at 0)
        metrics = ppo_step(pvr, cfg, prompts, opt, sched, kl_coef=0.05, stats=stats)
    after = dict(pvr.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n in before if ".policy." in n or ".value." in n}
    assert changed == trainable, (sorted(changed - trainable)[:3], sorted(trainable - changed)[:3])
    assert all(torch.equal(score_head[n], p) for n, p in pvr.score_head.named_parameters())
    assert any(not torch.equal(value_head[n], p) for n, p in pvr.value_head.named_parameters())
    for key in ("ppo/kl", "ppo/entropy", "ppo/clip_frac", "ppo/approx_kl", "ppo/value_loss", "ppo/explained_variance",
                "ppo/reward_raw", "ppo/reward_with_kl", "ppo/response_length", "ppo/eos_share", "time/generation_s"):
        assert key in metrics


def test_ppo_stage_runs_checkpoints_and_resumes_to_the_same_result(runs, tiny_data):
    from safetensors.torch import load_file

    from align.rlhf import ppo as ppo_lib
    from align.stages.registry import run_stage

    full = run_stage(ppo_config(runs, tiny_data, name="ppo-full", **{"train.max_steps": 4, "train.save_steps": 2}))
    manifest = json.loads((full.path / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert (full.path / "adapter" / "adapter_model.safetensors").is_file()
    assert (full.path / "value" / "value_head.safetensors").is_file()
    rows = read_metrics(full.path)
    assert rows[0]["_step"] == 0 and rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)

    # Stop after step 2 (as a crash after its checkpoint would), then resume.
    part_cfg = ppo_config(runs, tiny_data, name="ppo-part", **{"train.max_steps": 4, "train.save_steps": 2})

    class Crash(Exception):
        pass

    original = ppo_lib.save_checkpoint

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash()

    ppo_lib.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            run_stage(part_cfg)
    finally:
        ppo_lib.save_checkpoint = original
    resumed_cfg = ppo_config(runs, tiny_data, name="ppo-part", **{"train.max_steps": 4, "train.save_steps": 2, "resume": True})
    resumed = run_stage(resumed_cfg)
    a = load_file(full.path / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.path / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_ppo_keeps_the_best_evaluation_within_the_kl_budget(runs, tiny_data, monkeypatch):
    """Scripted held-out evaluations at steps 0, 1, 2 (reward, KL): (0, 0), (1, 0.5), (3, 2.0); budget 1.0 keeps step 1."""
    from safetensors.torch import load_file

    from align.rlhf import ppo as ppo_lib
    from align.stages.registry import run_stage

    script = iter([(0.0, 0.0), (1.0, 0.5), (3.0, 2.0)])
    monkeypatch.setattr(ppo_lib, "held_out_reward_and_kl", lambda *a: dict(zip(("eval/reward", "eval/kl"), next(script))))
    run = run_stage(ppo_config(runs, tiny_data, name="ppo-keep", **{"train.eval_steps": 1, "train.save_steps": 1,
                                                                    "ppo.keep_best_within_kl": 1.0}))
    kept = load_file(run.path / "adapter" / "adapter_model.safetensors")
    step = {s: load_file(run.path / "checkpoints" / f"checkpoint-{s}" / "adapters" / "policy" / "adapter_model.safetensors") for s in (1, 2)}
    assert all(torch.equal(kept[k], step[1][k]) for k in kept) and any(not torch.equal(kept[k], step[2][k]) for k in kept)
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["kept"]["step"] == 1 and summary["kept"]["last_adapter"].endswith("checkpoint-2")


def test_win_rate_counts_ties_as_half_and_skips_missing():
    from align.evaluation.metrics import bootstrap_interval, win_rate

    w = win_rate([1.0, 0.0, 1.0, None, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0], n_boot=500, seed=0)
    # outcomes: win, tie, tie, (skipped), loss -> (1 + 0.5 + 0.5 + 0) / 4
    assert w["win_rate"] == pytest.approx(0.5) and (w["wins"], w["ties"], w["losses"], w["n"]) == (1, 2, 1, 4)
    assert w["ci95"][0] <= 0.5 <= w["ci95"][1]
    assert bootstrap_interval([0.7] * 10, 100, 0) == pytest.approx((0.7, 0.7))
    low, high = bootstrap_interval([0.0] * 50 + [1.0] * 50, 2000, 1)
    assert 0.38 < low < 0.5 < high < 0.62  # ~ +-1.96 * sqrt(.25/100)
    assert win_rate([None], [1.0], 10, 0) is None


def test_eval_stage_compares_policies_and_writes_the_report(runs, tiny_data, tmp_path):
    from align.stages.dpo import DPOConfig
    from align.stages.eval import EvalConfig
    from align.stages.registry import run_stage

    root = runs["root"]
    run_stage(load_config(DPOConfig, None, tiny_overrides(None, tiny_data["prefs"], root / "dpo", parent_run=str(root / "sft"), tracking="none")))
    run_stage(ppo_config(runs, tiny_data, name="ppo-eval", **{"train.eval_steps": 1}))
    cfg = load_config(EvalConfig, None, {
        "output_dir": str(tmp_path / "pipe" / "eval"),
        "runs": {"sft": str(root / "sft"), "dpo": str(root / "dpo"), "ppo": str(root / "ppo-eval")},
        "reward_run": str(root / "reward"),
        "data.path": str(tiny_data["prefs"]), "data.eval_split": None, "data.eval_fraction": 0.25,
        "perplexity_data": str(tiny_data["sft"]),
        "num_prompts": 6, "num_pairs": 5, "perplexity_rows": 4, "bootstrap": 100,
        "sampling.max_new_tokens": 6, "judges": ["format", "length"],
    })
    run = run_stage(cfg)
    results = json.loads((run.path / "eval.json").read_text())
    policies = results["policies"]
    assert set(policies) == {"sft", "dpo", "ppo"}
    assert policies["sft"]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # the baseline is the reference
    assert policies["sft"]["implicit_reward_accuracy"] == 0.0  # no margin against itself
    for name in ("dpo", "ppo"):
        wins = policies[name]["win_rate_vs_sft"]
        assert set(wins) == {"reward_model", "format", "length"}
        assert all(0 <= w["win_rate"] <= 1 and w["n"] > 0 for w in wins.values() if w)
        assert policies[name]["perplexity"] > 1
    assert 0 <= results["reward_model_accuracy"] <= 1
    assert set(results["compute"]) == {"sft", "dpo", "ppo", "reward"}
    assert results["compute"]["dpo"]["trainable_parameters"] > 0 and results["compute"]["dpo"]["peak_memory_mb"] > 0
    assert all(results["compute"][s]["tokens"] > 0 for s in ("sft", "dpo", "ppo", "reward"))
    generations = (run.path / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 6 and {"sft", "dpo", "ppo"} <= set(json.loads(generations[0]))
    report = tmp_path / "pipe"
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for png in ("reward_vs_kl.png", "win_rates.png", "training_curves.png"):
        assert (report / "report_plots" / png).stat().st_size > 1000
        assert f"report_plots/{png}" in md and f'src="report_plots/{png}"' in page
    assert "win rate vs sft" in md and "## Compute" in md and "## Samples" in md


def test_reward_run_is_a_judge(runs):
    from align.evaluation.judges import check_judge_spec, load_judge
    from align.core.errors import ConfigError

    judge = load_judge(f"rm:{runs['root'] / 'reward'}")
    prompts = [[{"role": "user", "content": "What is 1 plus one? Reply with only the answer."}]] * 2
    scores = judge.score(prompts, ["2", "Adding one to 1 gives 2, as you can check."])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    check_judge_spec(f"rm:{runs['root'] / 'reward'}")
    with pytest.raises(ConfigError, match="not a RunDir"):
        check_judge_spec(f"rm:{runs['root'] / 'nope'}")
    with pytest.raises(ConfigError, match="not a finished reward-model RunDir"):
        load_judge(f"rm:{runs['root'] / 'sft'}")


def test_ppo_refuses_a_split_over_processes_that_cannot_work(runs, tiny_data, monkeypatch):
    from align.core.errors import ConfigError
    from align.stages.registry import run_stage

    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = ppo_config(runs, tiny_data, name="ppo-ddp", **{"ppo.rollout_batch_size": 4})
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size: 4 prompts per step do not split evenly over 3 processes"):
        run_stage(cfg)
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = ppo_config(runs, tiny_data, name="ppo-ddp", **{"ppo.rollout_batch_size": 8, "ppo.minibatch_size": 2})
    with pytest.raises(ConfigError, match=r"ppo.minibatch_size: 2 responses per minibatch do not split evenly over 4 processes"):
        run_stage(cfg)
    assert not Path(cfg.output_dir).exists()  # nothing written


def test_out_of_memory_in_the_step0_evaluation_gives_the_memory_advice(runs, tiny_data, monkeypatch):
    """The evaluation before the first step runs out of memory: the advice names step 0, not an UnboundLocalError."""
    from align.core.errors import AlignError
    from align.rlhf import ppo as ppo_lib
    from align.stages.registry import run_stage

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ppo_lib, "held_out_reward_and_kl", no_memory)
    with pytest.raises(AlignError, match=r"CUDA out of memory at step 0 .*to use less memory try: .*train\.batch_size"):
        run_stage(ppo_config(runs, tiny_data, name="ppo-oom"))
    manifest = json.loads((runs["root"] / "ppo-oom" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "out of memory at step 0" in manifest["error"]


class _LeavesAMarker:
    """A pickle that runs code when loaded: what a tampered checkpoint would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickled code ran"))


def test_ppo_resume_refuses_a_tampered_checkpoint_and_runs_no_code(runs, tiny_data, tmp_path):
    """A checkpoint is data: `--resume` into a run dir whose optimizer.pt holds a code-running pickle
    refuses it in one line (exit 2), marks the run failed, and the code never runs."""
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    from align.core.artifacts import RunDir
    from align.core.config_loader import to_dict
    from align.stages.registry import run_stage

    cfg = ppo_config(runs, tiny_data, name="ppo-tampered", **{"train.max_steps": 2, "train.save_steps": 1})
    run = run_stage(cfg)
    RunDir(run.path).update(status="interrupted")  # as a stopped run leaves it: resumable
    checkpoint = run.path / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "PICKLE_RAN"
    torch.save({"optimizer": _LeavesAMarker(str(marker)), "scheduler": {}}, checkpoint / "optimizer.pt")
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "ppo.py"), "--config", str(config), "--resume"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "optimizer.pt" in line and "refused" in line
    assert not marker.exists(), "a pickle in a run dir ran code"
    assert "\x1b" not in line and "weights_only" not in line  # one plain line, no advice on loading it anyway
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "interrupted"  # refused before it reopened
    torch.load(checkpoint / "optimizer.pt", weights_only=False)  # the control: an unrestricted load runs it
    assert marker.read_text() == "pickled code ran"
