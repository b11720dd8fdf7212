"""Every bad value is refused before anything is written, driven by the config schema.

Each numeric and list field of every registered stage's config (and of the pipeline and the
methods comparison) declares its valid range in `opt(...)`. The walk below tries each field's
invalid values through the recipe's command line, as an override and inside the YAML file:
exit status 2, one line naming the key and where it was set, nothing written. A new numeric or
list field without a declared range fails `test_every_numeric_and_list_field_declares_a_range`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from align.cli.sweep import SweepConfig
from align.core.config import Check, PipelineConfig, field_check
from align.core.config_loader import describe, load_config
from align.core.errors import ConfigError
from align.cli.compare import CompareConfig
from align.stages.registry import all_stages

SHIPPED = REPO / "recipes" / "configs" / "smollm2-135m"


def _args(tp) -> tuple:
    return tuple(a for a in typing.get_args(tp) if a is not type(None))


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def kinds(tp) -> set[str]:
    """What a field's type admits: int, float, list, dict, str, ... (Optional and unions flattened)."""
    if _is_union(tp):
        return set().union(*(kinds(a) for a in _args(tp)))
    origin = typing.get_origin(tp)
    if origin is list:
        return {"list"}
    if origin is dict:
        return {"dict"}
    if origin is typing.Literal:
        return {"choice"}
    return {getattr(tp, "__name__", str(tp))}


