"""A new method is one record: a throwaway offline method (one loss function, one stage module, one YAML) and a
throwaway group-RL advantage estimator (one estimator, one stage module, one YAML), each added to a copy of align
with no other file edited. Each trains, is listed by `align --help` and `--keys`, takes the sweep's KL knob, and its
runs get training curves in the evaluation report.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO

# An offline method: DPO's sigmoid on the log-ratio margin, written as one loss. Its objective needs the reference
# (the policy with its adapter disabled), so the shared objective trainer runs the reference pass for it.
TOYPO = '''
"""ToyPO: a throwaway offline method of the tests, -log sigmoid(beta * log-ratio margin) against the reference."""

from dataclasses import dataclass

from align.core.config import ChildStageConfig, opt
from align.modeling.methods import resolve_method
from align.preference.objectives import Objective, ObjectiveOptions
from align.stages.registry import Curve, Stage, fmt, register, training_checks


def toypo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    import torch.nn.functional as F

    from align.preference.losses import PreferenceLoss

    chosen_r, rejected_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    per_pair = -F.logsigmoid(chosen_r - rejected_r)
    return PreferenceLoss(per_pair.mean(), per_pair, chosen_r.detach(), rejected_r.detach(), {})


@dataclass(frozen=True)
class ToyObjective(Objective):
    beta: float
    needs_reference = True

    def __call__(self, logps):
        return toypo_loss(logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected, self.beta)


@dataclass
class ToyOptions(ObjectiveOptions):
    beta: float = opt(0.2, "Pull towards the reference.", gt=0)


@dataclass
class ToyPOConfig(ChildStageConfig):
    """ToyPO: a throwaway offline method against the reference."""

    toypo: ToyOptions = opt(ToyOptions, "ToyPO options.")

    stage = "toypo"


def run(cfg, *, force=False, callbacks=()):
    from align.stages.objective_run import run_objective_stage

    return run_objective_stage(cfg, force=force, callbacks=callbacks)


def summary_lines(s):
    return [f"  held-out toy loss {fmt(s.get('eval_loss_before'))} (step 0) -> {fmt(s.get('eval_loss_after'))}"]


register(Stage(
    "toypo", ToyPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method,
    objective=lambda cfg: ToyObjective(beta=cfg.toypo.beta), kl_knob="toypo.beta", curves=(Curve("train/loss", "toy loss"),),
))
'''

# A group-RL method: each response's reward minus the best of its group. Its options section is not named after it.
TOYRL = '''
"""ToyRL: a throwaway group-RL method of the tests: advantage = reward minus the best reward of the group."""

from dataclasses import dataclass

from align.core.config import opt
from align.modeling.methods import resolve_method
from align.rlhf.estimators import AdvantageEstimator
from align.rlhf.options import GroupOptions, GroupStageConfig
from align.stages.registry import Curve, Stage, group_summary_lines, online_checks, register


class MinusBest(AdvantageEstimator):
    name = "minus the group's best"
    calls = 0

    def __call__(self, rewards, group_size, scale):
        import torch

        MinusBest.calls += 1
        grouped = torch.nan_to_num(rewards, nan=float("-inf")).view(-1, group_size)
        advantages = grouped - grouped.max(1, keepdim=True).values
        return torch.where(torch.isfinite(advantages), advantages, torch.zeros_like(advantages)).view(-1)


@dataclass
class ToyRLConfig(GroupStageConfig):
    """ToyRL: a throwaway group-RL method."""

    stage = "toyrl"
    # Its GroupOptions section is not named after the stage: the group loop finds it by its type.
    group: GroupOptions = opt(GroupOptions, "ToyRL options.")


def run(cfg, *, force=False, callbacks=()):
    from align.stages.online_run import run_group_stage

    return run_group_stage(cfg, force=force, callbacks=callbacks)


register(Stage("toyrl", ToyRLConfig, run, group_summary_lines, checks=online_checks(), resolve=resolve_method,
               estimator=MinusBest(), kl_knob="group.kl_coef", curves=(Curve("toyrl/reward/total", "toy reward"),)))
'''

# Run in the copied tree: both stages through the registry, then the panels the report draws for their runs.
DRIVER = '''
import json, sys
from pathlib import Path

from align.core.artifacts import RunDir
from align.evaluation.report import training_curve_panels
from align.stages.registry import all_stages, load_stage_config, run_stage

out = {}
for name in ("toypo", "toyrl"):
    run = run_stage(load_stage_config(name, f"{name}.yaml"))
    out[name] = run.manifest()["summary"]
out["estimator_calls"] = sys.modules["align.stages.toyrl"].MinusBest.calls
run_stage(load_stage_config("eval", "eval.yaml"))
out["report"] = Path("runs/report.md").read_text()
curves = {name: record.curves for name, record in all_stages().items()}
runs = {name: RunDir(Path("runs") / name) for name in ("toypo", "toyrl")}
out["panels"] = [title for title, _ in training_curve_panels(runs, curves)]
print(json.dumps(out, default=str))
'''


@pytest.fixture()
def tree_with_new_methods(tmp_path) -> Path:
    """A copy of align with two new stage modules; nothing else is edited."""
    root = tmp_path / "src"
    shutil.copytree(REPO / "align", root / "align", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "align" / "stages" / "toypo.py").write_text(textwrap.dedent(TOYPO))
    (root / "align" / "stages" / "toyrl.py").write_text(textwrap.dedent(TOYRL))
    return root


def run_python(root: Path, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "HOME": str(Path.home()),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def write_configs(work: Path, model_dir: Path, data: Path) -> None:
    common = {"model": {"name_or_path": str(model_dir)}, "data": {"path": str(data), "eval_split": None, "eval_fraction": 0.25},
              "samples": {"num_prompts": 0}, "tracking": "none"}
    toypo = {**common, "output_dir": "runs/toypo", "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3,
                                                             "warmup_ratio": 0.0, "logging_steps": 1, "max_length": 64}}
    toyrl = {**common, "output_dir": "runs/toyrl", "rewards": [{"judge": "length", "args": {"max_words": 3}}],
             "group": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "eval_prompts": 2},
             "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0, "logging_steps": 1,
                       "max_length": 64}}
    evaluation = {"runs": {"toypo": "runs/toypo", "toyrl": "runs/toyrl"}, "baseline": "toypo", "output_dir": "runs/eval",
                  "data": {"path": str(data), "eval_split": None, "eval_fraction": 0.25}, "perplexity_data": None,
                  "num_prompts": 2, "num_pairs": 2, "bootstrap": 10, "batch_size": 4, "sampling": {"max_new_tokens": 4},
                  "tracking": "none"}
    for name, cfg in (("toypo", toypo), ("toyrl", toyrl), ("eval", evaluation)):
        (work / f"{name}.yaml").write_text(f"# python -m align {name} --config {name}.yaml\n" + yaml.safe_dump(cfg))


def test_a_new_offline_method_and_a_new_group_estimator_are_one_module_each(tree_with_new_methods, tmp_path, tiny_model_dir, tiny_data):
    root, work = tree_with_new_methods, tmp_path / "work"
    work.mkdir()
    write_configs(work, tiny_model_dir, tiny_data["prefs"])

    listed = run_python(root, "-m", "align", "--help", cwd=work).stdout.splitlines()
    assert any(line.split()[:2] == ["toypo", "ToyPO:"] for line in listed)
    assert any(line.split()[:2] == ["toyrl", "ToyRL:"] for line in listed)
    assert "toypo.beta (a number, default 0.2; positive): Pull towards the reference." in run_python(root, "-m", "align", "toypo", "--keys", cwd=work).stdout
    assert "group.kl_coef" in run_python(root, "-m", "align", "toyrl", "--keys", cwd=work).stdout

    # The sweep's KL knob is the record's: `beta` names toypo.beta, `kl` names group.kl_coef.
    swept = run_python(root, "-m", "align", "sweep", "--config", "toypo.yaml", "--values", "beta=0.1,0.3", "--print-config", cwd=work).stdout
    assert "# run beta=0.1" in swept and "# run beta=0.3" in swept and "beta: 0.3" in swept
    swept = run_python(root, "-m", "align", "sweep", "--config", "toyrl.yaml", "--values", "kl=0.01,0.02", "--print-config", cwd=work).stdout
    assert "# run kl_coef=0.01" in swept and "kl_coef: 0.02" in swept

    (work / "driver.py").write_text(textwrap.dedent(DRIVER))
    out = json.loads(run_python(root, "driver.py", cwd=work).stdout.strip().splitlines()[-1])
    toypo, toyrl = out["toypo"], out["toyrl"]
    # Trained against the reference, which the objective asked for: at step 0 the policy is the reference, the loss ln 2.
    assert toypo["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-4)
    assert toypo["eval_loss_after"] != toypo["eval_loss_before"] and toypo["steps"] == 3
    assert toypo["batch_layout"] == "shared prefix"
    # The group loop ran the record's estimator, every step.
    assert toyrl["steps"] == 3 and out["estimator_calls"] == 3
    assert math.isfinite(toyrl["eval_reward_after"])
    # The evaluation report draws each method's own curves.
    assert "## Training curves" in out["report"]
    assert {"toypo: toy loss", "toyrl: toy reward"} <= set(out["panels"])
