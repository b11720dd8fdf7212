"""Trust boundaries and data safety (issue 12), end to end through the real command lines.

- A run dir is data: one that asks for remote code (its config says trust_remote_code, its base
  folder has an auto_map to a Python file that leaves a marker when imported) makes `align
  generate`, `merge` and `export` run no code; only the user's own --trust-remote-code does.
- A folder align did not create is never touched (a web app's manifest.json does not make it a
  run dir); run dirs of earlier align versions are recognized by their manifest and adopted.
- One run at a time per run dir: a second run exits 2 naming the holder, the first finishes
  intact; a lock left by a dead process is cleared with a message.
- A library error mid-run is one line and the run is marked failed (one while the data is prepared
  writes nothing); no secret from the environment or the command line lands anywhere under the run
  dir, W&B's files included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl

from align.core.artifacts import LOCK, MARKER, MARKER_KEY, RunDir, folder_kind

from align.core.run_lock import RunLock, RunLocked
from align.core.errors import ConfigError

EVIL = '''\
import os
from pathlib import Path

# Importing this file is what "remote code runs" means: it leaves a marker.
Path(os.environ.get("ALIGN_TEST_MARKER") or {default!r}).write_text("remote code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def run_cli(args: list[str], tmp: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: `python -m align` must run this checkout, not whichever one the environment installed.
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    full_env = {**os.environ, "PYTHONPATH": pythonpath, "HF_MODULES_CACHE": str(tmp / "hf-modules"), "WANDB_MODE": "offline",
                **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=tmp, capture_output=True, text=True, timeout=timeout, env=full_env)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- a run dir that asks for remote code


@pytest.fixture(scope="module")
def remote_code_run(tmp_path_factory, tiny_model_dir):
    """A finished SFT-like run dir whose config says trust_remote_code: true, on a base whose config.json
    maps the Auto classes to evil.py; its adapter/ also carries a copy of evil.py."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("remote-code")
    default_marker = root / "REMOTE_CODE_RAN"
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "evil.py").write_text(EVIL.format(default=str(default_marker)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))

    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    staging = root / "adapter-staging"
    peft_model.save_pretrained(staging)
    adapter_config = json.loads((staging / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config))
    shutil.copy(base / "evil.py", staging / "evil.py")

    run_config = {"output_dir": str(root / "run"), "model": {"name_or_path": str(base), "trust_remote_code": True}}
    run = RunDir.start(
        root / "run", stage="sft", config=run_config, config_yaml=yaml.safe_dump(run_config), run_key="k", parent=None,
        base_model={"name": str(base), "location": str(base), "content_hash": "sha256:x"}, dataset={"path": "d", "rows": {}},
    )
    shutil.copytree(staging, run.adapter_dir)
    run.finish(summary={}, outputs={"adapter": "adapter"})
    return {"root": root, "run": run.path, "base": base, "default_marker": default_marker}


def no_remote_code_ran(fx, marker: Path) -> bool:
    return not marker.exists() and not fx["default_marker"].exists()


