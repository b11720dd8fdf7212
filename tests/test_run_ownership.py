"""A run dir is owned by one run: no stage empties a run it reads, replaces a finished run without --force,
or writes anything before every check it can make has passed.

The walk over every registered stage gives each one inputs that fail its late checks (rows that do not fit
max_length, prompts too long for the online stages, reward sources that cannot be used, adapters of mixed
types) with --force onto a finished run, and asserts that run is byte-identical afterwards. A new stage
must add its cases to LATE_CHECKS (the walk fails for a stage without any).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_jsonl

from align.core.config_loader import load_config
from align.core.errors import AlignError, ConfigError
from align.stages.registry import all_stages, get_stage, run_stage


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    return target


@pytest.fixture(scope="module")
def reward_parent(tmp_path_factory, sft_parent, tiny_data) -> Path:
    """A finished reward run on the session's SFT run."""
    from align.stages.reward import RewardConfig

    out = tmp_path_factory.mktemp("reward") / "reward"
    run_stage(load_config(RewardConfig, None, tiny_overrides(
        None, tiny_data["prefs"], out, parent_run=str(sft_parent), tracking="none",
        **{"train.max_steps": 2, "reward.stats_samples": 8, "samples.num_prompts": 0})))
    return out


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory) -> Path:
    """Prompt rows, the third one far longer than any test's max_length."""
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus one?"}]} for i in range(8)]
    rows[2] = {"prompt": [{"role": "user", "content": " ".join(f"word{i}" for i in range(400))}]}
    return write_jsonl(tmp_path_factory.mktemp("long") / "long.jsonl", rows)


def child(sft_parent, tiny_data, out: Path, data: str = "prefs", **extra) -> dict:
    return tiny_overrides(None, tiny_data[data] if data in tiny_data else data, out, parent_run=str(sft_parent), tracking="none",
                          **{"samples.num_prompts": 0, **extra})


def run_named(stage: str, overrides: dict, force: bool = True):
    """Run the stage called `stage` on these overrides (the registry's run_stage on its config)."""
    return run_stage(load_config(get_stage(stage).config, None, overrides), force=force)


# --------------------------------------------------------------------------- output_dir and the runs a stage reads


