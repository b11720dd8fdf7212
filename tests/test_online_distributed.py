"""The online stages on two CPU processes (torchrun, gloo) equal one process with the whole batch.

For GRPO, RLOO, PPO and online DPO: the adapter of 2 processes x P/2 prompts equals the adapter of
1 process x P prompts (per parameter, relative tolerance: the ranks compute log-probs on their
shares, one process on the whole batch, so sums round differently), and both ranks hold identical
adapters. A 2-process GRPO run killed (SIGKILL) after step 2 and resumed ends with the adapter of
the uninterrupted 2-process run. A reward adapter on the same base stays frozen on every rank. The
2-process RLOO and online DPO runs get the variables the FSDP and ZeRO-3 launch configs set.
Each test launches 1- and 2-process runs through tests/stage_driver.py (about 15 s of start-up each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, tiny_overrides

from align.core.config_loader import load_config
from align.core.errors import ConfigError

DRIVER = REPO / "tests" / "stage_driver.py"
SCORER = '''
def chars(prompt, response):
    return float(len(response))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sft_parent, tiny_data):
    """A reward run on the SFT run's merged model, and a folder with a scorer module for the subprocesses."""
    from align.stages.registry import run_stage
    from align.stages.reward import RewardConfig

    root = tmp_path_factory.mktemp("online-ddp")
    (root / "ddp_scorers.py").write_text(SCORER)
    run_stage(load_config(RewardConfig, None, tiny_overrides(
        None, tiny_data["prefs"], root / "reward", parent_run=str(sft_parent), tracking="none",
        **{"train.max_steps": 2, "reward.stats_samples": 8, "samples.num_prompts": 0},
    )))
    return {"root": root, "sft": sft_parent, "reward": root / "reward", "data": tiny_data["prefs"]}


def launch(setup, stage: str, name: str, overrides: dict, processes: int, env: dict | None = None, expect: int = 0):
    """Runs `stage` through tests/stage_driver.py on 1 process or 2 (torchrun); returns the run dir and record dir."""
    root = setup["root"]
    run_dir, record = root / name, root / f"rec-{name}"
    record.mkdir(parents=True, exist_ok=True)
    full = tiny_overrides(None, setup["data"], run_dir, parent_run=str(setup["sft"]), **{
        "tracking": "none", "samples.num_prompts": 1, "lora.dropout": 0.0, "train.logging_steps": 1, **overrides})
    (record / "overrides.json").write_text(json.dumps(full))
    cmd = [sys.executable, str(DRIVER)] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone", str(DRIVER)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **(env or {})}
    proc = subprocess.run([*cmd, stage, str(record / "overrides.json"), str(record)], capture_output=True, text=True,
                          timeout=900, env=environment)
    assert proc.returncode == expect, proc.stderr[-4000:]
    (record / "stderr.txt").write_text(proc.stderr)
    return run_dir, record


def weights(record, rank: int = 0, kind: str = "") -> dict[str, torch.Tensor]:
    return torch.load(record / f"rank{rank}{kind}.pt")


