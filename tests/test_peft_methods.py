"""PEFT methods, the adapter lifecycle (merge, export, generate, combine) and the methods comparison.

On the tiny Llama (hidden 64, 2 layers, grouped-query attention: 4 heads, 2 key/value heads):
- a few SFT steps of each method change exactly the parameters it trains, as many as its
  formula over the base's module shapes says, and nothing else;
- merge reloads to base + adapter logits (LoRA, DoRA, VeRA, IA3; QLoRA against the dequantized
  base); combine with weights (1, 0) reproduces the first adapter;
- the DPO reference of each method: a fresh zero-effect adapter gives policy == reference,
  prompt/prefix tuning's reference is the base itself, full keeps its starting weights;
- combinations that cannot work fail with a message naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LN2, tiny_overrides, write_jsonl
from test_stages import Recorder, load_causal_lm, probe_ids

from align.cli import lifecycle
from align.core.config import ModelConfig
from align.stages.registry import load_stage_config as load_config
from align.stages.dpo import DPOConfig
from align.stages.ppo import PPOConfig
from align.stages.reward import RewardConfig
from align.stages.sft import SFTConfig
from align.core.errors import ConfigError, DataError

METHODS = ["full", "lora", "qlora", "dora", "vera", "ia3", "prompt_tuning", "prefix_tuning"]
LORA_R, VERA_R, VIRTUAL = 4, 8, 4
SMALL = {
    "lora.r": LORA_R,
    "peft.vera.r": VERA_R,
    "peft.prompt_tuning.num_virtual_tokens": VIRTUAL,
    "peft.prefix_tuning.num_virtual_tokens": VIRTUAL,
    "tracking": "none",
    "samples.num_prompts": 1,  # sample generation with the adapter off and on works for every method
}
# What each method's trainable parameter names contain.
MARKERS = {
    "lora": ("lora_A", "lora_B"),
    "qlora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "vera": ("vera_lambda_b", "vera_lambda_d"),
    "ia3": ("ia3_l",),
    "prompt_tuning": ("prompt_encoder",),
    "prefix_tuning": ("prompt_encoder",),
}


# --------------------------------------------------------------------------- SFT per method


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_model_dir, tiny_data):
    """method -> (RunDir path, Recorder); each method trains once, when a test first asks for it."""
    from align.stages.registry import run_stage

    root = tmp_path_factory.mktemp("methods")
    done: dict[str, tuple[Path, Recorder]] = {}

    def get(method: str) -> tuple[Path, Recorder]:
        if method not in done:
            rec = Recorder(probe_ids(tiny_model_dir))
            overrides = tiny_overrides(tiny_model_dir, tiny_data["sft"], root / method, **{**SMALL, "peft.method": method})
            run = run_stage(load_config(SFTConfig, None, overrides), callbacks=[rec])
            assert run.is_finished()
            done[method] = (run.path, rec)
        return done[method]

    return get


def expected_trainable(method: str, base) -> int:
    """The method's trainable-parameter formula, from the base model's module shapes."""
    cfg = base.config
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}

    def targets(names):
        return [m for n, m in linears.items() if n.rsplit(".", 1)[-1] in names]

    if method in ("lora", "qlora"):
        return sum(LORA_R * (m.in_features + m.out_features) for m in linears.values())
    if method == "dora":
        return sum(LORA_R * (m.in_features + m.out_features) + m.out_features for m in linears.values())
    if method == "vera":  # q_proj 64->64 and v_proj 64->32 (GQA) share one sliced A/B
        return sum(m.out_features + VERA_R for m in targets({"q_proj", "v_proj"}))
    if method == "ia3":
        return sum(m.out_features for m in targets({"k_proj", "v_proj"})) + sum(m.in_features for m in targets({"down_proj"}))
    if method == "prompt_tuning":
        return VIRTUAL * cfg.hidden_size
    if method == "prefix_tuning":
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        return VIRTUAL * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
    assert method == "full"
    return sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_sft_trains_exactly_the_method_parameters(sft_runs, tiny_model_dir, method):
    path, rec = sft_runs(method)
    base = load_causal_lm(tiny_model_dir)
    expected = expected_trainable(method, base)
    assert sum(rec.before[n].numel() for n in rec.trainable) == expected
    summary = json.loads((path / "manifest.json").read_text())["summary"]
    assert summary["parameters"]["trainable"] == expected
    if method == "full":
        assert rec.trainable == set(rec.before), "full fine-tuning trains every parameter"
        assert summary["parameters"]["trainable_pct"] == 100.0
    else:
        assert all(any(k in n for k in MARKERS[method]) for n in rec.trainable), sorted(rec.trainable)[:4]
        assert {k for k in MARKERS[method] if any(k in n for n in rec.trainable)} == set(MARKERS[method])
    unchanged = sorted(n for n in rec.trainable if torch.equal(rec.before[n], rec.after[n]))
    assert unchanged == [], f"trainable parameters that did not change: {unchanged[:4]}"
    moved = sorted(n for n in rec.before if n not in rec.trainable and not torch.equal(rec.before[n], rec.after[n]))
    assert moved == [], f"frozen parameters that changed: {moved[:4]}"


def test_trainable_numel_of_4bit_base_counts_unpacked_parameters(sft_runs, tiny_model_dir):
    """A 4-bit base stores two parameters per byte; the totals count parameters, not bytes."""
    lora = json.loads((sft_runs("lora")[0] / "manifest.json").read_text())["summary"]["parameters"]
    qlora = json.loads((sft_runs("qlora")[0] / "manifest.json").read_text())["summary"]["parameters"]
    assert qlora["trainable"] == lora["trainable"] and qlora["total"] == lora["total"]


@pytest.mark.parametrize("method", ["lora", "ia3", "full", "prompt_tuning"])
def test_summary_reports_size_on_disk(sft_runs, method):
    path, _ = sft_runs(method)
    manifest = json.loads((path / "manifest.json").read_text())
    saved = path / ("merged" if method == "full" else "adapter")
    weights = sum(p.stat().st_size for p in saved.glob("*.safetensors"))
    assert weights > 0 and manifest["summary"]["parameters"]["adapter_bytes"] == weights
    assert manifest["summary"]["seconds_per_step"] > 0
    assert ("adapter" in manifest["outputs"]) == (method != "full")
    assert ("merged" in manifest["outputs"]) == (method not in ("prompt_tuning", "prefix_tuning"))


# --------------------------------------------------------------------------- merge, export, combine, generate


def base_plus_adapter(tiny_model_dir, adapter_dir, quantized: bool = False):
    from peft import PeftModel

    from align.modeling import models

    if quantized:  # QLoRA: the dequantized 4-bit base, as the merge sees it
        ref = models.resolve(str(tiny_model_dir))
        base = models.load_model(ref, ModelConfig(quantization="4bit"), device="cpu").dequantize()
    else:
        base = load_causal_lm(tiny_model_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "vera", "ia3"])
def test_merge_then_reload_equals_base_plus_adapter(sft_runs, tiny_model_dir, tmp_path, method):
    path, _ = sft_runs(method)
    out = tmp_path / "merged"
    assert lifecycle.main(["merge", str(path), "--output", str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = probe_ids(tiny_model_dir)
    merged = logits(load_causal_lm(out), ids)
    reference = logits(base_plus_adapter(tiny_model_dir, path / "adapter", quantized=method == "qlora"), ids)
    torch.testing.assert_close(merged, reference, atol=1e-4, rtol=0)
    assert not torch.allclose(merged, logits(load_causal_lm(tiny_model_dir), ids), atol=1e-3), "the adapter changed nothing"


def test_merge_refuses_virtual_token_adapters(sft_runs, tmp_path, capsys):
    path, _ = sft_runs("prompt_tuning")
    assert lifecycle.main(["merge", str(path), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "PROMPT_TUNING cannot be merged" in err and "virtual tokens" in err
    assert not (tmp_path / "m").exists()


def test_child_stage_of_a_prompt_tuning_run_says_why_it_has_no_base(sft_runs, tiny_data, tmp_path):
    from align.stages.stage_run import resolve_base

    path, _ = sft_runs("prompt_tuning")
    cfg = load_config(DPOConfig, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "dpo", parent_run=str(path)))
    with pytest.raises(DataError, match="prompt_tuning trains virtual tokens"):
        resolve_base(cfg)


def test_export_writes_a_loadable_adapter_and_a_model_card(sft_runs, tiny_model_dir, tmp_path):
    path, rec = sft_runs("dora")
    out = tmp_path / "export"
    assert lifecycle.main(["export", str(path), "--output", str(out)]) == 0
    manifest = json.loads((path / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    for fact in (
        f"base_model: {tiny_model_dir}", "peft.method: dora", manifest["dataset"]["path"], manifest["dataset"]["hash"],
        str(path), manifest["run_id"], f"| loss | {manifest['summary']['eval_loss_before']:.4g} | {manifest['summary']['eval_loss_after']:.4g} |",
        f"{manifest['summary']['parameters']['trainable']:,} of",
    ):
        assert fact in card, fact
    ids = probe_ids(tiny_model_dir)
    torch.testing.assert_close(logits(base_plus_adapter(tiny_model_dir, out), ids), rec.logits, atol=1e-5, rtol=0)


def test_export_of_a_full_run_points_to_its_model(sft_runs, tmp_path, capsys):
    path, _ = sft_runs("full")
    assert lifecycle.main(["export", str(path), "--output", str(tmp_path / "e")]) == 2
    assert "has no adapter/ (peft.method full: the trained model is" in capsys.readouterr().err


def random_lora(base_dir: Path, out: Path, r: int = LORA_R, seed: int = 1) -> Path:
    """A LoRA adapter with random (non-zero) A and B on `base_dir`, saved in PEFT format."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_dir), LoraConfig(r=r, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_combine_with_weights_1_0_reproduces_the_first_adapter(sft_runs, tiny_model_dir, tmp_path, combination):
    first, _ = sft_runs("lora")
    other = random_lora(tiny_model_dir, tmp_path / "other")
    out = tmp_path / "combined"
    args = ["combine", str(first), str(other), "--weights", "1", "0", "--type", combination, "--output", str(out)]
    assert lifecycle.main(args) == 0
    ids = probe_ids(tiny_model_dir)
    combined = logits(base_plus_adapter(tiny_model_dir, out), ids)
    torch.testing.assert_close(combined, logits(base_plus_adapter(tiny_model_dir, first / "adapter"), ids), atol=1e-4, rtol=0)
    # The second adapter is really in there: other weights give another model.
    mixed = tmp_path / "mixed"
    assert lifecycle.main([*args[:4], "0.5", "0.5", *args[6:-1], str(mixed)]) == 0
    assert not torch.allclose(logits(base_plus_adapter(tiny_model_dir, mixed), ids), combined, atol=1e-3)


