"""Runs that survive faults: kill -9 and resume, Ctrl-C/SIGTERM, NaN, out of memory, full disks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, read_metrics, tiny_overrides
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.core.config_loader import load_config
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig
from align.core.errors import AlignError, ConfigError


def nested(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def write_stage_config(path: Path, flat: dict) -> Path:
    path.write_text(yaml.safe_dump(nested(flat)))
    return path


def stage_overrides(stage, tmp_path, tiny_model_dir, tiny_data, sft_parent=None, **extra):
    common = {"train.max_steps": 24, "train.save_steps": 4, "train.batch_size": 2, "tracking": "none",
              "samples.num_prompts": 0, "train.learning_rate": 2e-3, "lora.dropout": 0.1, **extra}
    if stage == "sft":
        return tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "out", **common)
    return tiny_overrides(None, tiny_data["prefs"], tmp_path / "out", parent_run=str(sft_parent), **common)


def start(stage: str, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / f"{stage}.py"), "--config", str(config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kill_9_then_resume_matches_an_uninterrupted_run(stage, tmp_path, tiny_model_dir, tiny_data, sft_parent):
    flat = stage_overrides(stage, tmp_path, tiny_model_dir, tiny_data, sft_parent)
    # The uninterrupted reference run.
    ref_cfg = write_stage_config(tmp_path / "ref.yaml", {**flat, "output_dir": str(tmp_path / "ref")})
    ref = start(stage, ref_cfg)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]

    cfg = write_stage_config(tmp_path / "run.yaml", flat)
    run_dir = tmp_path / "out"
    proc = start(stage, cfg)
    wait_for(lambda: (run_dir / "checkpoints" / "checkpoint-8" / "COMPLETE").is_file(), proc)
    proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
    proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running", "a killed run is not marked finished"

    resumed = start(stage, cfg, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert "resuming from" in resumed.stderr.read()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert int(manifest["resumes"][0]["from_checkpoint"].rsplit("-", 1)[1]) >= 8

    a = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    max_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{stage}: kill -9 at/after step 8 of 24, resumed: max abs diff vs uninterrupted = {max_diff:.3g}")
    assert max_diff <= 1e-6
    steps = [r["_step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps)), "no step is logged twice after resuming"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_stops_cleanly(sig, code, tmp_path, tiny_model_dir, tiny_data):
    flat = stage_overrides("sft", tmp_path, tiny_model_dir, tiny_data, **{"train.save_steps": None, "train.max_steps": 200})
    cfg = write_stage_config(tmp_path / "run.yaml", flat)
    run_dir = tmp_path / "out"
    proc = start("sft", cfg)
    wait_for(lambda: run_dir.joinpath("metrics.jsonl").is_file() and any(
        "train/loss" in r for r in read_metrics(run_dir)), proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    stderr = proc.stderr.read()
    line = [x for x in stderr.splitlines() if x.startswith("interrupted:")]
    assert line and signal.Signals(sig).name in line[0] and "checkpoint saved in" in line[0] and "--resume" in line[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").is_file()
    assert (checkpoints[-1] / "optimizer.pt").is_file() and (checkpoints[-1] / "rng_state.pth").is_file()


class InjectNaN(TrainerCallback):
    """Turns the forward pass of one step into NaN (as a diverging run would)."""

    def __init__(self, at_step: int):
        self.at_step = at_step
        self.handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at_step and self.handle is None:
            embed = model.get_input_embeddings()
            self.handle = embed.register_forward_hook(lambda mod, inp, out: out * float("nan"))


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_data):
    from align.stages.registry import run_stage

    flat = stage_overrides("sft", tmp_path, tiny_model_dir, tiny_data, **{"train.max_steps": 10, "train.save_steps": 2})
    with pytest.raises(AlignError, match=r"non-finite gradient at step 5 .*last good checkpoint is .*checkpoint-4"):
        run_stage(load_config(SFTConfig, None, flat), callbacks=[InjectNaN(at_step=5)])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "step 5" in manifest["error"]
    weights = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


class RaiseOOM(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_settings_that_reduce_memory(tmp_path, tiny_model_dir, tiny_data):
    from align.stages.registry import run_stage

    flat = stage_overrides("sft", tmp_path, tiny_model_dir, tiny_data, **{"train.batch_size": 4})
    with pytest.raises(AlignError) as err:
        run_stage(load_config(SFTConfig, None, flat), callbacks=[RaiseOOM()])
    msg = str(err.value)
    assert msg.startswith("CUDA out of memory at step 2")
    assert "train.batch_size=2 with train.gradient_accumulation_steps=2" in msg
    assert "train.gradient_checkpointing=true" in msg and "model.quantization=4bit" in msg
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"


def test_full_disk_refuses_to_start(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    import shutil


    from align.stages.registry import run_stage

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    flat = stage_overrides("sft", tmp_path, tiny_model_dir, tiny_data)
    with pytest.raises(AlignError, match=r"output_dir: .* has 0\.00 GiB free; this stage needs about"):
        run_stage(load_config(SFTConfig, None, flat))
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_different_config(tmp_path, tiny_model_dir, tiny_data, sft_parent):
    from align.stages.registry import run_stage

    flat = stage_overrides("dpo", tmp_path, tiny_model_dir, tiny_data, sft_parent, **{"train.max_steps": 2})

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        run_stage(load_config(DPOConfig, None, flat), callbacks=[Boom()])
    with pytest.raises(ConfigError, match="resume: .* holds a run of a different config"):
        run_stage(load_config(DPOConfig, None, {**flat, "dpo.beta": 0.5, "resume": True}))
