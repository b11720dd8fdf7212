"""Pipelines: stages in order, finished matching stages skipped, changed stages replaced with --force, no secrets."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def write_pipeline(folder, model_dir, data):
    (folder / "sft.yaml").write_text(
        f"output_dir: unused\nmodel:\n  name_or_path: {model_dir}\ndata:\n  path: {data['sft']}\n  eval_split: null\n"
        "train:\n  max_steps: 1\n  batch_size: 4\n  max_length: 64\nsamples:\n  num_prompts: 1\n  max_new_tokens: 2\n"
    )
    (folder / "dpo.yaml").write_text(
        f"output_dir: unused\nparent_run: unused\ndata:\n  path: {data['prefs']}\n  eval_split: null\n"
        "train:\n  max_steps: 1\n  batch_size: 4\n  max_length: 64\nsamples:\n  num_prompts: 1\n  max_new_tokens: 2\n"
    )
    path = folder / "pipeline.yaml"
    path.write_text(
        f"name: tiny-pipeline\noutput_dir: {folder / 'runs'}\nstages:\n"
        "  - {name: sft, stage: sft, config: sft.yaml}\n"
        "  - {name: dpo, stage: dpo, config: dpo.yaml, parent: sft}\n"
    )
    return path


def run_pipeline(path, *overrides, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pipeline.py"), "--config", str(path), *overrides],
        capture_output=True, text=True, timeout=600, env=env,
    )


def run_ids(folder):
    return {s: json.loads((folder / "runs" / s / "manifest.json").read_text())["run_id"] for s in ("sft", "dpo")}


def test_pipeline_runs_then_skips_then_replaces_a_changed_stage_only_with_force(tmp_path, tiny_model_dir, tiny_data):
    import os

    path = write_pipeline(tmp_path, tiny_model_dir, tiny_data)
    env = {**os.environ, "WANDB_API_KEY": "fake-key-0123456789abcdef", "HF_TOKEN": "hf_fake_token_0123456789", "WANDB_MODE": "offline"}
    first = run_pipeline(path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = run_ids(tmp_path)
    assert "held-out DPO reward accuracy" in first.stdout and "W&B" in first.stdout

    second = run_pipeline(path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert run_ids(tmp_path) == ids
    assert second.stdout.count("skipped, already finished") == 2
    assert "sft: skipped" in second.stderr and "dpo: skipped" in second.stderr

    # A changed stage would replace its finished run: that takes --force (which reruns every stage).
    refused = run_pipeline(path, "dpo.dpo.beta=0.2", env=env)
    assert refused.returncode == 2 and run_ids(tmp_path) == ids
    assert f"error: output_dir: {tmp_path / 'runs' / 'dpo'} holds a finished dpo run of another config" in refused.stderr
    assert "--force replaces it" in refused.stderr
    third = run_pipeline(path, "dpo.dpo.beta=0.2", "--force", env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    after = run_ids(tmp_path)
    assert after["sft"] != ids["sft"] and after["dpo"] != ids["dpo"]

    # Secrets in the environment never reach a RunDir, its W&B files or the logs.
    for file in (tmp_path / "runs").rglob("*"):
        if file.is_file():
            blob = file.read_bytes()
            assert b"fake-key-0123456789abcdef" not in blob and b"hf_fake_token_0123456789" not in blob, file
    for proc in (first, second, refused, third):
        assert "fake-key-0123456789abcdef" not in proc.stdout + proc.stderr


def test_full_pipeline_links_reward_ppo_and_eval_and_writes_the_report(tmp_path, tiny_model_dir, tiny_data):
    """The `full` profile's wiring: links fill reward_run and the eval's runs; the report lands
    in the pipeline's output dir."""
    path = write_pipeline(tmp_path, tiny_model_dir, tiny_data)
    tiny = "train:\n  max_steps: 1\n  batch_size: 4\n  max_length: 64\nsamples:\n  num_prompts: 1\n  max_new_tokens: 2\n"
    (tmp_path / "reward.yaml").write_text(
        f"output_dir: unused\nparent_run: unused\ndata:\n  path: {tiny_data['prefs']}\n  eval_split: null\n"
        f"reward:\n  stats_samples: 8\n{tiny}")
    (tmp_path / "ppo.yaml").write_text(
        f"output_dir: unused\nparent_run: unused\nreward_run: unused\ndata:\n  path: {tiny_data['prefs']}\n  eval_split: null\n"
        f"ppo:\n  rollout_batch_size: 2\n  minibatch_size: 2\n  max_new_tokens: 4\n{tiny}")
    (tmp_path / "eval.yaml").write_text(
        f"output_dir: unused\nreward_run: unused\nruns: {{}}\ndata:\n  path: {tiny_data['prefs']}\n  eval_split: null\n"
        f"  eval_fraction: 0.25\nperplexity_data: {tiny_data['sft']}\nnum_prompts: 3\nnum_pairs: 3\nperplexity_rows: 2\n"
        "bootstrap: 50\njudges: [format]\nsampling:\n  max_new_tokens: 4\n")
    path.write_text(path.read_text() + (
        "  - {name: reward, stage: reward, config: reward.yaml, parent: sft}\n"
        "  - {name: ppo, stage: ppo, config: ppo.yaml, parent: sft, links: {reward_run: reward}}\n"
        "  - {name: eval, stage: eval, config: eval.yaml, links: {reward_run: reward, runs: {sft: sft, dpo: dpo, ppo: ppo}}}\n"
    ))
    proc = run_pipeline(path, "tracking=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    ppo_cfg = (runs / "ppo" / "config.yaml").read_text()
    assert f"reward_run: {runs / 'reward'}" in ppo_cfg and f"parent_run: {runs / 'sft'}" in ppo_cfg
    results = json.loads((runs / "eval" / "eval.json").read_text())
    assert set(results["policies"]) == {"sft", "dpo", "ppo"}
    assert (runs / "report.md").is_file() and (runs / "report.html").is_file()
    assert "win rate vs sft" in (runs / "report.md").read_text()
