"""The demo pipeline on the real embedded model (slow: minutes on a CPU; `make test-all`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import LN2, REPO, read_metrics


@pytest.mark.slow
def test_demo_pipeline_on_embedded_model(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "recipes" / "pipeline.py"),
            "--config", str(REPO / "recipes/configs/smollm2-135m/pipeline.yaml"),
            f"output_dir={tmp_path}", "tracking=none",
            "sft.train.max_steps=4", "sft.data.max_eval_samples=16",
            "dpo.train.max_steps=4", "dpo.data.max_eval_samples=16", "dpo.samples.num_prompts=4",
        ],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    dpo = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert sft["status"] == dpo["status"] == "finished"
    assert sft["summary"]["eval_loss_after"] < sft["summary"]["eval_loss_before"]
    assert dpo["summary"]["eval_loss_before"] == pytest.approx(LN2, abs=1e-4)
    assert dpo["summary"]["eval_rewards/accuracies_before"] == 0.0
    assert dpo["summary"]["eval_rewards/accuracies_after"] > 0.5
    first = next(r for r in read_metrics(tmp_path / "dpo") if "train/loss" in r)
    assert first["_step"] >= 1
    assert "held-out DPO reward accuracy" in proc.stdout and "format judge" in proc.stdout