def test_generate_with_a_run_that_asks_for_remote_code_runs_none(remote_code_run, tmp_path):
    marker = tmp_path / "marker"
    proc = run_cli(["-m", "align", "generate", "--adapter", f"x={remote_code_run['run']}", "--prompt", "hi",
                    "--max-new-tokens", "2"], tmp_path, {"ALIGN_TEST_MARKER": str(marker)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert no_remote_code_ran(remote_code_run, marker), "a run dir's config turned remote code on"
    assert "trust_remote_code" in proc.stderr and "--trust-remote-code" in proc.stderr, "the user is told what was not honoured"


def test_the_fixture_really_runs_code_when_the_user_asks(remote_code_run, tmp_path):
    """The control: the same command with the user's own --trust-remote-code imports evil.py."""
    marker = tmp_path / "marker"
    run_cli(["-m", "align", "generate", "--adapter", f"x={remote_code_run['run']}", "--prompt", "hi",
             "--max-new-tokens", "2", "--trust-remote-code"], tmp_path, {"ALIGN_TEST_MARKER": str(marker)})
    assert marker.read_text() == "remote code ran"


def test_merge_with_a_run_that_asks_for_remote_code_runs_none(remote_code_run, tmp_path):
    marker = tmp_path / "marker"
    out = tmp_path / "merged"
    proc = run_cli(["-m", "align", "merge", str(remote_code_run["run"]), "--output", str(out)], tmp_path,
                   {"ALIGN_TEST_MARKER": str(marker)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert no_remote_code_ran(remote_code_run, marker)
    merged_config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in merged_config, "the merged model must not point at code that never ran"
    assert not list(out.glob("*.py"))


def test_export_of_a_run_that_asks_for_remote_code_carries_no_code(remote_code_run, tmp_path):
    marker = tmp_path / "marker"
    out = tmp_path / "exported"
    proc = run_cli(["-m", "align", "export", str(remote_code_run["run"]), "--output", str(out)], tmp_path,
                   {"ALIGN_TEST_MARKER": str(marker)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert no_remote_code_ran(remote_code_run, marker)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.glob("*.py")), "export copied a Python file out of a run dir"
    assert "evil.py" in proc.stderr, "what was left out is named"


def test_malformed_adapter_config_is_one_line(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,,}')
    proc = run_cli(["-m", "align", "generate", "--adapter", f"x={folder}", "--prompt", "hi"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "adapter_config.json:1: invalid JSON" in line


# --------------------------------------------------------------------------- ownership


def web_app(folder: Path) -> Path:
    """Someone else's folder that happens to hold a manifest.json."""
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": "My App", "short_name": "app", "start_url": "/", "icons": []}))
    (folder / "src" / "app.js").write_text("console.log('hello');\n")
    (folder / "README.md").write_text("# my app\n")
    return folder


def sft_yaml(folder: Path, model: Path, data: Path, output_dir: Path, **train) -> Path:
    config = {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data), "eval_split": None, "eval_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0, "logging_steps": 1,
                  "max_length": 64, **train},
        "samples": {"num_prompts": 0},
        "tracking": "none",
    }
    path = folder / "sft.yaml"
    path.write_text("# python recipes/sft.py --config sft.yaml\n" + yaml.safe_dump(config))
    return path


def run_recipe(stage: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """A recipe's command line in this process (what recipes/<stage>.py runs): exit status and its error lines."""
    from align.cli.recipes import recipe_main

    capsys.readouterr()
    code = recipe_main(stage, argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def test_a_folder_with_a_foreign_manifest_is_left_byte_identical(tmp_path, tiny_model_dir, tiny_data, sft_parent, capsys):
    app = web_app(tmp_path / "webapp")
    before = snapshot(app)
    assert folder_kind(app) == "foreign" and not RunDir(app).is_run_dir() and RunDir(app).manifest() is None
    config = sft_yaml(tmp_path, tiny_model_dir, tiny_data["sft"], app)
    code, lines = run_recipe("sft", ["--config", str(config)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert str(app) in lines[0] and "not an align run dir" in lines[0]
    # ... nor as the output of merge or export, nor as a parent run
    for args in (["merge", str(sft_parent), "--output", str(app)], ["export", str(sft_parent), "--output", str(app)]):
        proc = run_cli(["-m", "align", *args], tmp_path)
        assert proc.returncode == 2 and "align did not write" in error_lines(proc)[0], proc.stderr[-2000:]
    with pytest.raises(ConfigError, match="not an align run dir"):
        from align.stages.stage_run import finished_parent

        finished_parent(app)
    assert snapshot(app) == before, "a folder align did not create was changed"
    assert sorted(p.name for p in app.iterdir()) == ["README.md", "manifest.json", "src"]


def test_run_dirs_of_earlier_versions_are_recognized_and_adopted(tmp_path):
    run = RunDir.start(tmp_path / "old", stage="sft", config={}, config_yaml="a: 1\n", run_key="k", parent=None,
                       base_model={}, dataset={})
    run.finish(summary={}, outputs={})
    # What an earlier align wrote: the same manifest schema, without the marker.
    (run.path / MARKER).unlink()
    manifest = json.loads(run.manifest_path.read_text())
    del manifest[MARKER_KEY]
    run.manifest_path.write_text(json.dumps(manifest))
    (run.path / "stale.txt").write_text("from the old run")
    assert folder_kind(run.path) == "legacy" and run.is_run_dir() and run.is_finished()
    RunDir.start(run.path, stage="sft", config={}, config_yaml="a: 2\n", run_key="k2", parent=None, base_model={}, dataset={})
    assert folder_kind(run.path) == "run" and not (run.path / "stale.txt").exists()
    # A manifest written by this version whose marker was removed on purpose is no longer align's.
    (run.path / MARKER).unlink()
    assert folder_kind(run.path) == "foreign" and run.manifest() is None
    with pytest.raises(ConfigError, match="not an align run dir"):
        RunDir.start(run.path, stage="sft", config={}, config_yaml="", run_key="k", parent=None, base_model={}, dataset={})


def test_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_model_dir, tiny_data, capsys):
    target = tmp_path / "out"
    target.write_text("not a folder")
    code, lines = run_recipe("sft", ["--config", str(sft_yaml(tmp_path, tiny_model_dir, tiny_data["sft"], target))], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"output_dir: {target} is a file" in lines[0]
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_one_line(tmp_path, tiny_model_dir, tiny_data):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_cli([str(REPO / "recipes" / "sft.py"), "--config",
                        str(sft_yaml(tmp_path, tiny_model_dir, tiny_data["sft"], parent / "run"))], tmp_path)
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not writable" in error_lines(proc)[0]


# --------------------------------------------------------------------------- one run at a time


def test_a_lock_names_its_live_holder(tmp_path):
    first = RunLock.acquire(tmp_path / "run")
    try:
        with pytest.raises(RunLocked) as err:
            RunLock.acquire(tmp_path / "run")
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(err.value)
        assert err.value.exit_code == 2
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK).exists()
    RunLock.acquire(tmp_path / "run").release()  # free again


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_left_by_a_dead_process_is_cleared_with_a_message(tmp_path, caplog):
    import logging

    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started_at": "earlier", "command": "sft"}))
    logger = logging.getLogger("align")
    logger.addHandler(caplog.handler)  # recipes stop align's logger from propagating
    try:
        lock = RunLock.acquire(run)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"cleared a stale lock of pid {pid}" in caplog.text
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_a_reused_pid_or_another_host(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # A live pid whose start time differs is a reused pid: the holder is gone.
    (run / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pid_start": "1"}))
    RunLock.acquire(run).release()
    # A holder on another machine cannot be checked from here: refused, naming the file to delete.
    (run / LOCK).write_text(json.dumps({"pid": 4242, "host": "other-machine", "started_at": "earlier"}))
    with pytest.raises(RunLocked, match=r"pid 4242 on other-machine.*delete .*\.align-lock"):
        RunLock.acquire(run)


GATED = '''\
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from transformers import TrainerCallback
from align.cli.recipes import setup_logging
from align.stages.registry import get_stage, load_stage_config, run_stage

class Gate(TrainerCallback):
    """Hold the run after its first step until the test says go."""
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            Path({at!r}).write_text("step 1")
            while not Path({go!r}).exists():
                time.sleep(0.1)

setup_logging()
run_stage(load_stage_config("sft", {config!r}), callbacks=[Gate()])
'''


def test_two_concurrent_runs_the_second_exits_2_and_the_first_finishes_intact(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "runs" / "sft"
    config = sft_yaml(tmp_path, tiny_model_dir, tiny_data["sft"], out, max_steps=3)
    at, go = tmp_path / "at-step-1", tmp_path / "go"
    driver = tmp_path / "gated.py"
    driver.write_text(GATED.format(repo=str(REPO), at=str(at), go=str(go), config=str(config)))
    first = subprocess.Popen([sys.executable, str(driver)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not at.exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run never reached step 1"
            time.sleep(0.2)
        run_id = json.loads((out / "manifest.json").read_text())["run_id"]
        before = sorted(p.name for p in out.iterdir())
        second = run_cli([str(REPO / "recipes" / "sft.py"), "--config", str(config), "--force"], tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = error_lines(second)
        assert "in use by another align run" in line and f"pid {first.pid} on {socket.gethostname()}" in line
        assert sorted(p.name for p in out.iterdir()) == before, "the refused run touched the run dir"
    finally:
        go.write_text("go")
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["run_id"] == run_id and manifest["summary"]["steps"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    assert not (out / LOCK).exists(), "the lock is released at the end"


# --------------------------------------------------------------------------- errors mid-run, secrets


def test_a_library_error_while_preparing_data_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, tiny_data, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = "{{ raise_exception('this template refuses every conversation') }}"
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in ("chat_template.jinja",):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "run"
    config = sft_yaml(tmp_path, model, tiny_data["sft"], out)
    proc = run_cli([str(REPO / "recipes" / "sft.py"), "--config", str(config)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith("error: sft failed while preparing its data") and "this template refuses every conversation" in line
    assert "--debug" in line and f"nothing was written to {out}" in line
    assert not out.exists()  # the data is tokenized before the run dir is created
    from align.cli.recipes import recipe_main

    capsys.readouterr()
    assert recipe_main("sft", ["--config", str(config), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise_exception" in err, "--debug keeps the full trace"


def test_a_library_error_mid_run_is_one_line_and_the_run_is_marked_failed(tmp_path, tiny_model_dir, tiny_data, capsys, monkeypatch):
    from align.cli.recipes import recipe_main
    from align.stages import sft

    def broken_trainer(*args, **kwargs):  # as a TRL/transformers error raised once the run has started would
        raise RuntimeError("the trainer refuses this model")

    monkeypatch.setattr(sft, "build_trainer", broken_trainer)
    out = tmp_path / "run"
    assert recipe_main("sft", ["--config", str(sft_yaml(tmp_path, tiny_model_dir, tiny_data["sft"], out))]) == 1
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert line.startswith("error: sft failed before the first step: RuntimeError: the trainer refuses this model") and "--debug" in line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "the trainer refuses this model" in manifest["error"] and manifest["traceback"]


def test_no_secret_from_the_environment_or_the_command_line_lands_under_the_run_dir(tmp_path, tiny_model_dir, tiny_data):
    env_secrets = {"HF_TOKEN": "hf_EnvironmentSecret1234567890abcd", "ACME_SERVICE_PASSWORD": "correct-horse-battery-staple"}
    typed = "hf_TypedOnTheCommandLine0987654321zy"  # not in the environment: recognized by its shape
    out = tmp_path / "run"
    config = sft_yaml(tmp_path, tiny_model_dir, tiny_data["sft"], out)
    config.write_text(config.read_text().replace("tracking: none", "tracking: wandb"))
    proc = run_cli(
        [str(REPO / "recipes" / "sft.py"), "--config", str(config),
         f"wandb.tags=[{typed}, correct-horse-battery-staple]", f"wandb.name=run-{env_secrets['HF_TOKEN']}"],
        tmp_path, env_secrets,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wandb_files = [p for p in (out / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in wandb_files) and any(p.name == "debug.log" for p in wandb_files)
    secrets = [typed.encode(), *(v.encode() for v in env_secrets.values())]
    leaks = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)]
    assert not leaks, f"secrets written into {leaks}"
    assert "<redacted>" in (out / "config.yaml").read_text()


# --------------------------------------------------------------------------- align-data outputs


def test_align_data_build_never_replaces_a_foreign_folder(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = web_app(tmp_path / "out")
    (out / "build.json").write_text(json.dumps({"target": "web", "minify": True}))  # another tool's build.json
    before = snapshot(out)
    proc = run_cli(["-m", "data_tools", "build", "--format", "trl", "--input", str(data), "--output", str(out),
                    "--overwrite", "--no-plots"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not an align-data build" in proc.stderr
    assert snapshot(out) == before