def test_combine_rejects_other_bases_and_non_lora_adapters(sft_runs, tiny_model_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    lora, _ = sft_runs("lora")
    other_base = tmp_path / "other-base"
    torch.manual_seed(7)
    LlamaForCausalLM(load_causal_lm(tiny_model_dir).config).save_pretrained(other_base)
    cases = [
        ([str(random_lora(other_base, tmp_path / "elsewhere"))], "adapters trained on different bases"),
        ([str(sft_runs("ia3")[0])], "is of PEFT type IA3; only LoRA adapters combine"),
        ([str(sft_runs("dora")[0])], "is a DoRA adapter"),
        ([str(random_lora(tiny_model_dir, tmp_path / "r8", r=8))], "--type linear: needs adapters of one rank, got ranks [4, 8]"),
    ]
    for second, message in cases:
        assert lifecycle.main(["combine", str(lora), *second, "--output", str(tmp_path / "c")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_generate_routes_each_request_to_its_adapter(sft_runs, tiny_model_dir, tmp_path):
    from align.modeling.generation import Sampling, generate
    from align.modeling.models import load_tokenizer, resolve

    lora, _ = sft_runs("lora")
    other = random_lora(tiny_model_dir, tmp_path / "other")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "What is 3 plus one?", "adapter": "other"},
        {"prompt": [{"role": "user", "content": "What is 5 plus one?"}]},
    ])
    out = tmp_path / "responses.jsonl"
    args = ["generate", "--adapter", f"sft={lora}", "--adapter", f"other={other}", "--prompts", str(prompts),
            "--with-base", "--max-new-tokens", "6", "--output", str(out)]
    assert lifecycle.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"][-1]["content"], r["adapter"]) for r in rows] == [
        ("What is 3 plus one?", "other"), ("What is 5 plus one?", "sft"), ("What is 5 plus one?", "other"), ("What is 5 plus one?", "base"),
    ]
    tokenizer = load_tokenizer(resolve(str(tiny_model_dir)), ModelConfig())
    sampling = Sampling(max_new_tokens=6)
    expected = {
        "other": base_plus_adapter(tiny_model_dir, other),
        "sft": base_plus_adapter(tiny_model_dir, lora / "adapter"),
        "base": load_causal_lm(tiny_model_dir),
    }
    for row in rows:
        assert row["response"] == generate(expected[row["adapter"]], tokenizer, [row["prompt"]], sampling=sampling)[0], row
    assert len({r["response"] for r in rows[1:]}) > 1, "every model answered the same: routing would go unnoticed"


