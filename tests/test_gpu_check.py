"""The GPU check's script, report and bench arguments, on the CPU (the check itself runs on a GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "recipes"))


def check(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    shown = check("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("The GPU check: one command")
    assert "recipes/gpu_report.py" in shown.stdout and "set -uo" not in shown.stdout


def test_dry_run_lists_every_step_within_the_budget_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    done = check("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu check (dry run): budget 570 s")
    steps = {line.split(" ")[0]: line for line in lines[1:]}
    assert set(steps) == {"prepare:", "pytest", "bench-1b", "bench-8b", "bench-online-1b", "families", "bench-1b-more", "report:"}
    assert "-m pytest -m gpu" in steps["pytest"] and f"--junitxml={out}/pytest.xml" in steps["pytest"]
    assert "--shape llama-1b" in steps["bench-1b"] and "--variants a,c,c-warm,b " in steps["bench-1b"]
    assert "--shape llama-8b" in steps["bench-8b"] and "--quantization 4bit --max-length 1024 --find-max-batch" in steps["bench-8b"]
    assert "--variants c,c-rows,c-sdpa,b-pf,c-liger " in steps["bench-1b-more"]
    assert "recipes/bench_online.py --shape llama-1b" in steps["bench-online-1b"] and "bench_online_1b.json" in steps["bench-online-1b"]
    if (REPO / "recipes" / "family_smoke.py").exists():
        assert "recipes/family_smoke.py --json" in steps["families"]
    else:
        assert "skipped: recipes/family_smoke.py is not in this tree" in steps["families"]
    limits = [int(steps[s].split("(<= ")[1].split(" s)")[0]) for s in ("pytest", "bench-1b", "bench-8b", "bench-online-1b", "families", "bench-1b-more")]
    assert sum(limits) <= 570, "the steps' own limits fit the 9.5-minute budget"
    assert not out.exists()


def test_only_and_budget_are_checked():
    done = check("--dry-run", "--only", "bench-8b", "--budget", "300")
    assert done.returncode == 0
    assert "budget 300 s" in done.stdout and "bench-8b" in done.stdout and "bench-1b" not in done.stdout
    for bad, needle in ((["--only", "bench-2b"], "--only: unknown step 'bench-2b'"), (["--budget", "8min"], "--budget: expected whole seconds"),
                        (["--frobnicate"], "unknown option '--frobnicate'"), (["--out"], "--out needs a value")):
        done = check(*bad, "--dry-run")
        assert done.returncode == 2 and needle in done.stderr, (bad, done.stderr)


def test_missing_wheels_stop_the_check_with_what_to_do(tmp_path):
    """A Python without trl & co (its site-packages switched off) and no wheels: exit 2, naming them."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    empty = tmp_path / "wheels"
    empty.mkdir()
    done = check("--wheels", str(empty), "--out", str(tmp_path / "out"),
                 env={"PYTHON": str(python), "GPU_CHECK_SITE": str(tmp_path / "site"), "PYTHONPATH": ""})
    assert done.returncode == 2
    assert "missing wheels: trl datasets dill multiprocess bitsandbytes liger_kernel" in done.stderr
    assert "make gpu-wheels" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "site").exists()


# --------------------------------------------------------------------------- the report


def bench(variants: dict[str, dict], ceiling=800.0, **extra) -> dict:
    results = []
    for name, r in variants.items():
        results.append({"variant": name, "batch": 8, "batch_is_cap": False, "median_step_s": 8 / r["pairs_per_s"],
                        "tokens_per_s": 800 * r["pairs_per_s"], "setup_s": 1.0, "gradient_checkpointing": name == "a",
                        "liger": name == "b", "share_of_ceiling": r.get("share", 0.1), "tflops": ceiling * r.get("share", 0.1),
                        **r})
    return {"device": "cuda:0 (NVIDIA H100 80GB HBM3)", "shape": "llama-1b", "non_embedding_params": 973e6,
            "quantization": "none", "ceiling_tflops": ceiling, "results": results, **extra}


