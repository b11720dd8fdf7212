"""recipes/family_smoke.py, the GPU check's per-family SFT -> merge -> DPO script, in its CPU mode (--tiny)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO


def test_family_smoke_runs_sft_merge_dpo_and_reports_each_family(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "family_smoke.py"), "--tiny", "--families", "gemma2,qwen2.5",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "CPU"
    rows = {r["family"]: r for r in report["rows"]}
    assert set(rows) == {"gemma2", "qwen2.5"}
    for r in rows.values():
        assert r["ok"] and r["size"] == "tiny" and r["parameters"] > 0
        assert r["sft_s_per_step"] > 0 and r["dpo_s_per_step"] > 0 and r["dpo_peak_mb"] > 0
        assert abs(r["dpo_first_loss"] - math.log(2)) < 1e-3, "DPO starts at its reference, the merged SFT model"
    assert rows["qwen2.5"]["fast_path"].startswith("DPO fast path: shared_prefix (")
    assert "shared_prefix off" not in rows["qwen2.5"]["fast_path"]
    assert "final_logit_softcapping" in rows["gemma2"]["fast_path"]
    # One table row per family, and the merged SFT model each DPO ran on.
    assert proc.stdout.count("| gemma2 |") == 2 and proc.stdout.count("| qwen2.5 |") == 2
    assert (tmp_path / "work" / "gemma2" / "sft" / "merged" / "config.json").is_file()


def test_family_smoke_rejects_an_unknown_family(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "family_smoke.py"), "--tiny", "--families", "gemma-2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --families: unknown model family 'gemma-2' (did you mean 'gemma2'?); known: " + ", ".join(
            ["llama3", "qwen2.5", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "smollm2"]))