def test_generate_refuses_adapters_of_different_types(sft_runs, capsys):
    args = ["generate", "--adapter", f"a={sft_runs('lora')[0]}", "--adapter", f"b={sft_runs('ia3')[0]}", "--prompt", "hi"]
    assert lifecycle.main(args) == 2
    assert "one base holds adapters of a single PEFT type" in capsys.readouterr().err


# --------------------------------------------------------------------------- the DPO reference per method


def dpo_trainer(method: str, model_dir: Path, data: Path, out: Path, **extra):
    from align.modeling import models
    from align.core.artifacts import RunDir
    from align.core.data import load_splits
    from align.stages import dpo

    cfg = load_config(DPOConfig, None, tiny_overrides(model_dir, data, out, **{**SMALL, "peft.method": method, **extra}))
    base = models.resolve(cfg.model.name_or_path)
    splits = load_splits(cfg.data, "preference", cfg.train.seed)
    tokenizer = models.load_tokenizer(base, cfg.model)
    train_ds, eval_ds, _ = dpo.prepare(splits, tokenizer, cfg.train.max_length)
    trainer = dpo.build_trainer(cfg, models.load_model(base, cfg.model), tokenizer, train_ds, eval_ds, RunDir(out))
    return trainer, next(iter(trainer.get_eval_dataloader()))


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of the chosen and rejected halves of a DPO batch, from plain logits."""
    model.eval()
    ids, mask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    out = out[:, -ids.shape[1]:]  # prompt learning prepends the virtual tokens to the outputs
    token = torch.log_softmax(out[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * mask[:, 1:]).sum(-1).chunk(2)


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "vera", "ia3"])
def test_fresh_adapter_policy_equals_its_implicit_reference(tiny_model_dir, tiny_data, tmp_path, method):
    trainer, batch = dpo_trainer(method, tiny_model_dir, tiny_data["prefs"], tmp_path)
    assert trainer.ref_model is None, "the reference must be the policy with its adapter off, not a copy"
    reference = trainer.compute_ref_log_probs(trainer.model, batch)
    policy = sequence_logps(trainer.model, batch)
    for pol, ref in zip(policy, reference):
        torch.testing.assert_close(pol, ref, atol=1e-5, rtol=1e-6)  # summed over ~40 tokens in fp32
    # The reference really is the adapter switched off: moving the adapter moves the policy only.
    with torch.no_grad():
        for p in (p for p in trainer.model.parameters() if p.requires_grad):
            p.add_(0.5)
    moved = sequence_logps(trainer.model, batch)
    assert not torch.allclose(moved[0], policy[0], atol=1e-3)
    for again, ref in zip(trainer.compute_ref_log_probs(trainer.model, batch), reference):
        torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-6)  # summed log-probs: relative, not at the float32 edge


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_take_the_base_as_reference(tiny_model_dir, tiny_data, tmp_path, method):
    trainer, batch = dpo_trainer(method, tiny_model_dir, tiny_data["prefs"], tmp_path)
    reference = trainer.compute_ref_log_probs(trainer.model, batch)
    base = sequence_logps(load_causal_lm(tiny_model_dir), batch)
    for ref, own in zip(reference, base):
        torch.testing.assert_close(ref, own, atol=1e-5, rtol=1e-6)
    # Documented: the virtual tokens act from step 0, so the policy starts away from its reference.
    policy = sequence_logps(trainer.model, batch)
    assert not torch.allclose(policy[0], reference[0], atol=1e-3)


def test_full_reference_stays_the_starting_weights(tiny_model_dir, tiny_data, tmp_path):
    trainer, batch = dpo_trainer("full", tiny_model_dir, tiny_data["prefs"], tmp_path, **{"train.max_steps": 2})
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # TRL's loss takes the reference forward through trainer.ref_model when there is one.
    before = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    for pol, ref in zip(sequence_logps(trainer.model, batch), before):
        torch.testing.assert_close(pol, ref, atol=1e-5, rtol=1e-6)  # summed over ~40 tokens in fp32
    trainer.train()
    assert any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters()), "the policy did not train"
    frozen = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(start[n], frozen[n]) for n in start), "the reference moved"
    assert not any(p.requires_grad for p in frozen.values())
    after = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    base = sequence_logps(load_causal_lm(tiny_model_dir), batch)
    for a, b, own, moved in zip(after, before, base, sequence_logps(trainer.model, batch)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(a, own, atol=1e-5, rtol=1e-6)
        assert not torch.allclose(moved, a, atol=1e-3), "the policy still equals its reference after training"


# --------------------------------------------------------------------------- invalid combinations


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (SFTConfig, {"peft.method": "qlora", "model.quantization": "8bit"}, "peft.method: qlora trains LoRA on a 4-bit NF4 base, but model.quantization is 8bit"),
        (SFTConfig, {"peft.method": "full", "model.quantization": "4bit"}, "peft.method: full trains every weight, and quantized weights (model.quantization: 4bit) cannot be trained"),
        (SFTConfig, {"peft.method": "prefix_tuning", "train.gradient_checkpointing": True}, "prefix_tuning does not work with train.gradient_checkpointing: true"),
        (SFTConfig, {"peft.method": "prompt_tuning", "sft.packing": True}, "prompt_tuning does not work with sft.packing: true"),
        (SFTConfig, {"peft.method": "ia3", "peft.ia3.feedforward_modules": ["up_proj"]}, "peft.ia3.feedforward_modules: ['up_proj'] not in peft.ia3.target_modules"),
        (SFTConfig, {"peft.method": "prompt_tuning", "peft.prompt_tuning.num_virtual_tokens": 0}, "peft.prompt_tuning.num_virtual_tokens: must be at least 1"),
        (SFTConfig, {"peft.method": "vera", "peft.vera.r": 0}, "peft.vera.r: must be at least 1"),
        (SFTConfig, {"peft.method": "lorra"}, "peft.method: expected one of"),
        (RewardConfig, {"peft.method": "vera"}, "peft.method: 'vera' is not supported by the reward stage"),
        (PPOConfig, {"peft.method": "prompt_tuning", "reward_run": "r", "train.max_steps": 1}, "peft.method: 'prompt_tuning' is not supported by the ppo stage"),
        (PPOConfig, {"peft.method": "full", "reward_run": "r", "train.max_steps": 1}, "use one of lora, qlora, dora"),
    ],
    ids=["qlora-8bit", "full-4bit", "prefix-checkpointing", "prompt-packing", "ia3-ff", "virtual-0", "vera-r0", "typo", "reward-vera", "ppo-prompt", "ppo-full"],
)
def test_invalid_combination_names_the_key(tmp_path, cls, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, tiny_overrides(Path("m"), Path("d.jsonl"), tmp_path / "x", **overrides))
    assert message in str(err.value)


def test_qlora_sets_4bit_and_dora_is_lora_with_use_dora(tmp_path):
    from align.modeling.adapters import peft_config_for

    cfg = load_config(SFTConfig, None, tiny_overrides(Path("m"), Path("d.jsonl"), tmp_path, **{"peft.method": "qlora"}))
    assert cfg.model.quantization == "4bit"
    assert type(peft_config_for(cfg)).__name__ == "LoraConfig" and not peft_config_for(cfg).use_dora
    cfg = load_config(SFTConfig, None, tiny_overrides(Path("m"), Path("d.jsonl"), tmp_path, **{"peft.method": "dora"}))
    assert cfg.model.quantization == "none" and peft_config_for(cfg).use_dora
    cfg = load_config(SFTConfig, None, tiny_overrides(Path("m"), Path("d.jsonl"), tmp_path, **{"peft.method": "full"}))
    assert peft_config_for(cfg) is None


def test_prompt_tuning_starts_from_init_text(tiny_model_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from align.modeling.adapters import peft_config_for

    overrides = {"peft.method": "prompt_tuning", "peft.prompt_tuning.num_virtual_tokens": 6, "peft.prompt_tuning.init_text": "Answer briefly."}
    cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, Path("d.jsonl"), tmp_path, **overrides))
    base = load_causal_lm(tiny_model_dir)
    model = get_peft_model(base, peft_config_for(cfg, base_location=str(tiny_model_dir)))
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("Answer briefly.", add_special_tokens=False)["input_ids"]
    ids = (ids * 6)[:6]  # PEFT repeats the text to fill the virtual tokens
    expected = base.get_input_embeddings().weight[ids]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expected)


# --------------------------------------------------------------------------- the comparison recipe


def test_compare_methods_recipe_end_to_end(tmp_path, tiny_model_dir, tiny_data):
    """The shipped comparison YAML, shrunk to the tiny model, two methods, one step per stage."""
    from conftest import REPO
    from wandb_offline import read_offline_run

    from align.cli import compare

    shipped = REPO / "recipes" / "configs" / "smollm2-135m" / "compare_methods.yaml"
    out = tmp_path / "compare"
    common = {k: v for k, v in tiny_overrides(tiny_model_dir, None, out, **{"train.max_steps": 1}).items()
              if k not in ("output_dir", "data.path", "wandb.group", "wandb.project") and not k.startswith("samples.")}
    args = [f"output_dir={out}", "methods=[lora, prompt_tuning]", "wandb.project=align-tests",
            f"sft_overrides.data.path={tiny_data['sft']}", f"dpo_overrides.data.path={tiny_data['prefs']}",
            "sft_overrides.train.max_steps=1", "dpo_overrides.train.max_steps=1"]
    args += [f"overrides.{k}={json.dumps(v) if v is not None else 'null'}" for k, v in common.items()]
    assert compare.main(["--config", str(shipped), *args]) == 0

    rows = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert list(rows) == ["lora", "prompt_tuning"]
    for method, row in rows.items():
        sft = json.loads((out / method / "sft" / "manifest.json").read_text())
        dpo = json.loads((out / method / "dpo" / "manifest.json").read_text())
        assert row["status"] == "ok" and sft["status"] == dpo["status"] == "finished"
        assert sft["summary"]["steps"] == dpo["summary"]["steps"] == 1
        assert row["trainable params"] == sft["summary"]["parameters"]["trainable"] > 0
        assert row["adapter on disk (MB)"] > 0 and row["SFT peak memory (MB)"] > 0 and row["DPO s/step"] > 0
        assert row["SFT held-out loss"] == sft["summary"]["eval_loss_after"]
        assert row["DPO reward accuracy"] == dpo["summary"]["eval_rewards/accuracies_after"]
        assert dpo["base_model"]["location"] == str(tiny_model_dir.resolve()), "DPO starts from the same base for every method"
    assert rows["lora"]["DPO step-0 loss"] == pytest.approx(LN2, abs=1e-4)
    assert rows["prompt_tuning"]["DPO step-0 loss"] != pytest.approx(LN2, abs=1e-4)
    table = (out / "comparison.md").read_text()
    assert "| lora | " in table and "| prompt_tuning | " in table and "trainable %" in table
    (wandb_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(wandb_dir)
    assert {"methods/_type", "methods/nrows"} <= run.history_keys, "no W&B table"
    assert any(name.endswith("-methods") and kind == "run_table" for name, kind in run.artifacts)
