"""The per-model recipes (recipes/configs/<model>/) run as shipped, with a tiny model of the same architecture.

The data comes from the exact `align-data build` command in the model READMEs, with the hub ids
swapped for local copies in the same layouts (HuggingFaceH4/ultrafeedback_binarized's splits and
fields; MT-Bench's and IFEval's prompt fields). Each recipe then runs two steps with its model
swapped for a tiny random-init model of its family that speaks the model's real chat template,
fp32 on the CPU (the recipes say bf16 for GPUs); the QLoRA recipe stays 4-bit.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import REPO, read_metrics, write_jsonl

from align.modeling import families as fam

RECIPES = REPO / "recipes" / "configs"
FOLDERS = sorted(c.recipes for f in fam.FAMILIES.values() for c in f.checkpoints if c.recipes and c.recipes != "smollm2-135m")
# Two steps of three recipes take ~1 min per folder on the 2-core CPU: the default run takes one
# folder; `-m slow` runs them all.
DEFAULT_FOLDER = "qwen2.5-1.5b-instruct"
MT_BENCH_PROMPT = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and must-see attractions."


def checkpoint_of(folder: str) -> tuple[fam.Family, fam.Checkpoint]:
    for family in fam.FAMILIES.values():
        for c in family.checkpoints:
            if c.recipes == folder:
                return family, c
    raise KeyError(folder)


def build_command() -> list[str]:
    """The `align-data build` command of the model READMEs (one command, the same in every folder)."""
    commands = set()
    for folder in FOLDERS:
        text = (RECIPES / folder / "README.md").read_text()
        block = text.split("```bash\nalign-data build", 1)[1].split("```", 1)[0]
        commands.add("align-data build" + block.replace("\\\n", " "))
    assert len(commands) == 1, "every README gives the same data command"
    return shlex.split(commands.pop())


def uf_row(i: int, prompt: str) -> dict:
    """A row in HuggingFaceH4/ultrafeedback_binarized's layout: a text prompt, conversations repeating it."""
    chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"A clear answer number {i}, with its reasons."}]
    rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"No idea {i}."}]
    return {"prompt": prompt, "prompt_id": f"id{i:04d}", "chosen": chosen, "rejected": rejected, "messages": chosen,
            "score_chosen": 8.0, "score_rejected": 3.0}


@pytest.fixture(scope="module")
def ultrafeedback(tmp_path_factory) -> tuple[Path, dict]:
    """The README's data command run on local copies of its three hub datasets."""
    from datasets import Dataset, DatasetDict

    from data_tools.cli import main

    root = tmp_path_factory.mktemp("uf")
    topics = ["volcanoes", "tides", "bread", "chess", "bees", "glaciers", "jazz", "comets", "maps", "tea", "ferns", "kites"]
    prompts = [f"Explain how {t} work, in {n} short sentences." for t in topics for n in (2, 3, 4)]
    train = [uf_row(i, p) for i, p in enumerate(prompts)]
    train.append(uf_row(99, "Please help. " + MT_BENCH_PROMPT))  # an evaluation prompt: decontamination drops it
    splits = {"train_prefs": train, "test_prefs": [uf_row(200 + i, f"Why is the sky {c} at dusk?") for i, c in enumerate(["red", "orange"])],
              "train_sft": train[:3]}  # another split of the hub set that the command leaves out
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(root / "ultrafeedback_binarized"))
    write_jsonl(root / "mt_bench.jsonl", [{"prompt": [MT_BENCH_PROMPT, "Rewrite your previous response."], "category": "writing", "prompt_id": 81}])
    write_jsonl(root / "ifeval.jsonl", [{"key": 1000, "prompt": "Write a 300+ word summary of the wikipedia page about Raymond III."}])

    local = {"HuggingFaceH4/ultrafeedback_binarized": str(root / "ultrafeedback_binarized"),
             "HuggingFaceH4/mt_bench_prompts": str(root / "mt_bench.jsonl"), "google/IFEval": str(root / "ifeval.jsonl")}
    argv = build_command()
    assert argv[:2] == ["align-data", "build"] and set(local) <= set(argv)
    out = root / "data"
    argv = [local.get(a, a) for a in argv[1:]]
    argv[argv.index("--output") + 1] = str(out)
    assert main(argv + ["--no-plots"]) == 0
    return out, json.loads((out / "build.json").read_text())


