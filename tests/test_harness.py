"""lm-evaluation-harness in process: `align lm-eval` scores a run's adapter exactly as the harness's own command line
does with `--model hf --model_args pretrained=BASE,peft=ADAPTER`, on a local task over a JSON-lines file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

pytest.importorskip("lm_eval")

TASK = "align_tiny_mc"


def local_task(folder: Path, n: int = 12) -> Path:
    """A multiple-choice task over a JSON-lines file: what the docs show for a task of your own."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 2), str(i * 3 + 5)], "answer": 0}
            for i in range(n)]
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir, tiny_data) -> Path:
    from align.core.config_loader import load_config
    from align.stages.registry import run_stage
    from align.stages.sft import SFTConfig

    out = tmp_path_factory.mktemp("lm-eval") / "sft"
    run_stage(load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], out, tracking="wandb")))
    return out


def harness_cli(base: Path, adapter: Path, tasks: Path, out: Path) -> dict:
    """lm_eval's own command line on the same task; its results file."""
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={base},peft={adapter}",
         "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8", "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"][TASK]


def test_align_lm_eval_matches_the_harness_command_line(sft_run, tiny_model_dir, tmp_path, capsys):
    from align.cli.main import main

    tasks = local_task(tmp_path / "tasks")
    assert main(["lm-eval", str(sft_run), "--tasks", TASK, "--include-path", str(tasks), "--with-base"]) == 0
    printed = capsys.readouterr().out
    assert f"| sft | {TASK} | acc |" in printed and f"| base | {TASK} | acc |" in printed
    recorded = json.loads((sft_run / "lm_eval.json").read_text())
    ours = {(r["model"], r["metric"]): r for r in recorded["rows"]}
    reference = harness_cli(tiny_model_dir, sft_run / "adapter", tasks, tmp_path / "cli")
    for metric in ("acc", "acc_norm"):
        assert ours[("sft", metric)]["value"] == pytest.approx(reference[f"{metric},none"], rel=1e-9, abs=0)
        assert ours[("sft", metric)]["stderr"] == pytest.approx(reference[f"{metric}_stderr,none"], rel=1e-9)
    assert ours[("sft", "acc")]["samples"] == 12 and ours[("sft", "acc")]["num_fewshot"] == 0
    # The results are in the run dir (the table and the harness's record), in W&B, and on the model card.
    table = [json.loads(line) for line in (sft_run / "lm_eval.jsonl").read_text().splitlines()]
    assert {(r["model"], r["metric"]) for r in table} == set(ours)
    assert recorded["settings"]["tasks"] == [TASK] and recorded["harness"]["sft"]["results"][TASK]
    metrics = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1][f"sft/lm_eval/{TASK}/acc"] == ours[("sft", "acc")]["value"]
    assert len(list((sft_run / "wandb").glob("offline-run-*"))) == 2, "the run's W&B run, resumed for the results"
    from align.core.artifacts import RunDir
    from align.modeling.model_card import model_card

    assert f"| sft | {TASK} | acc | {ours[('sft', 'acc')]['value']:.4g} |" in model_card(RunDir(sft_run))


def test_unknown_task_and_missing_run_are_one_line(sft_run, tmp_path, capsys):
    from align.cli.main import main

    tasks = local_task(tmp_path / "tasks")
    assert main(["lm-eval", str(sft_run), "--tasks", "align_tiny_mq", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"did you mean '{TASK}'" in err
    assert main(["lm-eval", str(tmp_path / "nope"), "--tasks", TASK]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_eval_stage_scores_every_policy_next_to_its_win_rates(sft_run, tiny_data, tmp_path):
    """The eval stage's lm_eval section: each policy on the one loaded base, the same figures as `align lm-eval`."""
    from align.cli.main import main
    from align.core.config_loader import load_config
    from align.stages.registry import run_stage
    from align.stages.dpo import DPOConfig
    from align.stages.eval import EvalConfig

    tasks = local_task(tmp_path / "tasks")
    dpo_run = tmp_path / "dpo"
    run_stage(load_config(DPOConfig, None, tiny_overrides(None, tiny_data["prefs"], dpo_run, parent_run=str(sft_run), tracking="none",
                                                        **{"train.learning_rate": 5e-2})))
    cfg = load_config(EvalConfig, None, {
        "output_dir": str(tmp_path / "pipe" / "eval"), "runs": {"sft": str(sft_run), "dpo": str(dpo_run)},
        "data.path": str(tiny_data["prefs"]), "data.eval_split": None, "data.eval_fraction": 0.25, "perplexity_data": None,
        "num_prompts": 2, "num_pairs": 2, "bootstrap": 10, "sampling.max_new_tokens": 2, "tracking": "none",
        "lm_eval.tasks": [TASK], "lm_eval.include_path": str(tasks),
    })
    run = run_stage(cfg)
    results = json.loads((run.path / "eval.json").read_text())
    staged = {(r["model"], r["metric"]): r["value"] for r in results["lm_eval"]["rows"]}
    assert set(staged) == {(p, m) for p in ("sft", "dpo") for m in ("acc", "acc_norm")}
    assert [json.loads(line)["model"] for line in (run.path / "lm_eval.jsonl").read_text().splitlines()] == ["sft", "sft", "dpo", "dpo"]
    report = (tmp_path / "pipe" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| policy |"))
    assert f"win rate vs sft (format) | {TASK} acc | {TASK} acc_norm |" in header

    assert main(["lm-eval", str(dpo_run), "--tasks", TASK, "--include-path", str(tasks), "--with-base"]) == 0
    alone = {(r["model"], r["metric"]): r["value"] for r in json.loads((dpo_run / "lm_eval.json").read_text())["rows"]}
    for metric in ("acc", "acc_norm"):
        assert staged[("dpo", metric)] == pytest.approx(alone[("dpo", metric)], rel=1e-9)
        assert staged[("sft", metric)] == pytest.approx(alone[("base", metric)], rel=1e-9), "sft is the DPO run's base"
