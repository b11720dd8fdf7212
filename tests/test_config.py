"""Typed configs: strict loading, suggestions, overrides, and every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from align.core.config import PipelineConfig

from align.core.config_loader import describe, load_config, parse_overrides
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig
from align.core.errors import ConfigError

CONFIG_FILES = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIG_FILES}
    assert {"sft.yaml", "dpo.yaml", "pipeline.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads_and_names_its_command(path):
    from align.cli.pipeline import load_pipeline

    first = path.read_text().splitlines()[0]
    assert first.startswith("# python recipes/"), "a YAML config starts with the command that runs it"
    assert str(path.relative_to(REPO)) in first
    if path.name.startswith("pipeline"):
        pipeline = load_pipeline(path)
        assert pipeline.stage_configs, "a pipeline with no stages"
        for name, (stage, cfg) in pipeline.stage_configs.items():
            assert cfg.stage == stage
            assert cfg.output_dir.endswith(name)
            assert cfg.wandb.group == pipeline.cfg.name
        for st in pipeline.cfg.stages:  # links point at the RunDirs of earlier stages
            _, cfg = pipeline.stage_configs[st.name]
            for key, target in st.links.items():
                value = getattr(cfg, key)
                names = target if isinstance(target, dict) else {None: target}
                for alias, name in names.items():
                    got = value[alias] if alias else value
                    assert got == pipeline.stage_configs[name][1].output_dir
    elif path.stem.startswith("sweep"):
        from align.cli.sweep import load_sweep

        sweep = load_sweep(str(path), [], None, None, {})  # every grid point's config (and the eval's) is valid
        assert sweep.points and all(p.cfg.stage == sweep.stage and p.cfg.wandb.group == sweep.group for p in sweep.points)
    elif path.stem == "compare_methods":
        from align.cli.compare import stage_configs
        from align.cli.compare import CompareConfig

        cfg = load_config(CompareConfig, path)
        configs = stage_configs(cfg, path)  # every method's SFT and DPO config is valid
        assert list(configs) == cfg.methods
        assert all(c.peft.method == m for m, stages in configs.items() for c in stages.values())
    else:
        import re

        from align.stages.registry import load_stage_config

        # The recipe script the first line runs names the stage (qlora-dpo.yaml runs recipes/dpo.py).
        stage = re.match(r"# python recipes/(\w+)\.py ", first).group(1)
        cfg = load_stage_config(stage, path)
        assert cfg.output_dir and cfg.data.path


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "output_dir: x\nmodel:\n  name_or_path: m\ndata:\n  path: d.jsonl\ntrain:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    msg = str(err.value)
    assert f"{path}:7" in msg and "train.learning_rat" in msg and "did you mean 'train.learning_rate'" in msg
    assert "\n" not in msg


def test_an_unknown_key_with_control_characters_is_shown_on_one_line(tmp_path):
    """Hypothesis found it: a reward section keyed by a newline printed a two-line error."""
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, {"output_dir": "o", "data.path": "d", "model.name_or_path": "m", "dpo\tx": 1})
    assert "unknown key 'dpo\\tx'" in str(err.value) and "\t" not in str(err.value)
    path = write(tmp_path, 'output_dir: x\nmodel: {name_or_path: m}\ndata: {path: d}\n"a\\nb": 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert "unknown key 'a\\nb'" in str(err.value) and "\n" not in str(err.value)


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    path = write(tmp_path, "output_dir: x\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.learning_rate'"):
        load_config(SFTConfig, path)


def test_wrong_type_names_key_and_line(tmp_path):
    path = write(tmp_path, "output_dir: x\nmodel: {name_or_path: m}\ndata: {path: d}\ntrain:\n  batch_size: eight\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert f"{path}:5" in str(err.value) and "train.batch_size" in str(err.value) and "an integer" in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"train.gradient_checkpointing": "yes"}, "train.gradient_checkpointing: expected true/false"),
        ({"lora.r": 1.5}, "lora.r: expected an integer"),
        ({"dpo.loss_type": "sigmod"}, "did you mean 'sigmoid'"),
        ({"model.quantization": "4-bit"}, "did you mean '4bit'"),
        ({"lora.target_modules": 3}, "lora.target_modules"),
    ],
)
def test_bad_overrides_are_reported_as_command_line(override, needle):
    base = {"output_dir": "x", "data.path": "d", "parent_run": "p"}
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, {**base, **override})
    assert needle in str(err.value)
    assert str(err.value).startswith("command line")


def test_overrides_parse_yaml_values_and_nest():
    parsed = parse_overrides(["train.max_steps=5", "lora.target_modules=[q_proj, v_proj]", "data.eval_split=null", "x=1e-4"])
    assert parsed == {"train.max_steps": 5, "lora.target_modules": ["q_proj", "v_proj"], "data.eval_split": None, "x": "1e-4"}
    parsed.pop("x")
    cfg = load_config(SFTConfig, None, {"output_dir": "o", "data.path": "d", "model.name_or_path": "m", **parsed, "train.learning_rate": "1e-4"})
    assert cfg.train.max_steps == 5 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.eval_split is None
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # YAML reads `1e-4` as a string; a number is meant


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.max_steps"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"parent_run": "p", "model.name_or_path": "m"}, "set exactly one"),
        ({}, "set exactly one"),
        ({"parent_run": "p", "dpo.beta": 0}, "dpo.beta: must be positive"),
        ({"parent_run": "p", "dpo.label_smoothing": 0.5}, "dpo.label_smoothing"),
        ({"parent_run": "p", "train.batch_size": 0}, "train.batch_size: must be at least 1"),
    ],
)
def test_inconsistent_values_are_rejected(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(DPOConfig, None, {"output_dir": "o", "data.path": "d", **overrides})


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "output_dir: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(SFTConfig, path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, "nope/missing.yaml")


def test_pipeline_stage_overrides_are_routed(tmp_path):
    from align.cli.pipeline import load_pipeline

    pipeline = load_pipeline(
        REPO / "recipes/configs/smollm2-135m/pipeline.yaml",
        {"sft.train.max_steps": 2, "dpo.dpo.beta": 0.3, "output_dir": str(tmp_path / "p"), "tracking": "none"},
    )
    (_, sft_cfg), (_, dpo_cfg) = pipeline.stage_configs["sft"], pipeline.stage_configs["dpo"]
    assert sft_cfg.train.max_steps == 2 and dpo_cfg.dpo.beta == 0.3
    assert dpo_cfg.parent_run == str(tmp_path / "p" / "sft")
    assert sft_cfg.tracking == dpo_cfg.tracking == "none"
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_pipeline(REPO / "recipes/configs/smollm2-135m/pipeline.yaml", {"bogus": 1})


def test_pipeline_parent_must_be_an_earlier_stage(tmp_path):
    path = write(tmp_path, "name: p\noutput_dir: o\nstages:\n  - {name: dpo, stage: dpo, config: d.yaml, parent: sft}\n")
    with pytest.raises(ConfigError, match="'sft' is not an earlier stage"):
        load_config(PipelineConfig, path)


def test_every_key_is_typed_and_documented():
    import dataclasses
    import typing

    def check(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            if dataclasses.is_dataclass(hints[f.name]):
                check(hints[f.name])

    from align.cli.sweep import SweepConfig
    from align.core.config import PipelineStage
    from align.stages.registry import all_stages

    stages = [s.config for s in all_stages().values()]
    assert {"dpo", "simpo", "cpo", "orpo", "kto"} <= {c.stage for c in stages}
    for cls in (*stages, PipelineConfig, PipelineStage, SweepConfig):
        check(cls)
    assert any("train.learning_rate" in line for line in describe(SFTConfig))
