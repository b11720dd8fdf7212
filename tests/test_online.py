"""The online methods on a tiny model: reward sources, GRPO, RLOO and online DPO.

Invariants: a fresh policy's KL to the reference is 0; an update changes only the policy
adapter (base, reward adapter and score head stay bit-identical); round 2 of online DPO samples
from round 1's policy, and its reference is still the SFT model; runs checkpoint and resume.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import LN2, read_metrics, tiny_overrides

from align.core.config_loader import load_config
from align.core.errors import ConfigError
from align.stages.grpo import GRPOConfig
from align.stages.registry import get_stage
from align.stages.online_dpo import OnlineDPOConfig
from align.stages.reward import RewardConfig
from align.stages.rloo import RLOOConfig

SCORERS = '''
def chars(prompt, response):
    return float(len(response))

def odd_only(prompt, response):
    """Applies to prompts about odd numbers only."""
    import re
    n = int(re.search(r"\\d+", prompt[-1]["content"]).group())
    return 1.0 if n % 2 else None
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_parent, tiny_data):
    """The session's SFT run, a reward model on its merged model, and a user scorer module on sys.path."""
    from align.stages.registry import run_stage

    root = tmp_path_factory.mktemp("online")
    (root / "online_scorers.py").write_text(SCORERS)
    sys.path.insert(0, str(root))
    run_stage(load_config(RewardConfig, None, tiny_overrides(
        None, tiny_data["prefs"], root / "reward", parent_run=str(sft_parent), tracking="none",
        **{"train.max_steps": 4, "reward.stats_samples": 16, "samples.num_prompts": 0},
    )))
    yield {"root": root, "sft": sft_parent, "reward": root / "reward"}
    sys.path.remove(str(root))


def config(cls, runs, tiny_data, name, rewards=None, **extra):
    rewards = rewards if rewards is not None else [{"judge": "online_scorers:chars", "weight": 0.1}]
    overrides = tiny_overrides(None, tiny_data["prefs"], runs["root"] / name, parent_run=str(runs["sft"]), tracking="none",
                               rewards=rewards, **{"samples.num_prompts": 2, **extra})
    return load_config(cls, None, overrides)


def group_config(runs, tiny_data, name="grpo", cls=GRPOConfig, **extra):
    section = cls.stage
    return config(cls, runs, tiny_data, name, **{
        "train.max_steps": 2, "train.batch_size": 4, "train.learning_rate": 5e-3, f"{section}.prompts_per_step": 2,
        f"{section}.group_size": 4, f"{section}.max_new_tokens": 6, f"{section}.eval_prompts": 3, **extra,
    })


def policy(cfg):
    """The GRPO model: base + policy adapter + the reward adapters the config names."""
    from align.modeling import models
    from align.rlhf.group import GroupPolicy
    from align.rlhf.rewards import reward_runs
    from align.stages.stage_run import resolve_base

    base, _ = resolve_base(cfg)
    tok = models.load_tokenizer(base, cfg.model)
    return GroupPolicy(cfg, base, tok, reward_runs(cfg.rewards, base), answers={})


PROMPTS = [[{"role": "user", "content": f"What is {i} plus one? Reply with only the answer."}] for i in range(4)]


# --------------------------------------------------------------------------- reward sources


