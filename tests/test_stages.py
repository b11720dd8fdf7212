"""SFT then DPO on a tiny model: the invariants the whole design rests on.

- training changes every trainable LoRA parameter and leaves every base weight bit-identical;
- saved adapters reload (PeftModel.from_pretrained) to the in-memory model's logits;
- the merged SFT model equals base + adapter;
- DPO's reference is the merged SFT model with adapters disabled: loss ln 2 and rewards 0
  at step 0, reference log-probs equal to the merged model's own;
- each stage is a W&B offline run (group, job_type) whose metric names match metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LN2, read_metrics, tiny_overrides
from transformers import TrainerCallback
from wandb_offline import read_offline_run

from align.core.config_loader import load_config
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig
from align.stages.stage_run import resolve_base

PROBE = [{"role": "user", "content": "What is 3 plus one?"}, {"role": "assistant", "content": "4"}]


class Recorder(TrainerCallback):
    """Snapshots every parameter at train begin/end and the model's logits on a probe."""

    def __init__(self, probe_ids: torch.Tensor):
        self.probe_ids = probe_ids

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.probe_ids).logits.float().clone()
        model.train(was_training)


def probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([tok.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]])


def assert_only_adapter_changed(rec: Recorder) -> None:
    assert rec.trainable, "nothing was trainable"
    assert all("lora_" in n for n in rec.trainable), sorted(rec.trainable)[:5]
    unchanged = [n for n in rec.trainable if torch.equal(rec.before[n], rec.after[n])]
    assert unchanged == [], f"trainable parameters that did not change: {unchanged[:5]}"
    frozen = [n for n in rec.before if n not in rec.trainable]
    assert frozen, "no frozen base weights"
    moved = [n for n in frozen if not torch.equal(rec.before[n], rec.after[n])]
    assert moved == [], f"base weights that changed: {moved[:5]}"


def load_causal_lm(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, tiny_model_dir, tiny_data):
    """SFT then DPO on the tiny model, with recorders on both trainers."""
    from align.stages.registry import run_stage

    root = tmp_path_factory.mktemp("runs")
    ids = probe_ids(tiny_model_dir)
    sft_rec, dpo_rec = Recorder(ids), Recorder(ids)
    sft_cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], root / "sft"))
    sft_dir = run_stage(sft_cfg, callbacks=[sft_rec])
    dpo_cfg = load_config(
        DPOConfig, None,
        tiny_overrides(None, tiny_data["prefs"], root / "dpo", parent_run=str(root / "sft"), **{"samples.judge": "format"}),
    )
    dpo_dir = run_stage(dpo_cfg, callbacks=[dpo_rec])
    return {"sft": (sft_cfg, sft_dir.path, sft_rec), "dpo": (dpo_cfg, dpo_dir.path, dpo_rec), "probe": ids}


def test_runs_finish_with_complete_rundirs(pipeline_runs):
    for stage in ("sft", "dpo"):
        _, path, _ = pipeline_runs[stage]
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["stage"] == stage
        assert manifest["base_model"]["content_hash"].startswith("sha256:")
        assert manifest["dataset"]["hash"].startswith("sha256:")
        assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])
        assert manifest["started_at"] and manifest["ended_at"]
        assert (path / "config.yaml").read_text().startswith(f"# resolved {stage} config")
        assert (path / "adapter" / "adapter_config.json").is_file()
        assert (path / "adapter" / "adapter_model.safetensors").is_file()
        assert (path / "samples.jsonl").is_file()
    sft_manifest = json.loads((pipeline_runs["sft"][1] / "manifest.json").read_text())
    dpo_manifest = json.loads((pipeline_runs["dpo"][1] / "manifest.json").read_text())
    assert (pipeline_runs["sft"][1] / "merged" / "model.safetensors").is_file()
    assert dpo_manifest["parent"]["run_id"] == sft_manifest["run_id"]
    judge = dpo_manifest["summary"]["judge"]
    assert judge["name"] == "format" and judge["n"] == 2 and 0 <= judge["before"] <= 1 and 0 <= judge["after"] <= 1
    assert not list(pipeline_runs["sft"][1].rglob("*.tmp")), "temp files left behind"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_only_adapter_parameters_change(pipeline_runs, stage):
    assert_only_adapter_changed(pipeline_runs[stage][2])


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_saved_adapter_reloads_to_same_logits(pipeline_runs, tiny_model_dir, stage):
    from peft import PeftModel

    _, path, rec = pipeline_runs[stage]
    base_dir = tiny_model_dir if stage == "sft" else pipeline_runs["sft"][1] / "merged"
    model = PeftModel.from_pretrained(load_causal_lm(base_dir), path / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=pipeline_runs["probe"]).logits
    torch.testing.assert_close(logits, rec.logits, atol=1e-5, rtol=0)


