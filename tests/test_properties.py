"""Property-based tests: malformed configs and data rows never produce a traceback.

Whatever the input, loading either succeeds with a well-formed result or raises the
project's one-line error (ConfigError / DataError) — never KeyError, TypeError, ...
"""

from __future__ import annotations

import dataclasses
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.core.config_loader import load_config, parse_overrides
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig
from align.core.normalize import ROLES, normalize_preference, normalize_sft
from align.core.errors import ConfigError, DataError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dotted_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
keys = st.one_of(
    st.sampled_from(sorted(set(dotted_keys(SFTConfig)) | set(dotted_keys(DPOConfig)))),
    st.text(alphabet="abcdefghij._", min_size=1, max_size=12),
)


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6), st.sampled_from([SFTConfig, DPOConfig]))
def test_any_overrides_give_a_config_or_a_config_error(overrides, cls):
    base = {"output_dir": "out", "data.path": "d.jsonl"}
    base.update({"model.name_or_path": "m"} if cls is SFTConfig else {"parent_run": "p"})
    try:
        cfg = load_config(cls, None, {**base, **overrides})
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(cfg, cls) and cfg.train.batch_size >= 1

    def floats(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from floats(value)
            elif isinstance(value, float):
                yield f.name, value

    assert all(v == v and abs(v) != float("inf") for _, v in floats(cfg)), "non-finite number accepted"


@SETTINGS
@given(st.text(max_size=200))
def test_any_yaml_text_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(SFTConfig, path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) or str(exc).startswith("command line")


@SETTINGS
@given(st.lists(st.text(max_size=20), max_size=4))
def test_any_command_line_overrides_parse_or_fail_cleanly(items):
    try:
        parsed = parse_overrides(items)
    except ConfigError:
        return
    assert all("=" in item for item in items) and len(parsed) <= len(items)


messages = st.lists(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES + ("tool",)), scalars), "content": st.one_of(st.text(max_size=10), scalars)}),
    max_size=4,
)
row_values = st.one_of(values, messages, st.text(max_size=10))
rows = st.one_of(
    values,
    st.dictionaries(st.sampled_from(["messages", "prompt", "completion", "chosen", "rejected", "instruction", "input", "output", "x"]), row_values, max_size=5),
)


def assert_messages(msgs):
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)


@SETTINGS
@given(rows)
def test_any_sft_row_normalizes_or_names_the_problem(row):
    try:
        out = normalize_sft(row, "f.jsonl:9")
    except DataError as exc:
        assert str(exc).startswith("f.jsonl:9: ") and "\n" not in str(exc)
        return
    assert_messages(out["messages"])
    assert any(m["role"] == "assistant" for m in out["messages"])


@SETTINGS
@given(rows)
def test_any_preference_row_normalizes_or_names_the_problem(row):
    try:
        out = normalize_preference(row, "f.jsonl:9")
    except DataError as exc:
        assert str(exc).startswith("f.jsonl:9: ") and "\n" not in str(exc)
        return
    for key in ("prompt", "chosen", "rejected"):
        assert_messages(out[key])
    assert out["prompt"][-1]["role"] == "user"
    assert out["chosen"][0]["role"] == out["rejected"][0]["role"] == "assistant"


reward_entries = st.lists(
    st.one_of(values, st.dictionaries(st.sampled_from(["judge", "reward_run", "weight", "args", "normalize", "default", "name", "x"]),
                                      values, max_size=4)),
    max_size=3,
)


@SETTINGS
@given(st.one_of(reward_entries, values), st.dictionaries(keys, values, max_size=3), st.sampled_from(["grpo", "rloo", "online_dpo"]))
def test_any_reward_sources_give_a_config_or_a_config_error(rewards, overrides, stage):
    """Online stages: the rewards list (a list of sections) never ends in a traceback either."""
    import math

    from align.stages.registry import get_stage

    cls = get_stage(stage).config
    try:
        cfg = load_config(cls, None, {"output_dir": "out", "data.path": "d.jsonl", "parent_run": "p", **overrides, "rewards": rewards})
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert cfg.rewards
    for src in cfg.rewards:
        assert bool(src.judge) != bool(src.reward_run) and math.isfinite(src.weight) and src.weight != 0


@SETTINGS
@given(st.dictionaries(st.sampled_from(["prompt", "messages", "answer", "x"]), row_values, max_size=3))
def test_any_prompt_row_normalizes_or_names_the_problem(row):
    from align.core.normalize import normalize_prompt

    try:
        out = normalize_prompt(row, "f.jsonl:9")
    except DataError as exc:
        assert str(exc).startswith("f.jsonl:9: ") and "\n" not in str(exc)
        return
    assert_messages(out["prompt"])
    assert out["prompt"][-1]["role"] == "user"
    assert "answer" not in out or (isinstance(out["answer"], list) and all(isinstance(a, str) for a in out["answer"]))