def test_judge_sources_weighted_total_defaults_and_unscored(runs):
    from align.rlhf.options import RewardSource
    from align.rlhf.rewards import Rewards

    prompts = [[{"role": "user", "content": f"Say {i}."}] for i in (1, 2)]
    responses = ["abc", "abcdef"]
    both = Rewards([RewardSource(judge="online_scorers:chars", weight=0.5),
                    RewardSource(judge="online_scorers:odd_only", weight=-2.0)])
    s = both.score(prompts, responses)
    assert s.names == ["chars", "odd_only"]
    # prompt 1 (odd): 0.5 * 3 - 2 * 1 = -0.5; prompt 2: odd_only does not apply -> 0.5 * 6 = 3.
    assert s.total.tolist() == [-0.5, 3.0]
    assert math.isnan(s.per_source[1, 1].item())
    m = s.metrics("r")
    assert m["r/chars"] == 4.5 and m["r/odd_only"] == 1.0 and m["r/odd_only_scored"] == 0.5 and m["r/unscored"] == 0
    only = Rewards([RewardSource(judge="online_scorers:odd_only")]).score(prompts, responses)
    assert only.total[0].item() == 1.0 and math.isnan(only.total[1].item())  # no source scored it: left out
    default = Rewards([RewardSource(judge="online_scorers:odd_only", default=0.25)]).score(prompts, responses)
    assert default.total.tolist() == [1.0, 0.25]
    answer = Rewards([RewardSource(judge="answer")], answers={"Say 1.": ["abc"]}).score(prompts, ["it is abc", "abc"])
    assert answer.total[0].item() == 1.0 and math.isnan(answer.total[1].item())  # no reference for "Say 2."


def test_reward_adapter_source_scores_as_the_reward_run_on_the_same_base(runs, tiny_data):
    from align.evaluation.judges import load_judge
    from align.modeling.scoring import read_stats
    from align.core.artifacts import RunDir

    cfg = group_config(runs, tiny_data, rewards=[{"reward_run": str(runs["reward"]), "normalize": False},
                                                 {"reward_run": str(runs["reward"]), "name": "rm_norm"}])
    gp = policy(cfg)
    assert gp.rewards.adapter_names == ["reward0", "reward1"]
    responses = ["2", "Adding one to 1 gives 2, as you can check.", "3", "four"]
    ours = gp.rewards.score(PROMPTS, responses)
    separate = load_judge(f"rm:{runs['reward']}").score(PROMPTS, responses)  # the reward run loaded on its own
    torch.testing.assert_close(ours.per_source[:, 0], torch.tensor(separate), rtol=1e-5, atol=1e-5)
    stats = read_stats(RunDir(runs["reward"]))
    torch.testing.assert_close(ours.per_source[:, 1], (torch.tensor(separate) - stats["mean"]) / stats["std"], rtol=1e-4, atol=1e-4)
    # Scoring switched adapters and back: the policy is active and the only trainable adapter.
    assert gp.model.active_adapter == "policy"
    assert {n for n, p in gp.model.named_parameters() if p.requires_grad} == {n for n, _ in gp.model.named_parameters() if ".policy." in n}


def test_reward_source_errors_name_the_key(runs, tiny_data, tmp_path):
    from align.rlhf.rewards import reward_runs
    from align.stages.stage_run import resolve_base

    bad = [
        ([], "rewards: at least one reward source is required"),
        ([{"judge": "format", "reward_run": "x"}], "rewards[0]: set exactly one of judge and reward_run"),
        ([{"judge": "format", "weight": 0}], "rewards[0].weight: must be a finite non-zero number"),
        ([{"judge": "format"}, {"judge": "format"}], "rewards[1].name: 'format' is used by rewards[0] too"),
        ([{"reward_run": "x", "args": {"a": 1}}], "rewards[0].args: only a judge takes arguments"),
        ([{"judge": "nosuch"}], "rewards[0].judge: unknown judge 'nosuch'"),
        ([{"judge": "length", "wieght": 2}], "unknown key 'rewards[0].wieght' (did you mean 'rewards[0].weight'?)"),
    ]
    for rewards, message in bad:
        with pytest.raises(ConfigError) as info:
            from align.stages.registry import load_stage_config

            load_stage_config("grpo", None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "x", parent_run=str(runs["sft"]), rewards=rewards))
        assert message in str(info.value), str(info.value)
    cfg = group_config(runs, tiny_data, rewards=[{"reward_run": str(runs["sft"])}])
    base, _ = resolve_base(cfg)
    with pytest.raises(ConfigError, match=r"rewards\[0\].reward_run: .* is a sft run, not a reward-model run"):
        reward_runs(cfg.rewards, base)
    from align.modeling.models import ModelRef
    from align.rlhf.options import RewardSource

    (tmp_path / "config.json").write_text("{}")  # another "base model": its content hash differs
    with pytest.raises(ConfigError, match=r"rewards\[0\].reward_run: .* was trained on another base model"):
        reward_runs([RewardSource(reward_run=str(runs["reward"]))], ModelRef(str(tmp_path), str(tmp_path), True))
    # The answer judge without references in the data stops before anything is written.
    from align.stages.registry import run_stage

    cfg = group_config(runs, tiny_data, name="no-answers", rewards=[{"judge": "answer"}])
    with pytest.raises(ConfigError, match=r"rewards\[0\].judge: judge 'answer' needs reference answers"):
        run_stage(cfg)
    assert not Path(cfg.output_dir).exists()