def test_merged_sft_model_equals_base_plus_adapter(pipeline_runs):
    _, path, rec = pipeline_runs["sft"]
    merged = load_causal_lm(path / "merged")
    with torch.no_grad():
        logits = merged(input_ids=pipeline_runs["probe"]).logits
    torch.testing.assert_close(logits, rec.logits, atol=1e-4, rtol=0)
    config = json.loads((path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_dpo_step0_loss_is_ln2_and_rewards_zero(pipeline_runs):
    _, path, _ = pipeline_runs["dpo"]
    rows = read_metrics(path)
    step0_eval = next(r for r in rows if r["_step"] == 0 and "eval/loss" in r)
    first_train = next(r for r in rows if r["_step"] == 1 and "train/loss" in r)
    for row, prefix in ((step0_eval, "eval"), (first_train, "train")):
        assert row[f"{prefix}/loss"] == pytest.approx(LN2, abs=1e-4)
        assert row[f"{prefix}/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert row[f"{prefix}/rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
        assert row[f"{prefix}/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    summary = json.loads((path / "manifest.json").read_text())["summary"]
    assert summary["eval_loss_before"] == pytest.approx(LN2, abs=1e-4)
    assert summary["eval_rewards/accuracies_before"] == 0.0
    # Training moved the policy away from the reference.
    assert summary["eval_loss_after"] != pytest.approx(LN2, abs=1e-4)


def test_dpo_reference_logps_equal_merged_sft_model(pipeline_runs, tmp_path):
    """The implicit reference (adapter disabled) reproduces the merged SFT model loaded on its own."""
    from align.modeling import models
    from align.core.artifacts import RunDir
    from align.core.data import load_splits
    from align.stages import dpo

    cfg = pipeline_runs["dpo"][0]
    base, _ = resolve_base(cfg)
    splits = load_splits(cfg.data, "preference", cfg.train.seed)
    tokenizer = models.load_tokenizer(base, cfg.model)
    train_ds, eval_ds, _ = dpo.prepare(splits, tokenizer, cfg.train.max_length)
    trainer = dpo.build_trainer(cfg, models.load_model(base, cfg.model), tokenizer, train_ds, eval_ds, RunDir(tmp_path))
    batch = next(iter(trainer.get_eval_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    merged = load_causal_lm(pipeline_runs["sft"][1] / "merged")
    with torch.no_grad():
        logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    summed = (token_logps * batch["completion_mask"][:, 1:]).sum(-1)
    own_chosen, own_rejected = summed.chunk(2)
    # Sums of ~100 token log-probs (size ~170): one float32 ulp there is 1.5e-5, so compare relatively.
    torch.testing.assert_close(ref_chosen, own_chosen, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_rejected, own_rejected, atol=1e-6, rtol=1e-6)
    # No second copy of the base: the policy is the only model, the reference is its adapter switched off.
    assert trainer.ref_model is None


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_wandb_offline_run_matches_metrics_jsonl(pipeline_runs, stage):
    _, path, _ = pipeline_runs[stage]
    manifest = json.loads((path / "manifest.json").read_text())
    wandb_dir = Path(manifest["outputs"]["wandb"])
    assert wandb_dir.is_dir() and wandb_dir.parent == path / "wandb"
    run = read_offline_run(wandb_dir)
    assert (run.project, run.group, run.job_type) == ("align-tests", "tests", stage)
    assert {"model", "data", "lora", "train"} <= run.config_keys
    jsonl_names = {k for row in read_metrics(path) for k in row if not k.startswith("_")}
    wandb_names = {k for k in run.history_keys if not k.startswith("_") and not k.startswith("samples")}
    assert jsonl_names == wandb_names
    assert "train/loss" in jsonl_names and "eval/loss" in jsonl_names
    if stage == "dpo":  # the judge's before/after scores of the sample generations
        assert {"judge/format/reference", "judge/format/dpo"} <= jsonl_names
    assert (f"{stage}-adapter", "model") in run.artifacts
    assert any(k.startswith("samples") for k in run.history_keys), "no sample generations table"


def test_failed_stage_is_marked_failed_not_finished(tmp_path, tiny_model_dir, tiny_data):
    from align.stages.registry import run_stage

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash at step %d" % state.global_step)

    cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "sft", tracking="none"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(cfg, callbacks=[Boom()])
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "simulated crash at step 1" in manifest["error"]
    assert not (tmp_path / "sft" / "adapter").exists()
    assert not (tmp_path / "sft" / "merged").exists()


def test_qlora_sft_then_dpo_on_cpu(tmp_path, tiny_model_dir, tiny_data):
    """4-bit NF4 base (bitsandbytes on the CPU): SFT, merge (dequantized), DPO on the re-quantized merge."""
    import bitsandbytes as bnb


    from align.stages.registry import run_stage

    ids = probe_ids(tiny_model_dir)
    sft_rec, dpo_rec = Recorder(ids), Recorder(ids)
    common = {"model.quantization": "4bit", "train.max_steps": 2, "tracking": "none", "samples.num_prompts": 1}
    sft_cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "sft", **common))
    run_stage(sft_cfg, callbacks=[sft_rec])
    dpo_cfg = load_config(
        DPOConfig, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "dpo", parent_run=str(tmp_path / "sft"), **common)
    )
    run_stage(dpo_cfg, callbacks=[dpo_rec])
    for rec in (sft_rec, dpo_rec):
        assert_only_adapter_changed(rec)
    merged_config = json.loads((tmp_path / "sft" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config, "the merged model is saved dequantized"
    first = next(r for r in read_metrics(tmp_path / "dpo") if r["_step"] == 1 and "train/loss" in r)
    assert first["train/loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    # The base really was 4-bit during training.
    from align.modeling import models

    base, _ = resolve_base(dpo_cfg)
    model = models.load_model(base, dpo_cfg.model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    quant = model.config.quantization_config
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant


def test_sft_packing_trains_on_assistant_tokens(tmp_path, tiny_model_dir, tiny_data):
    """Packed rows keep their assistant-only labels (transformers isolates packed rows in training)."""
    from align.stages.registry import run_stage

    rec = Recorder(probe_ids(tiny_model_dir))
    cfg = load_config(
        SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "sft", **{"sft.packing": True, "tracking": "none"})
    )
    run = run_stage(cfg, callbacks=[rec])
    assert run.is_finished()
    assert_only_adapter_changed(rec)
    losses = [r["train/loss"] for r in read_metrics(run.path) if "train/loss" in r]
    assert losses and all(0 < x < 20 for x in losses)


@pytest.mark.parametrize(
    "loss_type, extra, step0_loss",
    [
        ("sigmoid", {}, LN2),  # -log sigmoid(0)
        ("hinge", {}, 1.0),  # relu(1 - 0)
        ("ipo", {"dpo.beta": 0.1}, (1 / (2 * 0.1)) ** 2),  # (0 - 1/(2 beta))^2
        ("robust", {"dpo.label_smoothing": 0.1}, LN2),  # ((1-e) ln2 - e ln2) / (1 - 2e)
    ],
)
def test_dpo_loss_types_start_from_their_closed_form(pipeline_runs, tmp_path, tiny_data, loss_type, extra, step0_loss):
    from align.stages.registry import run_stage

    overrides = tiny_overrides(
        None, tiny_data["prefs"], tmp_path / "dpo", parent_run=str(pipeline_runs["sft"][1]),
        **{"dpo.loss_type": loss_type, "train.max_steps": 1, "tracking": "none", "samples.num_prompts": 0, **extra},
    )
    run = run_stage(load_config(DPOConfig, None, overrides))
    step0 = next(r for r in read_metrics(run.path) if r["_step"] == 0 and "eval/loss" in r)
    assert step0["eval/loss"] == pytest.approx(step0_loss, rel=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"train.gradient_checkpointing": True},
        {"sft.neftune_noise_alpha": 5.0},
        {"sft.label_smoothing": 0.1},
        {"train.gradient_accumulation_steps": 2, "lora.target_modules": ["q_proj", "v_proj"], "lora.r": 4},
        {"model.chat_template": "instruction", "train.lr_scheduler": "linear", "train.warmup_ratio": 0.3},
    ],
    ids=["grad-checkpointing", "neftune", "label-smoothing", "grad-accum-qv-only", "instruction-template"],
)
def test_sft_options_train_only_the_adapter(tmp_path, tiny_model_dir, tiny_data, options):
    from align.stages.registry import run_stage

    rec = Recorder(probe_ids(tiny_model_dir))
    cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "sft", tracking="none", **options))
    run = run_stage(cfg, callbacks=[rec])
    assert run.is_finished()
    assert_only_adapter_changed(rec)
    if "lora.target_modules" in options:
        assert {n.split(".")[-4] for n in rec.trainable} == {"q_proj", "v_proj"}
    if options.get("model.chat_template") == "instruction":
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(run.path / "merged").chat_template
        assert "### Instruction" in template, "the next stage renders conversations the same way"
