"""The installed command: the wheel in a fresh venv outside the checkout runs SFT -> DPO from copied configs.

The venv has no system site-packages and no path to the checkout's sources. Its dependencies
(torch, transformers, TRL, ...) are the test venv's, reached through a .pth file that lists that
venv's site-packages as a plain folder (its editable-install hook, which would import align from
the checkout, is not run that way): installing them again would take minutes and no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

# What a build reads: the package sources and pyproject.toml, not the checkout's runs or venv.
LEFT_OUT = shutil.ignore_patterns(".venv", ".git", "runs", "wandb", "build", "dist", "site", "*.egg-info", "__pycache__",
                                  ".pytest_cache", ".whl", ".gpucache", "gpu-check-out")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with align's wheel installed (and nothing of the checkout on its path)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=LEFT_OUT)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(root / "dist")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("align-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "align_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(cwd)), "WANDB_MODE": "offline",
        "WANDB_SILENT": "true", "ALIGN_CACHE_DIR": os.environ.get("ALIGN_CACHE_DIR", ""),
    }
    env = {k: v for k, v in env.items() if v}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_runs_sft_then_dpo_from_copied_configs(installed, tmp_path, tiny_model_dir):
    where = run(installed, "python", "-c", "import align, torch; print(align.__file__); print(torch.__file__)", cwd=tmp_path)
    package, _ = where.stdout.split()
    assert package.startswith(str(installed.parent)), f"align comes from the wheel, not the checkout: {package}"
    assert not Path(package).parent.joinpath("configs").is_symlink()

    helped = run(installed, "align", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "  sft " in helped.stdout and "  dpo " in helped.stdout, helped.stderr
    listed = run(installed, "align", "configs", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "smollm2-135m: " in listed.stdout, listed.stderr
    copied = run(installed, "align", "configs", "copy", "smollm2-135m", "./c", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    first_line = (tmp_path / "c" / "sft.yaml").read_text().splitlines()[0]
    assert first_line == "# align sft --config ./c/sft.yaml"

    # The copied configs as they are (bundled data included), on the tiny model and for a few steps.
    tiny = [f"model.name_or_path={tiny_model_dir}", "train.max_steps=2", "train.batch_size=2", "train.max_length=64",
            "data.max_eval_samples=4", "samples.num_prompts=2", "samples.max_new_tokens=4"]
    sft = run(installed, "align", "sft", "--config", "./c/sft.yaml", *tiny, cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr[-3000:]
    sft_run = tmp_path / "runs/smollm2-135m/sft"
    manifest = json.loads((sft_run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["steps"] == 2
    assert (sft_run / "adapter" / "adapter_model.safetensors").is_file()

    dpo = run(installed, "align", "dpo", "--config", "./c/dpo.yaml", *tiny[1:], cwd=tmp_path)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    dpo_manifest = json.loads((tmp_path / "runs/smollm2-135m/dpo/manifest.json").read_text())
    assert dpo_manifest["status"] == "finished" and dpo_manifest["summary"]["steps"] == 2
    assert (tmp_path / dpo_manifest["parent"]["path"]).resolve() == sft_run.resolve()
