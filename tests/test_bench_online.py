"""recipes/bench_online.py: its arguments, its dry run, and a whole run at a tiny random-init shape (both variants)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "bench_online.py"
sys.path.insert(0, str(REPO / "recipes"))


def test_arguments_are_checked(capsys):
    from bench_online import parse_args

    assert parse_args([]).order == ["trl", "ours"]
    assert parse_args(["--variants", "trl,ours,ours-k3-gradient"]).order[-1] == "ours-k3-gradient"
    for bad, needle in ((["--variants", "ours,vllm"], "unknown variant(s) vllm"), (["--micro", "5"], "--micro 5 must divide")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_dry_run_states_the_shared_settings_and_loads_nothing():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 prompts x 4 responses x <= 40 new tokens per step" in done.stdout and "beta 0.04" in done.stdout
    assert "--- trl ---" not in done.stdout


@pytest.mark.slow
def test_a_tiny_run_measures_both_variants_and_checks_the_advantages(tmp_path, embedded_dir):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--prompts", "2", "--group", "2", "--max-tokens", "4",
                           "--micro", "2", "--warmup", "1", "--steps", "1", "--eval-prompts", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    by = {r["variant"]: r for r in data["results"]}
    assert set(by) == {"trl", "ours"} and data["correctness_ok"] is True
    for r in by.values():
        assert r["median_step_s"] > 0 and r["responses_per_s"] == pytest.approx(4 / r["median_step_s"]) and r["peak_memory_mb"] > 0
        assert r["tokens_per_s"] > 0 and "eval_kl" in r
    assert by["trl"]["gradient_checkpointing"] is True  # TRL's default, as the bench promises
    assert any(line.startswith("ours / trl: ") for line in data["table"])
    assert "correctness: TRL's rewards (8 responses, 2 steps)" in done.stdout and "(PASS" in done.stdout