def test_report_is_one_table_with_the_targets_judged(tmp_path):
    from gpu_report import COLUMNS, report

    (tmp_path / "steps.tsv").write_text("pytest\tok\t41\texit 0\nbench-1b\tok\t130\texit 0\nbench-8b\ttimeout\t160\texit 124\n"
                                        "families\tskipped\t0\trecipes/family_smoke.py is not in this tree\n")
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "versions": {"torch": "2.11"}}))
    (tmp_path / "bench_1b.json").write_text(json.dumps(bench({
        "a": {"pairs_per_s": 8.0, "peak_memory_mb": 8000},
        "b": {"pairs_per_s": 24.0, "peak_memory_mb": 37000},
        "c": {"pairs_per_s": 22.0, "peak_memory_mb": 7000, "share": 0.45, "fast_path": "DPO fast path: shared_prefix (flex_attention, padding-free), ref_cache"},
        "c-warm": {"pairs_per_s": 40.0, "peak_memory_mb": 9000, "share": 0.5},
    })))
    (tmp_path / "bench_1b_more.json").write_text(json.dumps(bench({
        "c": {"pairs_per_s": 20.0, "peak_memory_mb": 7000}, "c-rows": {"pairs_per_s": 16.0, "peak_memory_mb": 9000},
    }, ratios=[{"mine": "c", "other": "c-rows", "pairs_per_s": 1.25, "peak_memory": 0.78}])))
    (tmp_path / "bench_8b.json").write_text(json.dumps(bench({
        "a": {"pairs_per_s": 5.0, "peak_memory_mb": 30000, "batch": 32, "batch_is_cap": True},
    })))
    (tmp_path / "bench_online_1b.json").write_text(json.dumps({"settings": "llama-1b, 8 prompts x 4", "correctness_ok": True, "results": [
        {"variant": "trl", "median_step_s": 4.0, "responses_per_s": 8.0, "tokens_per_s": 900, "peak_memory_mb": 9000},
        {"variant": "ours", "median_step_s": 1.6, "responses_per_s": 20.0, "tokens_per_s": 2300, "peak_memory_mb": 9500}],
        "table": ["correctness: ... (PASS, tolerance 1e-05)"]}))
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_liger" time="12.5"/>'
        '<testcase classname="tests.test_gpu" name="test_qlora" time="3"><failure message="boom&#10;more"/></testcase>'
        "</testsuite></testsuites>")
    text, rows = report(tmp_path, total_s=470, budget_s=480)
    lines = text.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and all(line.startswith("| ") for line in lines)
    assert sum(1 for line in lines if line.startswith("| part ")) == 1, "one table"
    judged = {r["what"]: r["status"] for r in rows if r["part"] == "target"}
    assert judged["1B c (cold cache: a first epoch) / a pairs/s"] == "PASS"  # 2.75x >= 2.5x
    assert judged["1B c (cold cache: a first epoch) / b pairs/s"] == "FAIL"  # 0.92x < 1.5x
    assert judged["1B c (cold cache: a first epoch) peak memory / a"] == "PASS"
    assert judged["1B c (cold cache: a first epoch) share of bf16 ceiling"] == "PASS"
    assert judged["1B c-warm (cache filled) peak memory / a"] == "FAIL"
    assert judged["8B QLoRA c / a pairs/s, each at its largest batch"] == "n/a", "c was not measured: no verdict"
    assert judged["online 1B ours / trl responses/s"] == "PASS"  # 2.5x
    assert judged["online 1B ours peak memory / trl"] == "FAIL"  # 1.06x
    assert judged["online 1B group advantages = TRL's"] == "PASS"
    assert any(r["what"] == "ours" and r["pairs/s"] == "20.00" for r in rows if r["part"] == "bench online 1B")
    status = {(r["part"], r["what"]): r["status"] for r in rows}
    assert status[("pytest", "test_gpu::test_qlora")] == "FAILED" and status[("pytest", "test_gpu::test_liger")] == "passed"
    assert status[("bench 8B QLoRA", "(step)")] == "timeout"
    assert status[("step", "families")] == "skipped" and status[("step", "total")] == "ok"
    assert any(r["what"] == "a" and r["batch"] == ">=32 (cap)" for r in rows if r["part"] == "bench 8B QLoRA")
    ablation = next(r for r in rows if r["part"] == "bench 1B ablations" and r["what"] == "c / c-rows")
    assert (ablation["pairs/s"], ablation["peak MB"]) == ("1.25x", "0.78x")


def test_report_of_an_empty_folder_says_nothing_ran(tmp_path):
    from gpu_report import main

    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().count("\n") == 2, "the header only"
    assert main([str(tmp_path / "absent")]) == 2


def test_family_results_are_rendered_whatever_their_layout(tmp_path):
    from gpu_report import family_rows

    listed = family_rows([{"family": "gemma2", "status": "ok", "sft_s": 3.5}, {"name": "qwen2", "ok": False}], "ok")
    assert [(r["what"], r["status"]) for r in listed] == [("gemma2", "ok"), ("qwen2", "failed")]
    assert "sft_s 3.5" in listed[0]["notes"]
    keyed = family_rows({"results": {"llama": {"status": "ok"}, "phi3": "failed"}}, "ok")
    assert [(r["what"], r["status"]) for r in keyed] == [("llama", "ok"), ("phi3", "failed")]


# --------------------------------------------------------------------------- bench arguments


def test_bench_runs_liger_variants_last_and_refuses_unknown_ones(capsys):
    from bench_dpo import parse_args

    args = parse_args(["--variants", "b,a,c-liger,c,c-warm"])
    assert args.order == ["a", "c", "c-warm", "b", "c-liger"]
    for bad, needle in ((["--variants", "a,d"], "unknown variant(s) d"), (["--variants", "c-warm"], "c-warm reads the reference cache"),
                        (["--variants", "c-warm,c"], "list c before it")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
