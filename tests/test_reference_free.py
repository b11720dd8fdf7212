"""SimPO, CPO and ORPO stages: trained by our reference-free trainer, with no reference at all.

- the tokenization is TRL's DPO tokenization (same ids as DPOTrainer's prepared dataset);
- each stage trains only its adapter on top of the SFT run, and every backbone forward it runs
  (training and evaluation) has the adapter on: zero reference forwards, counted; the same
  counter sees DPO's reference forwards;
- with full fine-tuning no second model exists: one backbone ever runs (DPO: two);
- the stages are registered, listed in --keys, and refuse bad values with exit status 2.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_metrics, tiny_overrides
from test_stages import Recorder, assert_only_adapter_changed, probe_ids

from align.core.config_loader import describe, load_config
from align.core.errors import ConfigError
from align.stages.registry import get_stage, run_stage


class ForwardCounter:
    """Every backbone (LlamaModel) forward: which instance ran, and whether its adapters were disabled."""

    def __init__(self, monkeypatch):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers.models.llama.modeling_llama import LlamaModel

        self.calls: list[tuple[int, bool]] = []
        original = LlamaModel.forward
        layers: dict[int, list] = {}

        def counting(module, *args, **kwargs):
            tuners = layers.setdefault(id(module), [m for m in module.modules() if isinstance(m, BaseTunerLayer)])
            self.calls.append((id(module), any(m.disable_adapters for m in tuners)))
            return original(module, *args, **kwargs)

        monkeypatch.setattr(LlamaModel, "forward", counting)

    @property
    def reference(self) -> int:
        return sum(disabled for _, disabled in self.calls)

    @property
    def instances(self) -> int:
        return len({i for i, _ in self.calls})


def test_tokenization_is_trls(tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from align.core.config import DataConfig
    from align.core.data import load_splits
    from align.preference.objective_trainer import tokenize_pairs
    from test_dpo_fast import load_tiny

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_splits(DataConfig(path="bundled:demo-prefs", max_train_samples=24), "preference", 0).train
    ours = tokenize_pairs(Dataset.from_list(rows), tokenizer)
    args = DPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to=[], max_length=None, dataset_num_proc=None)
    theirs = DPOTrainer(model=load_tiny(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tokenizer).train_dataset
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("simpo", {}),
        ("cpo", {"cpo.loss_type": "ipo"}),
        ("orpo", {}),
        ("orpo", {"orpo.nll_on_prompt": True}),
    ],
    ids=["simpo", "cpo-ipo", "orpo", "orpo-nll-on-prompt"],
)
def test_stage_trains_the_adapter_with_no_reference_forward(sft_parent, tiny_data, tmp_path, tiny_model_dir, monkeypatch,
                                                            stage, extra):
    counter = ForwardCounter(monkeypatch)
    rec = Recorder(probe_ids(tiny_model_dir))
    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / stage, parent_run=str(sft_parent),
                               **{"tracking": "none", "samples.num_prompts": 0, **extra})
    spec = get_stage(stage)
    run = run_stage(load_config(spec.config, None, overrides), callbacks=[rec])
    assert run.is_finished()
    assert_only_adapter_changed(rec)
    # 3 training steps + the held-out set (6 pairs, batch 4: 2 batches) at step 0 and at the end + the recorder's probe
    # + the non-finite guard's probe at the end of training (align/core/safeguards.py).
    assert len(counter.calls) == 3 + 2 * 2 + 1 + 1 and counter.reference == 0, counter.calls
    assert counter.instances == 1
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert summary[f"eval_{key}_before"] is not None and summary[f"eval_{key}_after"] is not None, key
    assert summary["eval_loss_after"] < summary["eval_loss_before"], "training lowers the held-out loss"
    shared = not extra.get("orpo.nll_on_prompt")
    assert summary["batch_layout"].startswith("shared prefix" if shared else "two rows per pair (orpo.nll_on_prompt")
    lines = spec.summary(summary)
    assert lines and "(step 0) ->" in lines[0] and "n/a" not in lines[0]
    assert any("train/loss" in r for r in read_metrics(run.path))
    # Tokens trained on reach the evaluation's compute table: a running count, as TRL's trainers log it.
    from align.core.artifacts import RunDir
    from align.evaluation.metrics import compute_table

    counts = [r["train/num_tokens"] for r in read_metrics(run.path) if "train/num_tokens" in r]
    assert counts and counts == sorted(counts) and counts[-1] > 0
    assert compute_table({stage: RunDir(run.path)}, None)[stage]["tokens"] == counts[-1]


def test_the_counter_sees_dpo_reference_forwards(sft_parent, tiny_data, tmp_path, monkeypatch):
    from align.stages import dpo
    from align.stages.registry import run_stage

    counter = ForwardCounter(monkeypatch)
    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / "dpo", parent_run=str(sft_parent),
                               **{"tracking": "none", "samples.num_prompts": 0, "dpo.ref_cache": False})
    run_stage(load_config(dpo.DPOConfig, None, overrides))
    assert counter.reference == 3 + 2 * 2, "one reference forward per batch, adapter disabled"


@pytest.mark.parametrize("stage", ["simpo", "dpo"])
def test_full_fine_tuning_holds_one_model_without_reference(sft_parent, tiny_data, tmp_path, monkeypatch, stage):
    counter = ForwardCounter(monkeypatch)
    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / stage, parent_run=str(sft_parent), **{
        "tracking": "none", "samples.num_prompts": 0, "peft.method": "full", "train.learning_rate": 1e-4,
        **({"dpo.ref_cache": False} if stage == "dpo" else {}),
    })
    spec = get_stage(stage)
    run = run_stage(load_config(spec.config, None, overrides))
    assert (run.path / "merged" / "model.safetensors").is_file()
    assert counter.instances == (1 if stage == "simpo" else 2), "DPO's frozen reference copy is a second model"


@pytest.mark.parametrize(
    "stage, overrides, needle",
    [
        ("simpo", {"simpo.beta": 0.0}, "simpo.beta: must be positive"),
        ("simpo", {"simpo.gamma": -0.1}, "simpo.gamma: must be at least 0"),
        ("simpo", {"simpo.label_smoothing": 0.5}, "simpo.label_smoothing: must be in [0, 0.5)"),
        ("simpo", {"simpo.nll_weight": -1.0}, "simpo.nll_weight: must be at least 0"),
        ("cpo", {"cpo.loss_type": "hinge", "cpo.label_smoothing": 0.1}, "cpo.label_smoothing: used only by loss_type sigmoid"),
        ("cpo", {"cpo.loss_type": "simpo"}, "cpo.loss_type: expected one of"),
        ("cpo", {"cpo.nll_weight": -0.5}, "cpo.nll_weight: must be at least 0"),
        ("orpo", {"orpo.beta": -1.0}, "orpo.beta: must be positive"),
    ],
)
def test_bad_values_name_the_key(stage, overrides, needle):
    cls = get_stage(stage).config
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d.jsonl", **overrides})
    assert needle in str(err.value)


KEYS = {
    "simpo": {"simpo.beta": "positive", "simpo.gamma": "at least 0", "simpo.label_smoothing": "[0, 0.5)", "simpo.alpha": "any real",
              "simpo.nll_weight": "at least 0", "simpo.shared_prefix": "prompt once"},
    "cpo": {"cpo.beta": "positive", "cpo.loss_type": "ipo", "cpo.label_smoothing": "[0, 0.5)", "cpo.nll_weight": "at least 0",
            "cpo.alpha": "any real", "cpo.shared_prefix": "prompt once"},
    "orpo": {"orpo.beta": "positive", "orpo.nll_on_prompt": "two-row", "orpo.shared_prefix": "prompt once"},
}


@pytest.mark.parametrize("stage", sorted(KEYS))
def test_keys_list_every_option_with_its_range(tmp_path, stage):
    from test_cli import run_recipe

    lines = {line.split(" (")[0].strip(): line for line in describe(get_stage(stage).config)}
    for key, needle in KEYS[stage].items():
        assert needle in lines[key], (key, lines[key])
    proc = run_recipe(stage, "--keys", cwd=tmp_path)
    assert proc.returncode == 0 and all(k in proc.stdout for k in KEYS[stage])
    bad = tmp_path / f"{stage}.yaml"
    bad.write_text(f"output_dir: out/{stage}\nmodel:\n  name_or_path: m\ndata:\n  path: bundled:demo-prefs\n"
                   f"{stage}:\n  beta: -1.0\ntracking: none\n")
    proc = run_recipe(stage, "--config", str(bad), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and f"{stage}.beta: must be positive" in errors[0]
    assert not (tmp_path / "out").exists()


def test_reference_free_loss_starts_from_the_start_models_own_margin(sft_parent, tiny_data, tmp_path):
    """No step-0 invariant: SimPO's step-0 loss is its formula at the SFT model's own margins, not ln 2."""
    from align.stages import simpo
    from align.stages.registry import run_stage

    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / "s", parent_run=str(sft_parent), **{
        "tracking": "none", "samples.num_prompts": 0, "train.max_steps": 1, "data.eval_fraction": 0.2,
        "train.eval_batch_size": 8, "simpo.beta": 2.0, "simpo.gamma": 0.5,
    })
    run = run_stage(load_config(simpo.SimPOConfig, None, overrides))
    step0 = next(r for r in read_metrics(run.path) if r["_step"] == 0 and "eval/loss" in r)
    assert step0["eval/rewards/margins"] != 0.0, "the SFT model already prefers one response"
    assert abs(step0["eval/loss"] - 0.6931) > 1e-3
    # One held-out batch (5 pairs): loss = mean over pairs of -log sigmoid(margin_i - gamma), margin_i = rewards.
    # By Jensen's inequality the loss at the mean margin is a lower bound.
    mean_margin = step0["eval/rewards/margins"]
    assert step0["eval/loss"] >= float(torch.nn.functional.softplus(torch.tensor(-(mean_margin - 0.5)))) - 1e-6


def test_a_pipeline_names_the_new_stages(tmp_path, tiny_model_dir, tiny_data):
    """`stage: simpo` (and cpo, orpo, kto) in a pipeline: each runs on the SFT stage's merged model."""
    from test_pipeline import run_pipeline

    common = "train:\n  max_steps: 1\n  batch_size: 4\n  max_length: 64\nsamples:\n  num_prompts: 0\ntracking: none\n"
    (tmp_path / "sft.yaml").write_text(
        f"output_dir: unused\nmodel:\n  name_or_path: {tiny_model_dir}\ndata:\n  path: {tiny_data['sft']}\n  eval_split: null\n" + common
    )
    for stage in ("simpo", "cpo", "orpo", "kto"):
        (tmp_path / f"{stage}.yaml").write_text(
            f"output_dir: unused\nparent_run: unused\ndata:\n  path: {tiny_data['prefs']}\n  eval_split: null\n" + common
        )
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"name: offline\noutput_dir: {tmp_path / 'runs'}\nstages:\n  - {{name: sft, stage: sft, config: sft.yaml}}\n"
        + "".join(f"  - {{name: {s}, stage: {s}, config: {s}.yaml, parent: sft}}\n" for s in ("simpo", "cpo", "orpo", "kto"))
    )
    proc = run_pipeline(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, line in (("simpo", "SimPO reward accuracy"), ("cpo", "CPO reward accuracy"), ("orpo", "ORPO reward accuracy"),
                       ("kto", "KTO reward margin")):
        manifest = json.loads((tmp_path / "runs" / name / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["stage"] == name
        assert manifest["parent"]["path"].endswith("sft")
        assert line in proc.stdout
