"""RunDir writes: atomic files and directories, status lifecycle, no secrets."""

from __future__ import annotations

import json

import pytest

from align.core.artifacts import RunDir

from align.core.files import atomic_dir, atomic_write_text

from align.core.redaction import redact
from align.core.errors import ConfigError


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "w.bin").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert oct(target.stat().st_mode & 0o777) != "0o700", "temp dirs are private; the result is not"


def start(path, **kw):
    return RunDir.start(path, stage="sft", config={}, config_yaml="a: 1\n", run_key="k1", parent=None,
                        base_model={}, dataset={}, **kw)


def test_rundir_lifecycle(tmp_path):
    run = start(tmp_path / "r")
    assert run.status == "running" and not run.is_finished()
    (run.path / "stale.txt").write_text("from the previous run")
    run.fail("ValueError: bad")
    assert run.status == "failed" and run.manifest()["error"] == "ValueError: bad"
    run = start(tmp_path / "r")
    assert not (run.path / "stale.txt").exists(), "a new run starts clean"
    run.finish(summary={"x": 1}, outputs={})
    assert run.is_finished() and run.matches("k1", None) and not run.matches("k2", None)


def test_rundir_refuses_to_wipe_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ConfigError, match="is not an align run dir"):
        start(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_secrets_are_redacted(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "abcd1234secretkey")
    monkeypatch.setenv("HF_TOKEN", "hf_topsecretvalue")
    assert redact({"a": ["x abcd1234secretkey y"], "hf_topsecretvalue": 1}) == {"a": ["x <redacted> y"], "<redacted>": 1}
    run = RunDir.start(tmp_path / "r", stage="sft", config={}, config_yaml="token: hf_topsecretvalue\n",
                       run_key="k", parent=None, base_model={"name": "abcd1234secretkey"}, dataset={})
    for path in run.path.iterdir():
        text = path.read_text()
        assert "abcd1234secretkey" not in text and "hf_topsecretvalue" not in text
    assert json.loads(run.manifest_path.read_text())["base_model"]["name"] == "<redacted>"


def test_peak_memory_restarts_per_stage():
    """A pipeline runs its stages in one process: each stage's peak must be its own."""
    import numpy as np

    from align.core.memory import peak_memory_mb, reset_peak_memory

    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    with_block = peak_memory_mb()
    del block
    reset_peak_memory()
    assert peak_memory_mb() < with_block - 200