def assert_close_per_parameter(a: dict, b: dict, rtol: float = 1e-3) -> None:
    """Each tensor of `a` equals its twin in `b` within rtol of its norm."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = max(a[name].norm().item(), b[name].norm().item(), 1e-12)
        assert (a[name] - b[name]).norm().item() <= rtol * scale, name


def assert_ranks_identical(record) -> None:
    rank0, rank1 = weights(record, 0), weights(record, 1)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def adapter_file(run_dir, checkpoint: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = run_dir / "adapter" if checkpoint is None else run_dir / "checkpoints" / f"checkpoint-{checkpoint}" / "adapters" / "policy"
    return load_file(folder / "adapter_model.safetensors")


def group(stage: str, batch: int, **extra) -> dict:
    """4 prompts x 2 samples per step; 2 optimizer updates per step (batch 4 on 1 process, 2 per rank on 2)."""
    return {"rewards": [{"judge": "ddp_scorers:chars", "weight": 0.1}], "train.max_steps": 2, "train.batch_size": batch,
            "train.learning_rate": 5e-3, f"{stage}.prompts_per_step": 4, f"{stage}.group_size": 2,
            f"{stage}.max_new_tokens": 5, f"{stage}.eval_prompts": 3, **extra}


def test_grpo_on_two_processes_equals_one_resumes_and_keeps_the_reward_adapter_frozen(setup):
    rewards = [{"judge": "ddp_scorers:chars", "weight": 0.1}, {"reward_run": str(setup["reward"]), "weight": 0.5}]
    extra = {"rewards": rewards, "train.max_steps": 3, "train.save_steps": 1, "train.eval_steps": 2}
    one, rec_one = launch(setup, "grpo", "grpo-one", group("grpo", 4, **extra), processes=1)
    two, rec_two = launch(setup, "grpo", "grpo-two", group("grpo", 2, **extra), processes=2)

    # After 2 steps and at the end: 2 processes x 2 prompts = 1 process x 4 prompts; the ranks are identical.
    assert_close_per_parameter(adapter_file(two, 2), adapter_file(one, 2))
    assert_close_per_parameter(weights(rec_two), weights(rec_one))
    assert_ranks_identical(rec_two)
    # The step's metrics are the global batch's, logged once, by rank 0.
    rows = {name: [r for r in read_metrics(run) if "grpo/loss" in r] for name, run in (("one", one), ("two", two))}
    assert [r["_step"] for r in rows["two"]] == [1, 2, 3]
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("grpo/loss", "grpo/reward/total", "grpo/reward/rm1", "grpo/kl", "grpo/rollout_tokens", "grpo/clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
    evals = {name: [r["eval/reward/total"] for r in read_metrics(run) if "eval/reward/total" in r] for name, run in (("one", one), ("two", two))}
    assert len(evals["two"]) == 3 and evals["two"] == pytest.approx(evals["one"], rel=1e-4)  # held-out: 3 prompts over 2 ranks
    assert json.loads((two / "manifest.json").read_text())["status"] == "finished"

    # Only the policy adapter trained: the reward adapter equals the reward run's on both ranks.
    from safetensors.torch import load_file

    assert all(".policy." in n for n in weights(rec_two))
    trained_reward = load_file(setup["reward"] / "adapter" / "adapter_model.safetensors")
    for rank in (0, 1):
        lora = {n.replace(".reward1.", "."): t for n, t in weights(rec_two, rank, "-lora").items() if ".reward1." in n}
        assert lora.keys() == {k for k in trained_reward if "lora_" in k} and lora
        assert all(torch.equal(t, trained_reward[n].float()) for n, t in lora.items())

    # Killed (SIGKILL on rank 0) after the checkpoint of step 2, resumed on 2 processes: the uninterrupted run's adapter.
    part, _ = launch(setup, "grpo", "grpo-part", group("grpo", 2, **extra), processes=2,
                     env={"ALIGN_TEST_KILL_AFTER_CHECKPOINT": "2"}, expect=1)
    assert not (part / "adapter").exists()
    resumed, rec_resumed = launch(setup, "grpo", "grpo-part", group("grpo", 2, resume=True, **extra), processes=2)
    a, b = adapter_file(two), adapter_file(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert_ranks_identical(rec_resumed)
    assert [r["_step"] for r in read_metrics(resumed) if "grpo/loss" in r] == [1, 2, 3]


def launcher_env(config: str) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables `accelerate launch --config_file recipes/accelerate/<config>.yaml` sets,
    computed by accelerate itself (its launcher needs GPUs for these configs; torchrun starts the CPU processes)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "recipes" / "accelerate" / f"{config}.yaml"), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_rloo_on_two_processes_under_the_fsdp_config_equals_one(setup):
    """Launched with the variables of recipes/accelerate/fsdp.yaml (accelerate runs FSDP on GPUs only; here torchrun
    starts 2 CPU processes): RLOO says it runs data parallel, and 2 x 2 prompts equal 1 x 4."""
    fsdp = launcher_env("fsdp")
    assert fsdp["ACCELERATE_USE_FSDP"] == "true"
    _, rec_one = launch(setup, "rloo", "rloo-one", group("rloo", 4), processes=1)
    _, rec_two = launch(setup, "rloo", "rloo-two", group("rloo", 2), processes=2, env=fsdp)
    assert "the launch config asks for FSDP; the online stages run data parallel" in (rec_two / "stderr.txt").read_text()
    assert_close_per_parameter(weights(rec_two), weights(rec_one))
    assert_ranks_identical(rec_two)


def test_a_split_that_cannot_work_is_refused_naming_the_key(setup, monkeypatch):
    from align.stages.registry import run_stage
    from align.stages.grpo import GRPOConfig

    def load(**extra):
        overrides = tiny_overrides(None, setup["data"], setup["root"] / "refused", parent_run=str(setup["sft"]), tracking="none",
                                   **group("grpo", 2, **extra))
        return load_config(GRPOConfig, None, overrides)

    monkeypatch.syspath_prepend(str(setup["root"]))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"grpo.prompts_per_step: 4 prompts per step do not split evenly over 3 processes"):
        run_stage(load())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train.batch_size: each of the 2 processes samples 6 responses per step"):
        run_stage(load(**{"train.batch_size": 4, "grpo.group_size": 3}))
    assert not (setup["root"] / "refused").exists()


def test_ppo_on_two_processes_equals_one(setup):
    """4 prompts per step, minibatches of 2 responses (1 per rank), whitening over the global batch."""
    def ppo(**extra):
        return {"reward_run": str(setup["reward"]), "train.max_steps": 2, "train.learning_rate": 5e-3,
                "ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2, "ppo.max_new_tokens": 5, **extra}

    one, rec_one = launch(setup, "ppo", "ppo-one", ppo(), processes=1)
    two, rec_two = launch(setup, "ppo", "ppo-two", ppo(), processes=2)
    assert_close_per_parameter(weights(rec_two), weights(rec_one))
    assert_ranks_identical(rec_two)
    assert any(".value." in n for n in weights(rec_two))  # the value adapter trains on both ranks too
    rows = {name: [r for r in read_metrics(run) if "ppo/policy_loss" in r] for name, run in (("one", one), ("two", two))}
    for a, b in zip(rows["one"], rows["two"], strict=True):
        for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/kl", "ppo/reward_raw", "ppo/explained_variance"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key


def test_online_dpo_round_on_two_processes_under_the_zero3_config_equals_one(setup):
    """One round: 6 prompts x 3 samples, all pairs; 2 DPO steps of 4 pairs (4 on 1 process, 2 per rank on 2). The
    2 processes get the variables of recipes/accelerate/deepspeed_zero3.yaml (DeepSpeed is not even installed here):
    online DPO says it runs data parallel, and its DPO round trains under DDP."""
    zero3 = launcher_env("deepspeed_zero3")
    assert zero3["ACCELERATE_USE_DEEPSPEED"] == "true" and zero3["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    # The config's bf16 mixed precision would run the DPO round under CPU autocast, unlike the single process.
    assert zero3.pop("ACCELERATE_MIXED_PRECISION") == "bf16"
    def online(batch: int) -> dict:
        return {"rewards": [{"judge": "ddp_scorers:chars", "weight": 0.1}], "online.rounds": 1, "online.prompts_per_round": 6,
                "online.num_samples": 3, "online.pairing": "all-pairs", "online.max_new_tokens": 5, "online.eval_prompts": 3,
                "online.generation_batch_size": 2, "train.max_steps": 2, "train.batch_size": batch, "train.learning_rate": 5e-3}

    one, rec_one = launch(setup, "online_dpo", "online-one", online(4), processes=1)
    two, rec_two = launch(setup, "online_dpo", "online-two", online(2), processes=2, env=zero3)
    assert "the launch config asks for DeepSpeed; the online stages run data parallel" in (rec_two / "stderr.txt").read_text()
    # The round is the same: every response and score, whichever process sampled it.
    assert (two / "rounds" / "round-1" / "samples.jsonl").read_text() == (one / "rounds" / "round-1" / "samples.jsonl").read_text()
    assert_close_per_parameter(weights(rec_two), weights(rec_one))
    assert_ranks_identical(rec_two)
    steps = [r["_step"] for r in read_metrics(two) if "train/loss" in r]
    assert steps == [1, 2]


@pytest.mark.gpu
def test_fsdp_and_zero3_launch_configs_on_cuda_with_one_process(tmp_path, sft_parent, tiny_data, monkeypatch, caplog):
    """On a GPU (recipes/gpu_check.sh): GRPO under the FSDP config's variables and online DPO under ZeRO-3's, one
    process (`accelerate launch --num_processes 1` sets these variables and starts python). Accelerate would shard
    the model (FSDP) or start DeepSpeed for online DPO's trainer; the stages run data parallel instead and say so."""
    import logging

    from safetensors.torch import load_file


    from align.stages.registry import run_stage
    from align.stages.grpo import GRPOConfig
    from align.stages.online_dpo import OnlineDPOConfig

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    caplog.set_level(logging.INFO, logger="align")
    common = {"tracking": "none", "samples.num_prompts": 1, "rewards": [{"judge": "length", "args": {"max_words": 3}}]}
    for key, value in launcher_env("fsdp").items():
        monkeypatch.setenv(key, value)
    run = run_stage(load_config(GRPOConfig, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "grpo", parent_run=str(sft_parent), **common, **{
        "train.max_steps": 2, "train.batch_size": 4, "grpo.prompts_per_step": 2, "grpo.group_size": 4, "grpo.max_new_tokens": 6,
        "grpo.eval_prompts": 2})))
    assert "the launch config asks for FSDP; the online stages run data parallel" in caplog.text
    weights = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert any(v.float().abs().max() > 0 for k, v in weights.items() if "lora_B" in k), "the policy adapter moved"

    for key, value in launcher_env("deepspeed_zero3").items():
        monkeypatch.setenv(key, value)
    run = run_stage(load_config(OnlineDPOConfig, None, tiny_overrides(
        None, tiny_data["prefs"], tmp_path / "online", parent_run=str(sft_parent), **common, **{
            "online.rounds": 2, "online.prompts_per_round": 4, "online.num_samples": 3, "online.max_new_tokens": 6,
            "online.eval_prompts": 2, "train.max_steps": 1, "train.batch_size": 2})))
    assert "the launch config asks for DeepSpeed; the online stages run data parallel" in caplog.text
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "finished"