def test_online_configs_refuse_invalid_combinations(runs, tiny_data, tmp_path):
    from align.stages.registry import load_stage_config

    def load(stage, **extra):
        return load_stage_config(stage, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "x", parent_run=str(runs["sft"]),
                                                             rewards=[{"judge": "format"}], **extra))

    cases = [
        ("grpo", {"peft.method": "ia3"}, "peft.method: 'ia3'"),
        ("rloo", {"train.batch_size": 3}, "train.batch_size: train.batch_size * train.gradient_accumulation_steps (3 responses"),
        ("grpo", {"grpo.group_size": 1}, "grpo.group_size: must be at least 2"),
        ("grpo", {"train.max_steps": None}, "train.max_steps: required for GRPO"),
        ("rloo", {"rloo.clip_range": 1.5}, "rloo.clip_range: must be in (0, 1)"),
        ("grpo", {"grpo.loss_aggregation": "token-mean"}, "did you mean 'token_mean'?"),
        ("online_dpo", {"online.num_samples": 1}, "online.num_samples: must be at least 2, got 1"),
        ("online_dpo", {"online.pairing": "best_vs_worst"}, "did you mean 'best-vs-worst'?"),
        ("online_dpo", {"dpo.beta": 0}, "dpo.beta: must be positive"),
    ]
    for stage, extra, message in cases:
        with pytest.raises(ConfigError) as info:
            load(stage, **extra)
        assert message in str(info.value), (stage, str(info.value))
    assert load("rloo").rloo.kl_in == "reward" and load("grpo").grpo.kl_in == "loss"


# --------------------------------------------------------------------------- GRPO / RLOO


def test_fresh_policy_kl_is_zero_and_a_step_changes_only_the_policy(runs, tiny_data):
    from align.modeling.train_setup import optimizer_and_schedule
    from align.rlhf import group as G
    from align.rlhf.estimators import GroupRelative

    cfg = group_config(runs, tiny_data, rewards=[{"judge": "online_scorers:chars", "weight": 0.1}, {"reward_run": str(runs["reward"])}])
    gp = policy(cfg)
    first = G.held_out(gp, PROMPTS, cfg, seed=0)
    assert first["eval/kl"] == 0.0  # the fresh adapter (B = 0) is the reference exactly
    roll = G.rollout(gp, PROMPTS[:2], cfg)
    with torch.no_grad():
        torch.testing.assert_close(gp.logprobs(roll.seq, roll.attn, roll.n_resp), gp.reference_logprobs(roll.seq, roll.attn, roll.n_resp), rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in gp.model.named_parameters()}
    head = {n: p.detach().clone() for n, p in gp.rewards.score_heads[0].named_parameters()}
    optimizer, scheduler = optimizer_and_schedule(cfg, gp.trainable_parameters(), gp.model, G.optimizer_updates(cfg))
    torch.manual_seed(0)
    for _ in range(2):  # lora_A moves from the second update on (lora_B starts at 0)
        metrics = G.group_step(gp, cfg, PROMPTS[:2], optimizer, scheduler, GroupRelative())
    changed = {n for n, p in gp.model.named_parameters() if not torch.equal(before[n], p.detach())}
    policy_params = {n for n in before if ".policy." in n}
    assert changed == policy_params, (sorted(changed - policy_params)[:3], sorted(policy_params - changed)[:3])
    assert all(torch.equal(head[n], p) for n, p in gp.rewards.score_heads[0].named_parameters())
    for key in ("grpo/loss", "grpo/kl", "grpo/clip_frac", "grpo/entropy", "grpo/reward/chars", "grpo/reward/rm1",
                "grpo/reward/total", "grpo/groups_without_signal", "time/generation_s"):
        assert key in metrics, key
    assert G.held_out(gp, PROMPTS, cfg, seed=0)["eval/kl"] != 0.0