def test_the_data_command_builds_decontaminated_pairs(ultrafeedback):
    from align.core.config import DataConfig
    from align.core.data import load_splits

    out, build = ultrafeedback
    text = json.dumps(build)
    assert "contaminated" in text  # the MT-Bench prompt's pair, counted by reason
    splits = load_splits(DataConfig(path=str(out), eval_split="test"), "preference", 0)
    rows = splits.train + splits.eval
    assert len(rows) == 38 and splits.eval, "36 train_prefs + 2 test_prefs prompts, 5% held out by prompt"
    assert not any(MT_BENCH_PROMPT in r["prompt"][0]["content"] for r in rows)
    assert {tuple(m["role"] for m in r["prompt"]) for r in rows} == {("user",)}, "the repeated prompt is cut"
    sft = load_splits(DataConfig(path=str(out), eval_split="test"), "sft", 0)
    assert sft.train[0]["messages"][-1] == splits.train[0]["chosen"][0]
    assert any("SFT on the chosen answers" in n for n in sft.notes)


@pytest.fixture(scope="module")
def base_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def recipe_overrides(model_dir: Path | None, data: Path, out: Path, **extra) -> dict:
    """Only what a CPU test must change: model, data, where, two steps, fp32, no W&B, short samples."""
    base = {"output_dir": str(out), "data.path": str(data), "train.max_steps": 2, "model.dtype": "float32",
            "tracking": "none", "samples.num_prompts": 1, "samples.max_new_tokens": 4, **extra}
    if model_dir is not None:
        base["model.name_or_path"] = str(model_dir)
    return base


@pytest.mark.parametrize("folder", [f if f == DEFAULT_FOLDER else pytest.param(f, marks=pytest.mark.slow) for f in FOLDERS])
def test_recipes_run_two_steps_on_a_tiny_model_of_the_family(folder, ultrafeedback, base_tokenizer, tmp_path):
    from align.core.artifacts import RunDir
    from align.stages.registry import load_stage_config, run_stage

    data, _ = ultrafeedback
    family, checkpoint = checkpoint_of(folder)
    model_dir = fam.save_random_model(family, tmp_path / "model", base_tokenizer, checkpoint=checkpoint)
    runs = {}
    for name, stage, parent in (("sft", "sft", None), ("dpo", "dpo", "sft"), ("qlora-dpo", "dpo", "sft")):
        path = RECIPES / folder / f"{name}.yaml"
        overrides = recipe_overrides(model_dir if parent is None else None, data, tmp_path / name,
                                     **({"parent_run": str(runs[parent])} if parent else {}))
        cfg = load_stage_config(stage, path, overrides)
        runs[name] = run_stage(cfg).path
        manifest = json.loads((runs[name] / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["summary"]["steps"] == 2, name
        shipped = load_stage_config(stage, path)  # the recipe's own values reached the run
        ran = RunDir(runs[name]).config()
        assert ran["train"]["batch_size"] == shipped.train.batch_size
        assert ran["train"]["gradient_accumulation_steps"] == shipped.train.gradient_accumulation_steps
        assert ran["train"]["gradient_checkpointing"] == shipped.train.gradient_checkpointing
        assert ran["train"]["learning_rate"] == shipped.train.learning_rate
    assert RunDir(runs["qlora-dpo"]).config()["model"]["quantization"] == "4bit"
    step0 = next(r for r in read_metrics(runs["dpo"]) if r["_step"] == 0 and "eval/loss" in r)
    assert abs(step0["eval/loss"] - 0.6931) < 1e-3, "the reference is the merged SFT model"