def test_a_rollout_gathered_from_two_shares_equals_one_sampled_whole(tiny_model_dir):
    """Two ranks' shares of different prompt and response widths, joined by gather_rollout (the collective replayed
    in one process): the token ids, masks and per-token tensors one process sampling every prompt holds."""
    from align.core.config import ModelConfig
    from align.modeling import models
    from align.modeling.generation import Sampling, sample_tokens
    from align.rlhf.distributed import World
    from align.rlhf.rollout import gather_rollout

    ref = models.resolve(str(tiny_model_dir))
    model, tok = models.load_model(ref, ModelConfig(), device="cpu"), models.load_tokenizer(ref, ModelConfig())
    prompts = [[{"role": "user", "content": text}] for text in ("Hi.", "Name three colours, please, in one line.", "Count to ten.")]
    s = Sampling(max_new_tokens=7, do_sample=True, num_return_sequences=2)
    seeds = list(range(100, 106))
    whole = sample_tokens(model, tok, prompts, s, row_seeds=seeds)
    shares = [sample_tokens(model, tok, prompts[:1], s, row_seeds=seeds[:2]), sample_tokens(model, tok, prompts[1:], s, row_seeds=seeds[2:])]
    widths = [r.seq.shape[1] - r.n_resp for r in shares]
    assert widths[0] < widths[1]  # the shares' prompts are padded to different widths
    tensors = [({"score": torch.arange(len(r.responses), dtype=torch.float32)}, {"logp": r.mask * 2}) for r in shares]
    sent = []

    class Rank1(World):
        def gather(self, obj):
            sent.append(obj)
            raise StopIteration

    class Rank0(World):
        def gather(self, obj):
            return [obj, sent[0]]

    with pytest.raises(StopIteration):
        gather_rollout(Rank1(1, 2), shares[1], *tensors[1], tok.pad_token_id)
    joined, rows = gather_rollout(Rank0(0, 2), shares[0], *tensors[0], tok.pad_token_id)
    assert joined.responses == whole.responses and joined.n_resp == whole.n_resp
    for name in ("seq", "attn", "mask", "has_eos"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert torch.equal(rows["logp"], whole.mask * 2) and rows["score"].tolist() == [0.0, 1.0, 0.0, 1.0, 2.0, 3.0]
