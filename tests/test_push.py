"""`align push`: the folder it uploads (byte for byte), its model card (read back by huggingface_hub), the commit,
and what it refuses. Everything up to the network call runs for real; the upload itself meets no network here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import preference_rows, tiny_overrides, write_jsonl

from align.cli import push
from align.core.artifacts import RunDir
from align.modeling.model_card import CardOptions, build_info, dataset_ids, model_card

REPO_ID = "someone/tiny-dpo"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_model_dir, tiny_data) -> dict[str, Path]:
    """A finished SFT -> DPO lineage on a base whose README names its license; DPO data from an align-data build."""
    from align.core.config_loader import load_config
    from align.stages.registry import run_stage
    from align.stages.dpo import DPOConfig
    from align.stages.sft import SFTConfig
    from data_tools.cli import main as align_data

    root = tmp_path_factory.mktemp("push")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# a tiny test model\n")
    built = root / "prefs-build"
    source = write_jsonl(root / "prefs.jsonl", preference_rows(24))
    assert align_data(["build", "--format", "trl", "--input", str(source), "--output", str(built), "--no-plots", "--jsonl",
                       "--test-fraction", "0.25", "--seed", "0"]) == 0
    run_stage(load_config(SFTConfig, None, tiny_overrides(base, tiny_data["sft"], root / "sft", tracking="none")))
    dpo_overrides = tiny_overrides(None, built, root / "dpo", parent_run=str(root / "sft"), tracking="wandb")
    dpo_overrides["data.eval_split"] = "test"
    run_stage(load_config(DPOConfig, None, dpo_overrides))
    return {"base": base, "build": built, "sft": root / "sft", "dpo": root / "dpo"}


def dry_run(run: Path, out: Path, *extra: str) -> int:
    return push.main([str(run), "--repo", REPO_ID, "--dry-run", "--output", str(out), *extra])


def test_dry_run_writes_the_folder_byte_for_byte(lineage, tmp_path, capsys):
    out = tmp_path / "hub"
    assert dry_run(lineage["dpo"], out, "--base-model", BASE_ID) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 8 files" in printed and "dry run: nothing uploaded" in printed
    files = [str(p) for p in push.commit_files(out)]
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "align/1-sft.yaml", "align/2-dpo.yaml",
                     "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    adapter = lineage["dpo"] / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (adapter / name).read_bytes(), name
    assert (out / "align/1-sft.yaml").read_bytes() == (lineage["sft"] / "config.yaml").read_bytes()
    assert (out / "align/2-dpo.yaml").read_bytes() == (lineage["dpo"] / "config.yaml").read_bytes()
    config_files = {str(lineage["sft"]): "align/1-sft.yaml", str(lineage["dpo"]): "align/2-dpo.yaml"}
    expected = model_card(RunDir(lineage["dpo"]), CardOptions(repo=REPO_ID, hub=True, base_model=BASE_ID, config_files=config_files))
    assert (out / "README.md").read_text() == expected


def test_the_card_round_trips_through_huggingface_hub(lineage, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "hub"
    assert dry_run(lineage["dpo"], out, "--base-model", BASE_ID) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == BASE_ID
    assert card.data.library_name == "peft"
    assert card.data.license == "mit", "inherited from the base model's README"
    assert {"align", "sft", "dpo", "lora", "peft"} <= set(card.data.tags)
    text = card.text
    dpo_manifest = json.loads((lineage["dpo"] / "manifest.json").read_text())
    sft_manifest = json.loads((lineage["sft"] / "manifest.json").read_text())
    build = json.loads((lineage["build"] / "build.json").read_text())
    for fact in (
        "objective `dpo`: beta 0.1",  # method and key hyperparameters
        f"fingerprint `{build_info(str(lineage['build']))['fingerprint']}`", str(lineage["build"]),  # the data's build.json
        f"| dpo | loss | {dpo_manifest['summary']['eval_loss_before']:.4g} | {dpo_manifest['summary']['eval_loss_after']:.4g} |",
        f"| sft | loss | {sft_manifest['summary']['eval_loss_before']:.4g} | {sft_manifest['summary']['eval_loss_after']:.4g} |",
        f"run `{dpo_manifest['wandb_run_id']}` in project `align-tests`", "- sft: not tracked in W&B",  # the W&B runs
        "align sft --config align/1-sft.yaml\nalign dpo --config align/2-dpo.yaml",  # the reproduce commands
        f'model = PeftModel.from_pretrained(base, "{REPO_ID}")',
    ):
        assert fact in text, fact
    assert build["command"] in text


def test_the_reproduce_commands_parse(lineage, tmp_path):
    """The card's commands, run on the published configs, load and check them (--print-config)."""
    from align.cli.main import main

    out = tmp_path / "hub"
    assert dry_run(lineage["dpo"], out) == 0
    text = (out / "README.md").read_text()
    commands = [line.split() for line in text.splitlines() if line.startswith("align ") and "--config align/" in line]
    assert [c[1] for c in commands] == ["sft", "dpo"]
    for command in commands:
        assert main([*command[1:3], str(out / command[3]), "--print-config"]) == 0


