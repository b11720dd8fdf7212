"""Non-finite results never finish: NaN weights fail the run (naming the step, keeping the last finite
checkpoint) and a failed run is not merged or exported; judges returning NaN or inf are errors unless a
source opts in; a run that never scored a response fails; learning rates above 1 warn."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.core.config_loader import load_config
from align.core.errors import ConfigError, DataError
from align.core.safeguards import NonFiniteWeightsError, NonFiniteWeightsGuard
from align.stages.grpo import GRPOConfig
from align.stages.sft import SFTConfig

JUDGES = '''
def nan_judge(prompt, response):
    return float("nan")

def inf_for_long(prompt, response):
    return float("inf") if len(response) > 3 else 1.0

def none_judge(prompt, response):
    return None
'''


@pytest.fixture()
def judges_module(tmp_path, monkeypatch):
    (tmp_path / "nonfinite_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nonfinite_judges"


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# --------------------------------------------------------------------------- weights


def test_a_run_driven_to_nan_weights_fails_and_is_not_merged_or_exported(tiny_model_dir, tiny_data, tmp_path, capsys):
    from align.cli import lifecycle
    from align.stages.registry import run_stage

    out = tmp_path / "nan"
    cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], out, tracking="none",
                                                       **{"train.learning_rate": 1e308, "train.max_steps": 1}))
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights after step 1 .*no checkpoint was saved before"):
        run_stage(cfg)
    m = manifest(out)
    assert m["status"] == "failed" and "step 1" in m["error"]
    assert not (out / "adapter").exists() and not (out / "merged").exists()  # nothing non-finite saved as the run's output
    for command in (["merge", str(out), "--output", str(tmp_path / "merged")], ["export", str(out), "--output", str(tmp_path / "exp")]):
        assert lifecycle.main(command) == 2
        err = capsys.readouterr().err
        assert f"error: {out}: the run failed (NonFiniteWeightsError" in err and "--allow-failed uses it anyway" in err
        assert not Path(command[-1]).exists()


class PoisonBeforeUpdate(TrainerCallback):
    """Makes one trainable weight infinite just before the optimizer step `at` (its gradient was finite)."""

    def __init__(self, at: int):
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))


def test_non_finite_weights_fail_before_the_checkpoint_and_keep_the_last_finite_one(tiny_model_dir, tiny_data, tmp_path):
    from align.stages.registry import run_stage

    out = tmp_path / "run"
    cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], out, tracking="none",
                                                       **{"train.max_steps": 4, "train.save_steps": 1, "samples.num_prompts": 0}))
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights after step 2 \(first in .*lora.*\); the last finite checkpoint is .*checkpoint-1"):
        run_stage(cfg, callbacks=[PoisonBeforeUpdate(at=2)])
    assert manifest(out)["status"] == "failed"
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_non_finite_held_out_loss_fails_the_evaluation(tiny_model_dir):
    from transformers import LlamaForCausalLM
    from transformers.trainer_callback import TrainerControl, TrainerState

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    model.requires_grad_(True)
    guard = NonFiniteWeightsGuard(lambda: Path("runs/x/checkpoints/checkpoint-4"))
    state, control = TrainerState(global_step=6), TrainerControl()
    guard.on_evaluate(None, state, control, metrics={"eval_loss": 1.5}, model=model)  # finite: passes
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite held-out loss \(nan\) after step 6; the last finite checkpoint is runs/x"):
        guard.on_evaluate(None, state, control, metrics={"eval_loss": math.nan}, model=model)
    with torch.no_grad():  # finite weights whose products overflow float32
        model.model.norm.weight.fill_(1e38)
        model.lm_head.weight.mul_(1000)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights after step 6 \(first in its outputs"):
        guard.on_train_end(None, state, control, model=model)


def test_grpo_driven_to_nan_weights_fails(sft_parent, tiny_data, tmp_path):
    from align.stages.registry import run_stage

    out = tmp_path / "grpo"
    cfg = load_config(GRPOConfig, None, tiny_overrides(
        None, tiny_data["prefs"], out, parent_run=str(sft_parent), tracking="none", rewards=[{"judge": "format", "default": 0.0}],
        **{"train.max_steps": 1, "train.batch_size": 4, "train.learning_rate": 1e308, "grpo.prompts_per_step": 2,
           "grpo.group_size": 2, "grpo.max_new_tokens": 4, "grpo.eval_prompts": 0, "samples.num_prompts": 0}))
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights after step 1"):
        run_stage(cfg)
    assert manifest(out)["status"] == "failed" and not (out / "adapter").exists()


def test_a_failed_run_is_merged_only_with_allow_failed(sft_parent, tmp_path, capsys, caplog):
    from align.cli import lifecycle
    from align.core.artifacts import RunDir

    run = tmp_path / "failed"
    shutil.copytree(sft_parent, run, ignore=shutil.ignore_patterns("wandb"))
    RunDir(run).update(status="running")
    assert lifecycle.main(["combine", str(sft_parent), str(run), "--output", str(tmp_path / "c")]) == 2
    assert "the run is still running, or its process died" in capsys.readouterr().err
    RunDir(run).update(status="failed", error="RuntimeError: boom")
    with caplog.at_level(logging.WARNING, logger="align"):
        assert lifecycle.main(["merge", str(run), "--output", str(tmp_path / "m"), "--allow-failed"]) == 0
    assert any("the run failed (RuntimeError: boom); used anyway" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "m" / "config.json").is_file()


# --------------------------------------------------------------------------- judges and unscored responses


def test_judges_returning_nan_or_inf_are_errors_naming_the_judge_and_a_prompt(judges_module):
    from align.rlhf.options import RewardSource
    from align.rlhf.rewards import Rewards

    prompts = [[{"role": "user", "content": "Say one."}], [{"role": "user", "content": "Say two."}]]
    with pytest.raises(DataError, match=r"rewards\[0\]: judge 'nonfinite_judges:nan_judge' returned nan for the prompt 'Say one.'"):
        Rewards([RewardSource(judge=f"{judges_module}:nan_judge")]).score(prompts, ["a", "b"])
    with pytest.raises(DataError, match=r"rewards\[1\]: judge 'nonfinite_judges:inf_for_long' returned inf for the prompt 'Say two.'"):
        Rewards([RewardSource(judge="length"), RewardSource(judge=f"{judges_module}:inf_for_long")]).score(prompts, ["a", "long"])
    mapped = Rewards([RewardSource(judge=f"{judges_module}:inf_for_long", nonfinite="default", default=-1.0)])
    assert mapped.score(prompts, ["a", "long"]).total.tolist() == [1.0, -1.0]
    unscored = Rewards([RewardSource(judge=f"{judges_module}:inf_for_long", nonfinite="default")]).score(prompts, ["a", "long"])
    assert unscored.total[0].item() == 1.0 and math.isnan(unscored.total[1].item())


def test_nonfinite_applies_to_judges_only(sft_parent, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"rewards\[0\].nonfinite: applies to judges only"):
        load_config(GRPOConfig, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "x", parent_run=str(sft_parent),
                                                      rewards=[{"reward_run": str(sft_parent), "nonfinite": "default"}]))


def test_unscored_steps_warn_and_a_run_that_scored_nothing_fails(caplog):
    from align.rlhf.rewards import UnscoredWatch

    watch = UnscoredWatch("grpo", share=0.5)
    with caplog.at_level(logging.WARNING, logger="align"):
        watch.observe(1, 4, "step 1")
        watch.observe(2, 4, "step 2")
    assert [r.getMessage() for r in caplog.records] == [
        "grpo step 2: 2 of 4 responses went unscored (no reward source scored them); a judge's `default` scores the "
        "responses it does not apply to"]
    watch.finish()  # some were scored
    nothing = UnscoredWatch("rloo", share=1.0)
    nothing.observe(4, 4, "step 1")
    with pytest.raises(DataError, match=r"rloo: no response was scored in the whole run \(4 responses\)"):
        nothing.finish()
    UnscoredWatch("rloo", 1.0, scored_before=True).finish()  # a resumed run that scored earlier


def test_a_grpo_run_whose_judge_scores_nothing_fails(judges_module, sft_parent, tiny_data, tmp_path):
    from align.stages.registry import run_stage

    out = tmp_path / "none"
    cfg = load_config(GRPOConfig, None, tiny_overrides(
        None, tiny_data["prefs"], out, parent_run=str(sft_parent), tracking="none",
        rewards=[{"judge": f"{judges_module}:none_judge"}],
        **{"train.max_steps": 2, "train.batch_size": 4, "grpo.prompts_per_step": 2, "grpo.group_size": 2,
           "grpo.max_new_tokens": 4, "grpo.eval_prompts": 0, "samples.num_prompts": 0}))
    with pytest.raises(DataError, match=r"grpo: no response was scored in the whole run \(8 responses\)"):
        run_stage(cfg)
    assert manifest(out)["status"] == "failed" and not (out / "adapter").exists()


def test_a_learning_rate_above_1_warns_when_the_config_is_checked(tiny_model_dir, tiny_data, tmp_path, caplog):
    from align.stages.registry import load_stage_config

    with caplog.at_level(logging.WARNING, logger="align"):
        load_stage_config("sft", None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "x", **{"train.learning_rate": 2.5}))
        load_stage_config("sft", None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "x", **{"train.learning_rate": 0.5}))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["sft: train.learning_rate: 2.5 is above 1"]


def test_evaluation_and_sample_judges_refuse_nan_scores_too():
    from align.evaluation.judges import check_finite_scores

    prompts = [[{"role": "user", "content": "Say one."}], "Say two."]
    check_finite_scores("judges[0]: judge 'x'", [1.0, None], prompts)
    with pytest.raises(DataError, match=r"^judges\[0\]: judge 'x' returned -inf for the prompt 'Say two.'; a judge returns a finite"):
        check_finite_scores("judges[0]: judge 'x'", [1.0, -math.inf], prompts)


@pytest.mark.parametrize("error", [NonFiniteWeightsError("non-finite weights after step 1"), ConfigError("train.x: bad")])
def test_the_error_line_starts_a_line_when_a_progress_bar_was_left_open(error, capsys):
    """A stage that stops inside the trainer's loop leaves its progress bar open without a newline: the
    one `error:` line must still start a line (scripts and the bad-input table read it so)."""
    import tqdm.auto

    from align.cli.recipes import guarded

    bar = tqdm.auto.tqdm(total=2, file=sys.stderr)
    bar.update(1)

    def work():
        raise error

    guarded(work, command="sft")
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {error}"]