def leaf_fields(cls: type, prefix: str = ""):
    """(dotted key, field, type) of every non-section field, sections walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp
            inner = _args(tp)[0] if typing.get_origin(tp) is list else None
            if inner is not None and dataclasses.is_dataclass(inner):  # PipelineConfig.stages[]
                yield from leaf_fields(inner, f"{prefix}{f.name}[].")


def schema_classes() -> dict[str, type]:
    out = {name: stage.config for name, stage in all_stages().items()}
    out["pipeline"] = PipelineConfig
    out["compare"] = CompareConfig
    out["sweep"] = SweepConfig
    return out


def invalid_values(check: Check, tp) -> list:
    """Values just outside the declared range (and the empty list/mapping/text where one is required)."""
    k = kinds(tp)
    integer = "int" in k and "float" not in k
    step = 1 if integer else 1e-3
    values: list = []
    if check.min is not None:
        values += [check.min - step, check.min - 1000]
    if check.gt is not None:
        values += [check.gt, check.gt - step]
    if check.max is not None:
        values += [check.max + step, check.max * 10 + 1000]
    if check.lt is not None:
        values += [check.lt, check.lt + step]
    if check.pattern:
        values += ["not-one-of-the-forms"]
    if check.nonempty:
        values += [[]] if "list" in k else []
        values += [{}] if "dict" in k else []
        values += [""] if "str" in k else []
    if integer:
        values = [int(v) if isinstance(v, float) and v == int(v) else v for v in values]
    return [v for v in values if not isinstance(v, float) or v == v]


CASES = [
    pytest.param(name, key, value, id=f"{name}:{key}={json.dumps(value)}")
    for name, cls in schema_classes().items()
    for key, f, tp in leaf_fields(cls)
    if (check := field_check(f)) is not None and not check.any_value and "[]" not in key
    for value in invalid_values(check, tp)
]


def test_every_numeric_and_list_field_declares_a_range():
    """A numeric or list field says what is valid: min/max/gt/lt/nonempty, or any_value="why"."""
    missing = []
    for name, cls in schema_classes().items():
        for key, f, tp in leaf_fields(cls):
            if kinds(tp) & {"int", "float", "list"} and field_check(f) is None:
                missing.append(f"{name}: {key}")
    assert not missing, (
        "numeric/list config fields without a declared range; add min=/max=/gt=/lt=/nonempty=True (or "
        f"any_value='why every value is valid') to their opt(...): {missing}"
    )


def test_there_are_many_cases_and_every_stage_has_a_shipped_config():
    stages = set(all_stages())
    assert {"sft", "dpo", "reward", "ppo", "eval"} <= stages
    for name in stages:
        assert (SHIPPED / f"{name}.yaml").is_file(), f"stage {name}: the schema walk needs recipes/configs/smollm2-135m/{name}.yaml"
    assert len(CASES) > 150


def _base_config(name: str) -> Path:
    special = {"pipeline": "pipeline.yaml", "compare": "compare_methods.yaml", "sweep": "sweep-dpo.yaml"}
    return SHIPPED / special.get(name, f"{name}.yaml")


def _main(name: str, argv: list[str]) -> int:
    if name == "pipeline":
        from align.cli.recipes import pipeline_main

        return pipeline_main(argv)
    if name == "compare":
        from align.cli.compare import main

        return main(argv)
    if name == "sweep":
        from align.cli.sweep import main

        return main(argv)
    from align.cli.recipes import recipe_main

    return recipe_main(name, argv)


def _set(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _cli_value(value) -> str:
    return "''" if value == "" else json.dumps(value)


@pytest.mark.parametrize("name, key, value", CASES)
def test_an_invalid_value_exits_2_naming_the_key_and_writes_nothing(name, key, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    output_override = [] if name == "pipeline" else [f"output_dir={out}"]
    if name == "pipeline":
        output_override = [f"output_dir={out}"]

    # 1. on the command line
    capsys.readouterr()
    code = _main(name, ["--config", str(_base_config(name)), *output_override, f"{key}={_cli_value(value)}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"command line: {key}: must" in lines[0], lines[0]

    # 2. inside the YAML file: the error names the file and the key's line
    data = yaml.safe_load(_base_config(name).read_text())
    _set(data, key, value)
    data["output_dir"] = str(out)
    if name == "compare":  # its stage YAMLs are found relative to the file
        data.update(sft_config=str(SHIPPED / "sft.yaml"), dpo_config=str(SHIPPED / "dpo.yaml"))
    if name == "pipeline":
        for st in data.get("stages") or []:
            st["config"] = str(SHIPPED / st["config"])
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    line_of_key = _line_of(config, key)
    code = _main(name, ["--config", str(config)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"{config}:{line_of_key}: {key}: must" in lines[0], lines[0]

    assert not out.exists(), "a refused config wrote its output_dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], "a refused config wrote files"


def _line_of(path: Path, key: str) -> int:
    from align.core.config_loader import _yaml_with_lines

    _, lines = _yaml_with_lines(path.read_text(), str(path))
    return lines[key]


def test_keys_shows_each_range(capsys):
    from align.cli.recipes import recipe_main

    assert recipe_main("dpo", ["--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.warmup_ratio (a number, default 0.1; in [0, 1))" in out
    assert "lora.target_modules (a list of a string or a string, default 'all-linear'; non-empty)" in out
    assert "dpo.beta (a number, default 0.1; positive)" in out
    assert "lora.init (a string, default 'default'; one of default, gaussian, eva, pissa, pissa_niter_<n> (n >= 1), olora, loftq)" in out
    assert "lora.rslora (true/false, default False)" in out and "lora.plus_ratio (a number or null, default None; at least 1)" in out
    assert "train.max_steps (an integer or null, default None; at least 1)" in out
    assert any("train.seed" in line and "in [0, 4294967295]" in line for line in describe(all_stages()["sft"].config))


# --------------------------------------------------------------------------- the semantics behind some ranges


@pytest.mark.parametrize("ratio, total, expected", [(0.5, 10, 5), (0.1, 200, 20), (0.99, 100, 99), (0.0, 50, 0)])
def test_warmup_ratio_reaches_the_trainer_as_a_share_of_the_steps(ratio, total, expected, tmp_path):
    """TrainingArguments reads a warmup below 1 as a ratio and from 1 up as a step count: the range
    [0, 1) keeps warmup_ratio a ratio (0.99 of 100 steps is 99 steps, not 0)."""
    from trl import SFTConfig as TRLSFTConfig

    from align.core.artifacts import RunDir
    from align.modeling.train_setup import trainer_kwargs
    from align.stages.sft import SFTConfig

    cfg = load_config(SFTConfig, None, {"output_dir": str(tmp_path), "model.name_or_path": "m", "data.path": "d",
                                        "train.warmup_ratio": ratio, "train.gradient_checkpointing": False})
    args = TRLSFTConfig(**trainer_kwargs(cfg, RunDir(tmp_path), "cpu", has_eval=False))
    assert args.get_warmup_steps(total) == expected
    with pytest.raises(ConfigError, match=r"train\.warmup_ratio: must be in \[0, 1\), got 1"):
        load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d", "train.warmup_ratio": 1})


def test_eval_batch_size_zero_is_refused_not_replaced():
    from align.stages.sft import SFTConfig

    with pytest.raises(ConfigError, match="command line: train.eval_batch_size: must be at least 1, got 0"):
        load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d", "train.eval_batch_size": 0})


def test_max_train_samples_zero_names_its_own_key():
    from align.stages.dpo import DPOConfig

    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d", "data.max_train_samples": 0})
    assert "data.max_train_samples: must be at least 1" in str(err.value) and "max_length" not in str(err.value)


def test_an_error_names_the_command_line_or_the_file_where_the_value_was_set(tmp_path):
    from align.stages.ppo import PPOConfig

    path = tmp_path / "ppo.yaml"
    path.write_text("output_dir: o\nparent_run: p\nreward_run: r\ndata:\n  path: d\ntrain:\n  max_steps: 3\n"
                    "ppo:\n  rollout_batch_size: 6\n  minibatch_size: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}:10: ppo.minibatch_size: must divide"):
        load_config(PPOConfig, path)  # a cross-field check names the key's line
    with pytest.raises(ConfigError, match=r"^command line: ppo.minibatch_size: must divide"):
        load_config(PPOConfig, path, {"ppo.minibatch_size": 5})
    with pytest.raises(ConfigError, match=r"^command line: train.max_steps: must be at least 1, got 0"):
        load_config(PPOConfig, path, {"train.max_steps": 0})  # not blamed on the YAML file


# --------------------------------------------------------------------------- YAML that cannot be a config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("output_dir: a\ntrain:\n  batch_size: 2\ntrain:\n  epochs: 3\n", r"cfg.yaml:4: duplicate key 'train' \(first at line 2\)"),
        ("output_dir: a\ntrain:\n  epochs: 1\n  epochs: 3\n", r"cfg.yaml:4: duplicate key 'train.epochs'"),
        ("output_dir: a\nwandb: &w\n  tags: [*w]\n", r"cfg.yaml:\d+: .*an alias refers to itself"),
        ("output_dir: &o [*o]\n", r"an alias refers to itself"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
         "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
         "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n", r"aliases expand to more than"),
    ],
    ids=["duplicate section", "duplicate key", "recursive alias", "self alias", "alias bomb"],
)
def test_yaml_that_cannot_be_a_config_is_one_line(tmp_path, text, expected):
    from align.stages.sft import SFTConfig

    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(SFTConfig, path)
    assert "\n" not in str(err.value)


def test_ranges_hold_for_configs_built_in_code():
    """prepare_config (what every stage's run calls first) checks the ranges of a config not loaded from a file."""
    from align.stages.registry import prepare_config
    from align.stages.sft import SFTConfig

    cfg = load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d"})
    cfg.lora.alpha = 0
    with pytest.raises(ConfigError, match="lora.alpha: must be at least 1, got 0"):
        prepare_config(cfg)


def test_float_ranges_refuse_non_finite_values():
    from align.stages.dpo import DPOConfig

    for bad in (".nan", ".inf"):
        with pytest.raises(ConfigError, match="dpo.beta: expected a finite number"):
            load_config(DPOConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d",
                                          "dpo.beta": yaml.safe_load(bad)})
    assert math.isfinite(load_config(DPOConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d"}).dpo.beta)