def test_grpo_stage_runs_checkpoints_and_resumes_to_the_same_adapter(runs, tiny_data):
    from safetensors.torch import load_file

    from align.rlhf import loop
    from align.stages.registry import run_stage

    extra = {"train.max_steps": 3, "train.save_steps": 1, "train.eval_steps": 2}
    full = run_stage(group_config(runs, tiny_data, name="grpo-full", **extra))
    manifest = json.loads((full.path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["steps"] == 3
    assert manifest["summary"]["eval_kl_after"] > 0 and manifest["summary"]["parameters"]["adapter_bytes"] > 0
    rows = read_metrics(full.path)
    assert rows[0]["_step"] == 0 and rows[0]["eval/kl"] == 0.0
    assert [r["_step"] for r in rows if "grpo/loss" in r] == [1, 2, 3] and any("eval/kl" in r and r["_step"] == 2 for r in rows)
    assert get_stage("grpo").summary(manifest["summary"])[0].startswith("  held-out reward")

    class Crash(Exception):
        pass

    original = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        folder = original(*args, **kwargs)
        if args[1] == 2:
            raise Crash()
        return folder

    loop.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            run_stage(group_config(runs, tiny_data, name="grpo-part", **extra))
    finally:
        loop.save_checkpoint = original
    resumed = run_stage(group_config(runs, tiny_data, name="grpo-part", resume=True, **extra))
    a = load_file(full.path / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.path / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["_step"] for r in read_metrics(resumed.path) if "grpo/loss" in r] == [1, 2, 3]


def test_rloo_stage_puts_the_kl_in_the_reward(runs, tiny_data):
    from align.stages.registry import run_stage

    run = run_stage(group_config(runs, tiny_data, name="rloo", cls=RLOOConfig,
                                rewards=[{"judge": "online_scorers:chars", "weight": 0.1}, {"reward_run": str(runs["reward"]), "weight": 0.5}]))
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and (run.path / "adapter" / "adapter_model.safetensors").is_file()
    steps = [r for r in read_metrics(run.path) if "rloo/loss" in r]
    assert len(steps) == 2 and all("rloo/kl" in r and "rloo/reward/rm1" in r and "rloo/kl_loss_term" not in r for r in steps)
    assert steps[0]["rloo/kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the fresh adapter
    from align.core.artifacts import RunDir
    from align.evaluation.metrics import compute_table

    tokens = compute_table({"rloo": RunDir(run.path)}, None)["rloo"]["tokens"]
    assert tokens == sum(r["rloo/rollout_tokens"] for r in steps) > 0, "the compute table counts the rollouts' tokens"


# --------------------------------------------------------------------------- online DPO


def online_config(runs, tiny_data, name, **extra):
    return config(OnlineDPOConfig, runs, tiny_data, name, **{
        "online.rounds": 2, "online.prompts_per_round": 4, "online.num_samples": 3, "online.max_new_tokens": 6,
        "online.eval_prompts": 3, "train.max_steps": 3, "train.batch_size": 2, "train.learning_rate": 5e-3,
        "train.save_steps": 1, "train.logging_steps": 1, "lora.dropout": 0.0, **extra,
    })


@pytest.fixture(scope="module")
def online_run(runs, tiny_data):
    from align.stages.registry import run_stage

    cfg = online_config(runs, tiny_data, "online")
    return cfg, run_stage(cfg)


def test_online_dpo_round_two_samples_from_round_one_policy_against_the_sft_reference(runs, online_run):
    from peft import PeftModel

    from align.core.checkpoints import checkpoint_dirs
    from align.modeling import models
    from align.rlhf.rounds import read_round_samples, sample_round
    from align.rlhf.options import RewardSource
    from align.rlhf.rewards import Rewards
    from align.stages import online_dpo
    from align.stages.stage_run import resolve_base

    cfg, run = online_run
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["rounds"] == 2 and manifest["summary"]["steps"] == 6
    rounds = {r: read_round_samples(run.path, r) for r in (1, 2)}
    pairs = [json.loads(x) for x in (run.path / "rounds" / "round-2" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)

    # Resample both rounds' prompts with the same seeds: round 1 from the SFT model (the adapter
    # disabled), round 2 from round 1's adapter (its checkpoint).
    base, _ = resolve_base(cfg)
    tok = models.load_tokenizer(base, cfg.model)
    after_round_1 = next(folder for _, folder in checkpoint_dirs(run.path) if json.loads((folder / "state.json").read_text())["round"] == 1)
    model = PeftModel.from_pretrained(models.load_model(base, cfg.model), str(after_round_1 / "adapters"))
    judge = Rewards([RewardSource(judge="online_scorers:chars", weight=0.1)])

    from align.rlhf.rollout import LocalRollout

    engine = LocalRollout(model, tok, lambda: None)

    def resample(r, adapter: bool):
        prompts = [row["prompt"] for row in rounds[r]]
        if adapter:
            return sample_round(engine, judge, prompts, cfg.online, seed=cfg.train.seed, round_no=r).responses
        with model.disable_adapter():
            return sample_round(engine, judge, prompts, cfg.online, seed=cfg.train.seed, round_no=r).responses

    recorded = {r: [x for row in rounds[r] for x in row["responses"]] for r in (1, 2)}
    assert resample(1, adapter=False) == recorded[1]  # round 1: the SFT model
    assert resample(2, adapter=True) == recorded[2]  # round 2: round 1's policy ...
    assert resample(2, adapter=False) != recorded[2]  # ... not the SFT model

    # The reference stays the SFT model: round 1's first DPO step starts at its reference (loss ln 2,
    # rewards 0); round 2's first step starts away from it (a reference copied from round 1's adapter would give 0 again).
    train = [r for r in read_metrics(run.path) if "train/rewards/chosen" in r]
    first_round_1, first_round_2 = train[0], next(r for r in train if r["_step"] == 4)
    assert first_round_1["_step"] == 1 and first_round_1["train/loss"] == pytest.approx(LN2, abs=1e-5)
    assert first_round_1["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert abs(first_round_2["train/rewards/chosen"]) + abs(first_round_2["train/rewards/rejected"]) > 1e-4
    rows = read_metrics(run.path)
    assert rows[0]["_step"] == 0 and rows[0]["eval/kl"] == 0.0
    assert [r["online/round"] for r in rows if "online/round" in r] == [1, 2]
    assert online_dpo.summary_lines(manifest["summary"])[0].startswith("  2 rounds")


def test_a_dpo_round_on_a_model_with_a_reward_adapter_trains_only_the_policy(runs, tiny_data, tmp_path):
    """The online DPO model carries the reward adapter; TRL's trainer must neither train it nor use a copied reference."""
    from datasets import Dataset
    from peft import get_peft_model

    from align.core.artifacts import RunDir
    from align.preference.dpo_setup import dpo_trainer
    from align.modeling import models
    from align.modeling.adapters import peft_config_for
    from align.rlhf.rewards import Rewards, reward_runs
    from align.modeling.train_setup import trainer_kwargs
    from align.stages.stage_run import resolve_base

    cfg = config(OnlineDPOConfig, runs, tiny_data, "round", rewards=[{"reward_run": str(runs["reward"])}],
                 **{"train.max_steps": 2, "train.batch_size": 2, "train.learning_rate": 5e-3, "lora.dropout": 0.0})
    base, _ = resolve_base(cfg)
    tok = models.load_tokenizer(base, cfg.model)
    model = get_peft_model(models.load_model(base, cfg.model), peft_config_for(cfg))
    rewards = Rewards(cfg.rewards, model=model, tokenizer=tok, runs=reward_runs(cfg.rewards, base))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": "2"}], "rejected": [{"role": "assistant", "content": "two, I think"}]}
            for p in PROMPTS]
    args = {**trainer_kwargs(cfg, RunDir(tmp_path / "r"), "cpu", has_eval=False, model=model.get_base_model(), rows_per_example=2),
            "save_strategy": "no"}
    trainer = dpo_trainer(cfg, model, tok, Dataset.from_list(rows), None, args)
    assert set(trainer.model.peft_config) == {"default", "reward0"}  # no "ref" copy: the reference is adapters disabled
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(".default." in n for n in changed)
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if ".reward0." in n)
    scores = rewards.score(PROMPTS[:1], ["2"])  # the reward adapter still scores after the round
    assert torch.isfinite(scores.total).all()


def test_online_dpo_resumes_after_a_round_to_the_same_adapter(runs, tiny_data, online_run):
    from safetensors.torch import load_file

    from align.rlhf import loop
    from align.stages.registry import run_stage

    class Crash(Exception):
        pass

    original = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash()  # right after round 1's checkpoint

    loop.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            run_stage(online_config(runs, tiny_data, "online-part"))
    finally:
        loop.save_checkpoint = original
    resumed = run_stage(online_config(runs, tiny_data, "online-part", resume=True))
    full = online_run[1]
    a = load_file(full.path / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.path / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows = read_metrics(resumed.path)
    assert [r["online/round"] for r in rows if "online/round" in r] == [1, 2]  # round 1 kept once, round 2 trained after the resume
    manifest = json.loads((resumed.path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["steps"] == 6
    assert manifest["summary"]["pairs"] == json.loads((full.path / "manifest.json").read_text())["summary"]["pairs"]


# --------------------------------------------------------------------------- keep the best adapter within a KL budget


def test_keep_best_picks_the_highest_reward_within_the_budget():
    from align.rlhf.keep_best import KeepBest

    keep = KeepBest(1.0, "eval/reward/total")
    script = [(0, 0.0, 0.0), (1, 1.0, 0.5), (2, 3.0, 2.0), (3, 1.0, 0.2), (4, float("nan"), 0.1), (5, 0.9, 0.9), (6, 1.5, 1.0)]
    kept = [s for s, r, kl in script if keep.offer(s, {"eval/reward/total": r, "eval/kl": kl}, lambda s=s: {"w": torch.tensor([float(s)])})]
    # step 2 is over the budget, step 3 ties step 1 (the earlier stays), NaN never counts, 1.0 is within a budget of 1.0
    assert kept == [0, 1, 6] and keep.step == 6 and keep.weights["w"].item() == 6.0
    assert not KeepBest(None, "eval/reward/total").offer(0, {"eval/reward/total": 1.0, "eval/kl": 0.0}, dict)
    assert not keep.offer(7, {"eval/kl": 0.0}, dict)  # an evaluation without the reward


def test_grpo_keeps_the_adapter_of_the_best_evaluation_within_the_kl_budget(runs, tiny_data, monkeypatch):
    """Scripted held-out evaluations (steps 0..3): the best within budget 1.0 is step 1; adapter/ is step 1's adapter,
    the last adapter stays in checkpoint-3, and a run killed after step 2 and resumed keeps the same one."""
    from safetensors.torch import load_file

    from align.rlhf import group as G
    from align.rlhf import loop
    from align.stages.registry import run_stage

    script = [(0.0, 0.0), (1.0, 0.5), (3.0, 2.0), (0.8, 0.9)]  # (reward, KL) of the evaluations at steps 0, 1, 2, 3
    evaluations = []

    def scripted(gp, prompts, cfg, seed):
        reward, kl = script[len(evaluations)]
        evaluations.append(reward)
        return {"eval/reward/total": reward, "eval/kl": kl}

    monkeypatch.setattr(G, "held_out", scripted)
    extra = {"train.max_steps": 3, "train.eval_steps": 1, "train.save_steps": 1, "train.save_total_limit": 5,
             "grpo.keep_best_within_kl": 1.0}
    run = run_stage(group_config(runs, tiny_data, name="grpo-keep", **extra))
    kept = load_file(run.path / "adapter" / "adapter_model.safetensors")
    step = {s: load_file(run.path / "checkpoints" / f"checkpoint-{s}" / "adapters" / "policy" / "adapter_model.safetensors") for s in (1, 3)}
    assert all(torch.equal(kept[k], step[1][k]) for k in kept)
    assert any(not torch.equal(kept[k], step[3][k]) for k in kept)  # the last adapter is another one, kept in its checkpoint
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["kept"]["step"] == 1 and summary["kept"]["reward"] == 1.0 and summary["kept"]["last_adapter"].endswith("checkpoint-3")
    assert any("kept from step 1" in line for line in get_stage("grpo").summary(summary))

    # Killed after step 2's checkpoint, resumed (evaluating step 3 only): the best so far (step 1) comes from that checkpoint.
    evaluations.clear()
    original = loop.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(*args, **kwargs):
        folder = original(*args, **kwargs)
        if args[1] == 2:
            raise Crash()
        return folder

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_stage(group_config(runs, tiny_data, name="grpo-keep-part", **extra))
    monkeypatch.setattr(loop, "save_checkpoint", original)
    resumed = run_stage(group_config(runs, tiny_data, name="grpo-keep-part", resume=True, **extra))
    again = load_file(resumed.path / "adapter" / "adapter_model.safetensors")
    assert max((kept[k] - again[k]).abs().max().item() for k in kept) <= 1e-6


def test_online_dpo_keeps_the_best_round_within_the_kl_budget(runs, tiny_data, monkeypatch):
    """Scripted held-out evaluations before round 1 and after rounds 1, 2: (0, 0), (1, 0.5), (3, 2.0); budget 1.0 keeps
    round 1's adapter; the last adapter is in the checkpoint of round 2."""
    from safetensors.torch import load_file

    from align.core.checkpoints import checkpoint_dirs
    from align.rlhf import rewards as R
    from align.stages import online_dpo
    from align.stages.registry import run_stage

    script = iter([(0.0, 0.0), (1.0, 0.5), (3.0, 2.0)])
    monkeypatch.setattr(R, "held_out_metrics", lambda *a: dict(zip(("eval/reward/total", "eval/kl"), next(script))))
    run = run_stage(online_config(runs, tiny_data, "online-keep", **{"train.eval_steps": 1, "online.keep_best_within_kl": 1.0}))
    by_round = {json.loads((f / "state.json").read_text())["round"]: f for _, f in checkpoint_dirs(run.path)}
    kept = load_file(run.path / "adapter" / "adapter_model.safetensors")
    first, last = (load_file(by_round[r] / "adapters" / "adapter_model.safetensors") for r in (1, 2))
    assert all(torch.equal(kept[k], first[k]) for k in kept) and any(not torch.equal(kept[k], last[k]) for k in kept)
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["kept"]["unit"] == "round" and summary["kept"]["step"] == 1
    assert any("kept from round 1" in line for line in online_dpo.summary_lines(summary))
