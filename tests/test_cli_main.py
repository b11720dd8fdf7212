"""The `align` command line: every registered stage and command, and the shipped recipe configs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from align.cli import configs, main
from align.stages.registry import all_stages


def align(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage_and_command_on_one_line_each(capsys):
    assert main.main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, stage in all_stages().items():
        line = next(line for line in lines if line.split()[:1] == [name])
        assert stage.description.split()[0] in line, f"{name}: its description is its line"
    for command in main.COMMANDS:
        assert any(line.split()[:1] == [command.name] for line in lines), command.name
    assert max(len(line) for line in lines) <= 100


def test_no_stage_shadows_a_command():
    assert not {main.canonical(c.name) for c in main.COMMANDS} & set(all_stages())


@pytest.mark.parametrize("command", [*all_stages(), "pipeline", "sweep", "compare-methods", "merge", "export", "generate",
                                     "combine", "configs"])
def test_every_command_parses_its_options(command):
    flag = "--keys" if command in (*all_stages(), "pipeline", "sweep", "compare-methods") else "--help"
    try:
        code = main.main([command, flag])
    except SystemExit as exit:  # argparse's --help
        code = exit.code
    assert code == 0


def test_a_stage_runs_with_the_recipe_options(tmp_path):
    """`align <stage>` is recipes/<stage>.py: --keys, --config with overrides, --print-config, bad keys exit 2."""
    keys = align("dpo", "--keys")
    assert keys.returncode == 0 and "dpo.beta (a number" in keys.stdout
    shown = align("sft", "--config", "recipes/configs/smollm2-135m/sft.yaml", "train.max_steps=7", "--resume", "--print-config")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["resume"] is True
    bad = align("sft", "--config", "recipes/configs/smollm2-135m/sft.yaml", "train.learnin_rate=1")
    assert bad.returncode == 2 and "did you mean 'train.learning_rate'" in bad.stderr and len(bad.stderr.splitlines()) == 1
    missing = align("sft")
    assert missing.returncode == 2 and "align configs copy" in missing.stderr


def test_unknown_command_suggests_one_and_exits_2(capsys):
    assert main.main(["stf"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err
    assert main.main([]) == 2


def test_every_recipe_script_has_its_align_command():
    """recipes/<x>.py of a stage or workflow runs the same code as `align <x>`."""
    for script in sorted((REPO / "recipes").glob("*.py")):
        text = script.read_text()
        if "recipe_main(" in text or "pipeline_main(" in text or re.search(r"from align\.\S+ import main\b", text):
            assert main.command_for_script(script.stem) is not None, script.name


# --------------------------------------------------------------------------- align configs


def test_configs_list_shows_every_model_folder_and_file(capsys):
    assert configs.main(["list"]) == 0
    out = capsys.readouterr().out
    for folder in (REPO / "recipes" / "configs").iterdir():
        assert f"{folder.name}: " in out
        for path in folder.glob("*.yaml"):
            assert re.search(rf"^  {re.escape(path.name)}\s+align \S+", out, re.M), path


def test_configs_copy_keeps_comments_and_names_the_installed_command(tmp_path):
    dest = tmp_path / "c"
    assert configs.main(["copy", "smollm2-135m", str(dest)]) == 0
    shipped = REPO / "recipes" / "configs" / "smollm2-135m"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for path in shipped.glob("*.yaml"):
        original, copied = path.read_text().splitlines(), (dest / path.name).read_text().splitlines()
        assert copied[1:] == original[1:], "only the command line changes"
        command = re.match(r"# python recipes/(\w+)\.py --config recipes/configs/smollm2-135m/(\S+)$", original[0])
        assert copied[0] == f"# align {main.command_for_script(command[1])} --config {dest}/{command[2]}"
    sft = yaml.safe_load((dest / "sft.yaml").read_text())
    assert sft["data"]["path"] == "bundled:demo-sft"


def test_the_first_line_of_a_copied_config_runs_it(tmp_path):
    dest = tmp_path / "c"
    assert configs.main(["copy", "smollm2-135m", str(dest)]) == 0
    for name in ("sft.yaml", "dpo.yaml", "pipeline.yaml", "sweep-dpo.yaml"):
        argv = (dest / name).read_text().splitlines()[0].removeprefix("# align ").split()
        shown = align(*argv, "--print-config", cwd=tmp_path)
        assert shown.returncode == 0, (name, shown.stderr)


def test_configs_copy_brings_the_launcher_configs_its_readme_names(tmp_path):
    dest = tmp_path / "q"
    assert configs.main(["copy", "qwen2.5-7b-instruct", str(dest)]) == 0
    readme = (dest / "README.md").read_text()
    assert "recipes/" not in readme.replace("recipes/family_smoke.py", "")  # a checkout-only script stays as it is
    assert f"accelerate launch --config_file {dest}/accelerate/ddp.yaml --num_processes 8 \\\n    -m align sft --config {dest}/sft.yaml" in readme
    assert sorted(p.name for p in (dest / "accelerate").iterdir()) == ["ddp.yaml", "fsdp.yaml"]
    launcher = (dest / "accelerate" / "ddp.yaml").read_text().splitlines()
    assert launcher[0] == f"# accelerate launch --config_file {dest}/accelerate/ddp.yaml -m align sft --config {dest}/sft.yaml"
    shipped = (REPO / "recipes" / "accelerate" / "ddp.yaml").read_text().splitlines()
    assert len(launcher) == len(shipped) and "recipes/" not in "\n".join(launcher)
    assert [line for line in launcher if "align" not in line] == [line for line in shipped if "recipes/" not in line]


def test_configs_copy_refuses_a_folder_with_files_and_an_unknown_model(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.yaml").write_text("x: 1\n")
    assert configs.main(["copy", "smollm2-135m", str(tmp_path / "full")]) == 2
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["mine.yaml"]
    assert configs.main(["copy", "smollm2", str(tmp_path / "new")]) == 2
    assert "did you mean 'smollm2-135m'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"], "nothing half-written"
    (tmp_path / "empty").mkdir()
    assert configs.main(["copy", "smollm2-135m", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "sft.yaml").is_file()
