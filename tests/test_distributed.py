"""Two CPU processes (torchrun, gloo; accelerate sets up DDP): the same training as one process.

`accelerate launch` starts several CPU processes only through mpirun, so the CPU test uses
torchrun, which accelerate detects the same way it detects its own launcher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, read_metrics, tiny_overrides

DRIVER = REPO / "tests" / "stage_driver.py"
LAUNCH_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_launcher_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file recipes/accelerate/")
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value in {"MULTI_GPU", "FSDP", "DEEPSPEED"}


def run_stage(stage, overrides, record, processes):
    overrides_file = record.parent / f"{record.name}.json"
    record.mkdir(parents=True)
    overrides_file.write_text(json.dumps(overrides))
    if processes == 1:
        cmd = [sys.executable, str(DRIVER)]
    else:
        # --standalone: a free port of its own, so parallel test workers (and other jobs) never share one
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), str(DRIVER)]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, stage, str(overrides_file), str(record)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_match_one_with_double_batch(stage, tmp_path, tiny_model_dir, tiny_data, sft_parent):
    def overrides(name, batch):
        common = {"train.max_steps": 3, "train.batch_size": batch, "lora.dropout": 0.0, "samples.num_prompts": 1}
        if stage == "sft":
            return tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / name, **common)
        return tiny_overrides(None, tiny_data["prefs"], tmp_path / name, parent_run=str(sft_parent), **common)

    run_stage(stage, overrides("one", 4), tmp_path / "rec-one", processes=1)
    run_stage(stage, overrides("two", 2), tmp_path / "rec-two", processes=2)

    # Both ranks end with the same adapter, equal to the single-process one.
    rank0 = torch.load(tmp_path / "rec-two" / "rank0.pt")
    rank1 = torch.load(tmp_path / "rec-two" / "rank1.pt")
    single = torch.load(tmp_path / "rec-one" / "rank0.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert max((rank0[k] - single[k]).abs().max().item() for k in rank0) < 1e-5

    # Per-step training loss of 2 x batch b equals 1 x batch 2b.
    losses = {name: [r["train/loss"] for r in read_metrics(tmp_path / name) if "train/loss" in r] for name in ("one", "two")}
    assert len(losses["two"]) == 3
    assert losses["two"] == pytest.approx(losses["one"], abs=1e-5)

    # Only rank 0 wrote the RunDir and the W&B run.
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    steps = [r["_step"] for r in read_metrics(tmp_path / "two")]
    assert steps == sorted(steps) and len({(r["_step"], tuple(sorted(r))) for r in read_metrics(tmp_path / "two")}) == len(steps)
    assert len((tmp_path / "two" / "samples.jsonl").read_text().splitlines()) == 1
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["train"]["batch_size"] == 2