def test_without_a_token_or_network_one_line_after_the_folder(lineage, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert push.main([str(lineage["dpo"]), "--repo", REPO_ID, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Hugging Face token" in err and str(out) in err
    assert (out / "README.md").is_file()

    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the Hub is unreachable
    assert push.main([str(lineage["dpo"]), "--repo", REPO_ID, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: not pushed to {REPO_ID}") and str(out) in err
    assert "x" * 34 not in err


def test_the_commit_is_the_folder(lineage, tmp_path):
    from huggingface_hub import CommitOperationAdd

    out = tmp_path / "hub"
    assert dry_run(lineage["dpo"], out) == 0
    operations = push.commit_operations(out)
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == [str(p) for p in push.commit_files(out)]
    assert ".align-output.json" not in {op.path_in_repo for op in operations} and (out / ".align-output.json").is_file()
    assert all(Path(op.path_or_fileobj).read_bytes() == (out / op.path_in_repo).read_bytes() for op in operations)


def test_merged_publishes_the_whole_model(lineage, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert push.main([str(lineage["dpo"]), "--repo", REPO_ID, "--merged", "--dry-run", "--output", str(out)]) == 0
    names = [str(p) for p in push.commit_files(out)]
    assert "model.safetensors" in names and "config.json" in names and "adapter_config.json" not in names
    assert "library_name: transformers" in (out / "README.md").read_text()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(lineage["sft"] / "merged")
    stacked = PeftModel.from_pretrained(base, lineage["dpo"] / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, stacked(ids).logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- refusals


def copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run-copy"
    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_refuses_a_run_that_is_not_finished(lineage, tmp_path, capsys):
    run = copy_run(lineage["sft"], tmp_path)
    RunDir(run).update(status="failed")
    assert dry_run(run, tmp_path / "out") == 2
    assert "status is 'failed'; only a finished run is pushed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("planted, reason", [("adapter/loader.py", "code"), ("samples.pkl", "a pickle"),
                                             ("wandb/hook.sh", "code")])
def test_refuses_a_run_dir_holding_more_than_data(lineage, tmp_path, capsys, planted, reason):
    run = copy_run(lineage["sft"], tmp_path)
    (run / planted).parent.mkdir(parents=True, exist_ok=True)
    (run / planted).write_text("import os\n")
    assert dry_run(run, tmp_path / "out") == 2
    assert f"{planted} ({reason})" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_an_unexpected_file_in_the_adapter(lineage, tmp_path, capsys):
    run = copy_run(lineage["sft"], tmp_path)
    (run / "adapter" / "notes.cfg").write_text("x\n")
    assert dry_run(run, tmp_path / "out") == 2
    assert "not model data (notes.cfg)" in capsys.readouterr().err


def test_refuses_a_secret_in_any_file_and_keeps_no_folder(lineage, tmp_path, capsys, monkeypatch):
    run = copy_run(lineage["sft"], tmp_path)
    config = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    config["note"] = "hf_" + "A1b2" * 9
    (run / "adapter" / "tokenizer_config.json").write_text(json.dumps(config))
    assert dry_run(run, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "a secret (a token or key) is in tokenizer_config.json" in err and "A1b2" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-copy"], "nothing written"

    clean = copy_run(lineage["sft"], tmp_path / "second")
    monkeypatch.setenv("WANDB_API_KEY", "local-secret-value-123")  # an environment secret that leaked into a file
    (clean / "config.yaml").write_text((clean / "config.yaml").read_text() + "# local-secret-value-123\n")
    assert dry_run(clean, tmp_path / "out2") == 2
    assert "is in align/1-sft.yaml" in capsys.readouterr().err


def test_refuses_a_folder_that_is_not_a_run_and_a_bad_repo(lineage, tmp_path, capsys):
    assert dry_run(lineage["build"], tmp_path / "out") == 2
    assert "not an align run dir" in capsys.readouterr().err
    assert push.main([str(lineage["sft"]), "--repo", "no-owner", "--dry-run"]) == 2
    assert "--repo: expected OWNER/NAME" in capsys.readouterr().err


def test_hub_datasets_come_from_a_build_json(tmp_path):
    """An align-data build of a Hub dataset names it in the card's `datasets`; local inputs are left out."""
    from align.core.artifacts import RunDir as R

    folder = tmp_path / "built"
    folder.mkdir()
    (folder / "build.json").write_text(json.dumps({"align_data": "0.1.0", "inputs": ["HuggingFaceH4/ultrafeedback_binarized",
                                                                                     str(tmp_path / "local.jsonl")]}))
    run = R.start(tmp_path / "run", stage="dpo", config={}, config_yaml="{}\n", run_key="k", parent=None,
                  base_model={"name": "smollm2-135m-instruct"}, dataset={"path": str(folder)})
    assert dataset_ids([run]) == ["HuggingFaceH4/ultrafeedback_binarized"]
    card = model_card(run, CardOptions(hub=True))
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card, "the embedded model's"