@pytest.mark.parametrize("where", ["equal", "inside", "symlink"])
def test_dpo_output_dir_at_its_parent_is_refused_and_the_parent_is_untouched(where, sft_parent, tiny_data, tmp_path):
    parent = copy_run(sft_parent, tmp_path / "sft")
    out = {"equal": parent, "inside": parent / "dpo", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(parent, target_is_directory=True)
    before = snapshot(parent)
    relation = {"equal": "is", "inside": "is inside", "symlink": "is"}[where]
    with pytest.raises(ConfigError, match=rf"output_dir: .*{relation} the parent_run \({parent}\) this stage reads"):
        run_named("dpo", child(parent, tiny_data, out))
    assert snapshot(parent) == before


def test_an_output_dir_holding_the_parent_and_reward_runs_of_ppo_are_refused(sft_parent, reward_parent, tiny_data, tmp_path):
    outer = copy_run(sft_parent, tmp_path / "outer")
    nested = copy_run(sft_parent, outer / "nested")
    before = snapshot(outer)
    with pytest.raises(ConfigError, match=r"output_dir: .* contains the parent_run"):
        run_named("dpo", child(nested, tiny_data, outer))
    assert snapshot(outer) == before
    rm = copy_run(reward_parent, tmp_path / "reward")
    before = snapshot(rm)
    ppo = child(sft_parent, tiny_data, rm, reward_run=str(rm), **{"ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2})
    with pytest.raises(ConfigError, match=r"output_dir: .* is the reward_run"):
        run_named("ppo", ppo)
    assert snapshot(rm) == before


def test_a_symbolic_link_as_output_dir_is_refused(tiny_model_dir, tiny_data, sft_parent, tmp_path):
    elsewhere = copy_run(sft_parent, tmp_path / "elsewhere")
    (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    with pytest.raises(ConfigError, match=r"output_dir: .*link is a symbolic link to .*elsewhere"):
        run_named("sft", tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "link", tracking="none"))
    assert snapshot(elsewhere) == before


# --------------------------------------------------------------------------- replacing a finished run


def test_a_finished_run_is_replaced_only_with_force(tiny_model_dir, tiny_data, sft_parent, tmp_path):
    run = copy_run(sft_parent, tmp_path / "run")
    before = snapshot(run)
    config = json.loads((run / "manifest.json").read_text())
    assert config["status"] == "finished"
    changed = tiny_overrides(tiny_model_dir, tiny_data["sft"], run, tracking="none", **{"train.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"output_dir: .* holds a finished sft run of another config.*--force replaces it"):
        run_named("sft", changed, force=False)
    with pytest.raises(ConfigError, match=r"resume: .* holds a finished sft run .*nothing to resume; --force replaces it"):
        run_named("sft", {**changed, "resume": True}, force=False)
    assert snapshot(run) == before
    run_named("sft", {**changed, "train.max_steps": 1, "samples.num_prompts": 0}, force=True)
    after = json.loads((run / "manifest.json").read_text())
    assert after["status"] == "finished" and after["run_id"] != config["run_id"]


# --------------------------------------------------------------------------- every check before the first write


def _online(stage: str, section: str, **extra) -> dict:
    return {f"{section}.max_new_tokens": 4, "train.max_steps": 1, "train.batch_size": 2, f"{stage}.prompts_per_step": 2,
            f"{stage}.group_size": 2, **extra} if section == stage else {
            "online.max_new_tokens": 4, "online.rounds": 1, "online.num_samples": 2, **extra}


def _no_stats_reward(reward_parent: Path, tmp_path: Path) -> str:
    run = copy_run(reward_parent, tmp_path / "no-stats")
    (run / "reward_stats.json").unlink()
    return str(run)


def _mixed_adapter_run(sft_parent: Path, tmp_path: Path) -> str:
    """A finished run whose adapter is IA3 (its config is all that is read before the run starts)."""
    run = copy_run(sft_parent, tmp_path / "ia3")
    shutil.rmtree(run / "merged")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base_model"]["location"] = str((sft_parent / "merged").resolve())
    (run / "manifest.json").write_text(json.dumps(manifest))
    return str(run)


def _sources(stage: str, section: str):
    """The late checks of an online stage: a long prompt, a judge's arguments, a reward run without its stats."""
    return [
        ("a prompt longer than max_length", lambda f: {"data.path": str(f["long"]), **_online(stage, section)},
         r"long.jsonl:3: the prompt is \d+ tokens; .*train.max_length=64"),
        ("a judge argument it does not take", lambda f: {"rewards": [{"judge": "length", "args": {"max_wordz": 3}}], **_online(stage, section)},
         r"rewards\[0\].judge: judge 'length' does not take these arguments"),
        ("a reward run without its stats", lambda f: {"rewards": [{"reward_run": f["no_stats"]}], **_online(stage, section)},
         r"rewards\[0\].reward_run: cannot read .*reward_stats.json"),
    ]


_TOO_SHORT = ("no row fits max_length", lambda f: {"train.max_length": 8}, r"no training row is left within max_length=8")
LATE_CHECKS = {
    "sft": [_TOO_SHORT],
    "dpo": [_TOO_SHORT],
    "reward": [_TOO_SHORT],
    "kto": [_TOO_SHORT],
    "simpo": [_TOO_SHORT],
    "cpo": [_TOO_SHORT],
    "orpo": [_TOO_SHORT],
    "ppo": [
        ("a prompt longer than max_length", lambda f: {"data.path": str(f["long"]), "ppo.max_new_tokens": 4},
         r"long.jsonl:3: the prompt is \d+ tokens; with ppo.max_new_tokens=4"),
        ("a reward run without its stats", lambda f: {"reward_run": f["no_stats"]}, r"reward_run: cannot read .*reward_stats.json"),
    ],
    "grpo": _sources("grpo", "grpo"),
    "rloo": _sources("rloo", "rloo"),
    "online_dpo": _sources("online_dpo", "online"),
    "eval": [("policies of mixed adapter types", lambda f: {"runs": {"sft": f["sft"], "lora": f["reward"], "ia3": f["ia3"]}},
              r"runs: .*one shared base holds adapters of a single PEFT type")],
}


def test_every_registered_stage_has_late_check_cases():
    assert set(LATE_CHECKS) == set(all_stages()), "add the new stage's late checks to LATE_CHECKS"


def _stage_overrides(stage: str, files: dict, sft_parent: Path, tiny_model_dir: Path, tiny_data, out: Path) -> dict:
    if stage == "sft":
        return tiny_overrides(tiny_model_dir, tiny_data["sft"], out, tracking="none", **{"samples.num_prompts": 0})
    if stage == "eval":
        return {"output_dir": str(out), "runs": {"sft": str(sft_parent)}, "data.path": str(tiny_data["prefs"]),
                "data.eval_split": None, "data.eval_fraction": 0.25, "perplexity_data": None, "tracking": "none",
                "report_dir": str(out.parent / "report")}
    extra = {"rewards": [{"judge": "format"}]} if stage in ("grpo", "rloo", "online_dpo") else {}
    if stage == "ppo":
        extra = {"reward_run": files["reward"], "ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2}
    return {**child(sft_parent, tiny_data, out), **extra}


@pytest.mark.parametrize("stage", sorted(LATE_CHECKS))
def test_each_late_check_runs_before_the_target_is_touched(stage, sft_parent, reward_parent, long_prompts, tiny_model_dir,
                                                            tiny_data, tmp_path):
    files = {"long": long_prompts, "no_stats": _no_stats_reward(reward_parent, tmp_path), "reward": str(reward_parent),
             "sft": str(sft_parent), "ia3": _mixed_adapter_run(sft_parent, tmp_path)}
    target = copy_run(sft_parent, tmp_path / "target")  # a finished run that --force would replace
    before = snapshot(target)
    for label, inputs, message in LATE_CHECKS[stage]:
        overrides = {**_stage_overrides(stage, files, sft_parent, tiny_model_dir, tiny_data, target), **inputs(files)}
        with pytest.raises(AlignError, match=message):
            run_named(stage, overrides, force=True)
        assert snapshot(target) == before, f"{stage}: {label}: the target changed"
    assert not (tmp_path / "report").exists()
