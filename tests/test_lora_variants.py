"""The LoRA variants: lora.rslora, lora.init (gaussian, eva, pissa, pissa_niter_<n>, olora, loftq), lora.plus_ratio.

On the tiny Llama, DPO from the session's SFT run with each variant:
- the trainable set is the adapter's A and B, as many parameters as PEFT's config says (EVA: its
  redistributed ranks); the base, kept as it is, does not change;
- the step-0 invariant holds with every init: loss ln 2, margin 0 (the reference is the model
  training started from, also where PiSSA/OLoRA/LoftQ start the adapter away from zero);
- `align merge` gives the trained policy's logits; `align export` writes an adapter that plain PEFT
  loads onto the original base (PiSSA/OLoRA: converted, rank 2r) and that reproduces them;
- LoRA+ puts B in a param group at plus_ratio x lr, as PEFT's create_loraplus_optimizer does;
- PiSSA/OLoRA factors are PEFT's own, and training them on the kept base equals PEFT's residual model;
- GRPO (an online stage) trains PiSSA with LoRA+: KL 0 at step 0, its adapter saved converted;
- every refused combination exits 2 naming the key, with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LN2, read_metrics, tiny_overrides
from test_stages import Recorder, load_causal_lm, probe_ids
from transformers import TrainerCallback

from align.cli import lifecycle
from align.core.config import ModelConfig
from align.core.config_loader import apply_overrides, load_config
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig
from test_online import runs as online_runs  # noqa: F401 - the fixture: SFT run, reward run on it

LORA_R, RATIO = 4, 8.0
VARIANTS = {
    "gaussian": {"lora.init": "gaussian"},
    "eva": {"lora.init": "eva"},
    "pissa": {"lora.init": "pissa"},
    "pissa_niter_2": {"lora.init": "pissa_niter_2"},
    "olora_rslora": {"lora.init": "olora", "lora.rslora": True},
    "loftq": {"lora.init": "loftq", "peft.method": "qlora"},
    "plus": {"lora.plus_ratio": RATIO},
}
CONVERTED = ("pissa", "pissa_niter_2", "olora_rslora")  # saved as standard LoRAs of rank 2r


class Groups(TrainerCallback):
    """The optimizer's param groups at train begin: (initial lr, parameter names)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [(g.get("initial_lr", g["lr"]), {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory, sft_parent, tiny_data, tiny_model_dir):
    """variant -> (DPO RunDir path, Recorder, Groups); each variant trains once, when a test first asks for it."""
    from align.stages.registry import run_stage

    root = tmp_path_factory.mktemp("variants")
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            rec, groups = Recorder(probe_ids(tiny_model_dir)), Groups()
            overrides = tiny_overrides(None, tiny_data["prefs"], root / name, parent_run=str(sft_parent), tracking="none",
                                       **{"lora.r": LORA_R, "samples.num_prompts": 1, **VARIANTS[name]})
            run = run_stage(load_config(DPOConfig, None, overrides), callbacks=[rec, groups])
            assert run.is_finished()
            done[name] = (run.path, rec, groups)
        return done[name]

    return get


def summary(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["summary"]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal within `rel` of the logits' scale."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


def base_model(sft_parent: Path, quantized: bool):
    """The DPO runs' base as training loaded it: the SFT run's merged model (in 4 bits for QLoRA)."""
    if not quantized:
        return load_causal_lm(sft_parent / "merged")
    from align.modeling import models

    return models.load_model(models.resolve(str(sft_parent / "merged")), ModelConfig(quantization="4bit"), device="cpu").eval()


def expected_trainable(adapter_dir: Path, base) -> int:
    """PEFT's count for the adapter's config: r (or its rank_pattern entry) * (d_in + d_out) per targeted linear."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig.from_pretrained(str(adapter_dir))
    facts = adapter_dir / "align_adapter.json"
    trained_r = json.loads(facts.read_text()).get("trained_rank") if facts.is_file() else None
    total = 0
    for name, module in base.named_modules():
        if name.endswith("lm_head") or not hasattr(module, "in_features"):
            continue
        if config.target_modules != "all-linear" and not check_target_module_exists(config, name):
            continue
        r = trained_r or config.rank_pattern.get(name, config.r)
        total += r * (module.in_features + module.out_features)
    return total


# --------------------------------------------------------------------------- per variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trains_the_adapter_peft_defines_and_keeps_the_base(variant_runs, sft_parent, variant):
    path, rec, _ = variant_runs(variant)
    assert rec.trainable and all(".lora_A." in n or ".lora_B." in n for n in rec.trainable), sorted(rec.trainable)[:4]
    expected = expected_trainable(path / "adapter", base_model(sft_parent, variant == "loftq"))
    assert sum(rec.before[n].numel() for n in rec.trainable) == expected
    assert summary(path)["parameters"]["trainable"] == expected
    unchanged = [n for n in rec.trainable if torch.equal(rec.before[n], rec.after[n])]
    assert unchanged == [], unchanged[:4]
    moved = [n for n in rec.before if n not in rec.trainable and not torch.equal(rec.before[n], rec.after[n])]
    assert moved == [], moved[:4]
    if variant == "eva":
        config = json.loads((path / "adapter" / "adapter_config.json").read_text())
        assert config["init_lora_weights"] == "eva" and config["rank_pattern"], "EVA redistributes the ranks"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dpo_starts_at_its_reference_with_every_init(variant_runs, variant):
    s = summary(variant_runs(variant)[0])
    assert s["eval_loss_before"] == pytest.approx(LN2, rel=1e-6)
    scale = abs(s["eval_logps/chosen_before"])
    for key in ("eval_rewards/margins_before", "eval_rewards/chosen_before", "eval_rewards/rejected_before"):
        assert abs(s[key]) <= 1e-7 * scale, (key, s[key])
    assert s["eval_loss_after"] < LN2, "training moved the policy"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_gives_the_trained_policy(variant_runs, sft_parent, tmp_path, variant):
    path, rec, _ = variant_runs(variant)
    out = tmp_path / "merged"
    assert lifecycle.main(["merge", str(path), "--output", str(out)]) == 0
    merged = logits(load_causal_lm(out), rec.probe_ids)
    # QLoRA (loftq) trains its adapter in bf16 on 4-bit matmuls; the merged model is fp32.
    assert_close(merged, rec.logits, rel=2e-3 if variant == "loftq" else 1e-4)
    assert not torch.allclose(merged, logits(base_model(sft_parent, False), rec.probe_ids), rtol=1e-3), "the adapter changed nothing"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_onto_the_original_base_with_plain_peft(variant_runs, sft_parent, tmp_path, variant):
    from peft import PeftModel

    path, rec, _ = variant_runs(variant)
    out = tmp_path / "export"
    assert lifecycle.main(["export", str(path), "--output", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    facts = json.loads((out / "align_adapter.json").read_text()) if (out / "align_adapter.json").is_file() else {}
    if variant in CONVERTED:
        assert config["r"] == 2 * LORA_R and config["init_lora_weights"] is True and facts["trained_rank"] == LORA_R
        assert facts["lora_init"] == VARIANTS[variant]["lora.init"]
        assert "- saved as: a standard LoRA of the unchanged base: PEFT's PiSSA/OLoRA conversion" in (out / "README.md").read_text()
    else:
        assert config["r"] == LORA_R and facts.get("lora_init") == ("loftq" if variant == "loftq" else None)
    loaded = PeftModel.from_pretrained(base_model(sft_parent, variant == "loftq"), str(out)).eval()
    # QLoRA trains its adapter in bf16 (TRL), inputs cast to bf16; plain PEFT loads it in fp32.
    assert_close(logits(loaded, rec.probe_ids), rec.logits, rel=2e-3 if variant == "loftq" else 1e-4)


def test_lora_plus_puts_b_at_plus_ratio_times_the_learning_rate(variant_runs):
    path, rec, groups = variant_runs("plus")
    lr = yaml.safe_load((path / "config.yaml").read_text())["train"]["learning_rate"]
    by_name = {n: rate for rate, names in groups.groups for n in names}
    assert set(by_name) == rec.trainable
    assert all(by_name[n] == pytest.approx(lr * RATIO) for n in rec.trainable if ".lora_B." in n)
    assert all(by_name[n] == pytest.approx(lr) for n in rec.trainable if ".lora_A." in n)
    plain = variant_runs("gaussian")[2]
    assert all(rate == pytest.approx(lr) for rate, names in plain.groups if names), "without plus_ratio: one rate"


def test_param_groups_equal_peft_create_loraplus_optimizer(tiny_model_dir):
    """PEFT's LoRA+ (the reference) and ours split the same parameters at the same rates; DoRA's magnitudes
    (one-dimensional) go with B in both."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from align.modeling.lora_plus import param_groups

    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=LORA_R, target_modules="all-linear", use_dora=True))
    theirs = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.0)
    ours = param_groups(model.named_parameters(), 1e-3, 0.0, 16.0)
    rate = lambda groups: {id(p): g["lr"] for g in groups for p in g["params"]}  # noqa: E731
    assert rate(ours) == rate(theirs.param_groups)
    assert {g["lr"] for g in ours} == {1e-3, 16e-3}


def test_online_optimizer_groups_name_parameters_through_the_model(tiny_model_dir):
    """The online stages' helper: LoRA+ by name, a parameter outside the model (a value head) at the base rate."""
    from align.modeling.adapters import attach_adapter
    from align.modeling.lora_plus import optimizer_groups

    cfg = load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": str(tiny_model_dir), "data.path": "d",
                                        "lora.r": LORA_R, "lora.plus_ratio": 4.0, "train.learning_rate": 1e-3})
    model = attach_adapter(load_causal_lm(tiny_model_dir), cfg, "policy")
    head = torch.nn.Linear(4, 1)
    params = [p for n, p in model.named_parameters() if p.requires_grad] + list(head.parameters())
    rate = {id(p): g["lr"] for g in optimizer_groups(cfg, params, model) for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        b_side = ".lora_B." in names.get(id(p), "") or p.ndim == 1
        assert rate[id(p)] == pytest.approx(4e-3 if b_side else 1e-3), names.get(id(p), "head")
    one = optimizer_groups(load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": "m", "data.path": "d"}), params, model)
    assert len(one) == 1 and one[0]["lr"] == 2e-4, "without plus_ratio: one group, as before"


# --------------------------------------------------------------------------- the starts are PEFT's


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_start_is_peft_own_and_training_equals_peft_residual_model(tiny_model_dir, init):
    """PEFT's PiSSA/OLoRA (the reference) moves s*B0A0 out of the base; align keeps the base and subtracts the
    start. Same factors, the same model at the start and after the same update of the factors."""
    from peft import LoraConfig, get_peft_model

    from align.modeling.adapters import attach_adapter

    ids = probe_ids(tiny_model_dir)
    base = load_causal_lm(tiny_model_dir)
    native = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=LORA_R, lora_alpha=8, target_modules="all-linear",
                                                                       init_lora_weights=init, lora_dropout=0.0)).eval()
    cfg = load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": str(tiny_model_dir), "data.path": "d",
                                        "lora.r": LORA_R, "lora.alpha": 8, "lora.dropout": 0.0, "lora.init": init})
    ours = attach_adapter(load_causal_lm(tiny_model_dir), cfg, "default").eval()
    factors = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    for name, param in native.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(factors[name], param, rtol=1e-5, atol=1e-6)
    kept = dict(base.named_parameters())
    for name, param in ours.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, kept[name.replace(".base_layer", "")]), f"the base changed: {name}"
    assert torch.equal(logits(ours, ids), logits(base, ids)), "the start is exactly the base model"
    assert_close(logits(native, ids), logits(base, ids))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (native, ours):
            generator.manual_seed(0)
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    assert_close(logits(ours, ids), logits(native, ids))
    with ours.disable_adapter():
        assert torch.equal(logits(ours, ids), logits(base, ids)), "adapters disabled: the base"


def test_loftq_starts_nearer_the_full_precision_model_and_disabled_is_that_start(tiny_model_dir):
    from align.modeling import models
    from align.modeling.adapters import attach_adapter

    ids = probe_ids(tiny_model_dir)
    full = logits(load_causal_lm(tiny_model_dir), ids)
    quantized = lambda: models.load_model(models.resolve(str(tiny_model_dir)), ModelConfig(quantization="4bit"), device="cpu").eval()  # noqa: E731
    plain = logits(quantized(), ids)
    cfg = load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": str(tiny_model_dir), "data.path": "d",
                                        "peft.method": "qlora", "lora.r": 16, "lora.init": "loftq"})
    model = attach_adapter(quantized(), cfg, "default").eval()
    start = logits(model, ids)
    assert (start - full).norm() < 0.9 * (plain - full).norm(), "the start corrects part of the quantization error"
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), start), "the reference is the model training starts from"


@pytest.mark.gpu
def test_loftq_factors_equal_peft_replace_lora_weights_loftq_on_cuda(tiny_model_dir):
    """PEFT's LoftQ runs on CUDA only; with alpha == r (PEFT does not divide by the scaling) ours equals it."""
    from peft import LoraConfig, get_peft_model, replace_lora_weights_loftq

    from align.modeling import models
    from align.modeling.adapters import attach_adapter

    load = lambda: models.load_model(models.resolve(str(tiny_model_dir)), ModelConfig(quantization="4bit"), device="cuda")  # noqa: E731
    theirs = get_peft_model(load(), LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules="all-linear"))
    replace_lora_weights_loftq(theirs, model_path=str(tiny_model_dir))
    cfg = load_config(SFTConfig, None, {"output_dir": "o", "model.name_or_path": str(tiny_model_dir), "data.path": "d",
                                        "peft.method": "qlora", "lora.r": LORA_R, "lora.alpha": LORA_R, "lora.init": "loftq"})
    ours = dict(attach_adapter(load(), cfg, "default").named_parameters())
    for name, param in theirs.named_parameters():
        if "lora_" in name:  # singular vectors are defined up to sign: compare the products per layer
            other = name.replace("lora_A", "lora_B") if "lora_A" in name else None
            if other:
                torch.testing.assert_close(ours[other] @ ours[name], dict(theirs.named_parameters())[other] @ param, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- an online stage


def test_grpo_trains_pissa_with_lora_plus_from_its_reference(tmp_path, sft_parent, tiny_data):
    from align.stages.registry import run_stage
    from align.stages.grpo import GRPOConfig

    out = tmp_path / "grpo"
    overrides = tiny_overrides(None, tiny_data["prefs"], out, parent_run=str(sft_parent), tracking="none", rewards=[{"judge": "length"}], **{
        "train.max_steps": 2, "train.batch_size": 4, "grpo.prompts_per_step": 2, "grpo.group_size": 4, "grpo.max_new_tokens": 6,
        "grpo.eval_prompts": 3, "samples.num_prompts": 1, "lora.r": LORA_R, "lora.init": "pissa", "lora.plus_ratio": RATIO,
    })
    run = run_stage(load_config(GRPOConfig, None, overrides))
    assert run.is_finished()
    first = next(row for row in read_metrics(out) if "eval/kl" in row)
    assert first["_step"] == 0 and first["eval/kl"] == 0.0, "the reference is the policy training started from"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * LORA_R and json.loads((out / "adapter" / "align_adapter.json").read_text())["lora_init"] == "pissa"


def test_reward_model_with_pissa_saves_its_score_head_beside_the_converted_adapter(tmp_path, sft_parent, tiny_data, tiny_model_dir):
    """PEFT's conversion keeps only the LoRA factors; the reward head (modules_to_save) is carried over, so plain
    PEFT on the original base scores as the trained reward model did."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification


    from align.stages.registry import run_stage
    from align.stages.reward import RewardConfig

    rec = Recorder(probe_ids(tiny_model_dir))
    out = tmp_path / "reward"
    overrides = tiny_overrides(None, tiny_data["prefs"], out, parent_run=str(sft_parent), tracking="none",
                               **{"lora.r": LORA_R, "lora.init": "pissa", "reward.stats_samples": 8, "samples.num_prompts": 0})
    assert run_stage(load_config(RewardConfig, None, overrides), callbacks=[rec]).is_finished()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2 * LORA_R
    base = AutoModelForSequenceClassification.from_pretrained(sft_parent / "merged", num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = base.config.eos_token_id
    loaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert_close(logits(loaded, rec.probe_ids), rec.logits)


def test_online_dpo_trains_olora_with_lora_plus_from_its_reference(tmp_path, online_runs, tiny_data):
    from align.stages.registry import run_stage
    from align.stages.online_dpo import OnlineDPOConfig

    out = tmp_path / "online"
    rewards = [{"judge": "online_scorers:chars", "weight": 0.1}]  # the test_online fixture's scorer module
    overrides = tiny_overrides(None, tiny_data["prefs"], out, parent_run=str(online_runs["sft"]), tracking="none", rewards=rewards, **{
        "online.rounds": 1, "online.prompts_per_round": 4, "online.num_samples": 3, "online.max_new_tokens": 6, "online.eval_prompts": 3,
        "train.batch_size": 2, "lora.dropout": 0.0, "samples.num_prompts": 1, "lora.r": LORA_R, "lora.init": "olora", "lora.plus_ratio": RATIO,
    })
    assert run_stage(load_config(OnlineDPOConfig, None, overrides)).is_finished()
    rows = read_metrics(out)
    assert rows[0]["_step"] == 0 and rows[0]["eval/kl"] == 0.0
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(LN2, rel=1e-6), "round 1 starts at its reference"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2 * LORA_R


def test_ppo_policy_and_value_start_at_the_reference_with_lora_plus_groups(online_runs, tiny_data):
    """PPO's two trained adapters (policy, value) both start from PiSSA on the kept base; the policy is its reference."""
    from align.core.artifacts import RunDir
    from align.modeling import models
    from align.modeling.lora_init import StartOffset
    from align.modeling.train_setup import optimizer_and_schedule
    from align.rlhf.ppo import optimizer_updates
    from align.rlhf.ppo_model import PolicyValueReward
    from align.stages.stage_run import resolve_base
    from align.stages.ppo import PPOConfig

    overrides = tiny_overrides(None, tiny_data["prefs"], online_runs["root"] / "ppo", parent_run=str(online_runs["sft"]),
                               reward_run=str(online_runs["reward"]), tracking="none", **{
                                   "train.max_steps": 2, "ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2, "lora.r": LORA_R,
                                   "lora.init": "pissa", "lora.plus_ratio": RATIO})
    cfg = load_config(PPOConfig, None, overrides)
    base, _ = resolve_base(cfg)
    pvr = PolicyValueReward(cfg, base, RunDir(cfg.reward_run), models.load_tokenizer(base, cfg.model))
    layers = [m for m in pvr.model.modules() if hasattr(m, "lora_variant")]
    assert all(isinstance(m.lora_variant.get(a), StartOffset) for m in layers for a in ("policy", "value"))
    ids = probe_ids(Path(base.location))
    pvr.use("policy")
    pvr.model.eval()  # LoRA dropout acts on the adapter's whole input, the start included (PiSSA's formulation)
    policy = logits(pvr.model, ids)
    with pvr.model.disable_adapter():
        assert torch.equal(logits(pvr.model, ids), policy)
    optimizer, _ = optimizer_and_schedule(cfg, pvr.trainable_parameters(), pvr.model, optimizer_updates(cfg))
    names = {id(p): n for n, p in pvr.model.named_parameters()}
    lr = cfg.train.learning_rate
    for group in optimizer.param_groups:
        for p in group["params"]:
            b_side = ".lora_B." in names.get(id(p), "") or p.ndim == 1  # the value head's bias is 1-D: PEFT's rule
            assert group["lr"] == pytest.approx(lr * RATIO if b_side else lr), names.get(id(p), "value head")


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def fresh_log(monkeypatch):
    """align's log handler writes to this test's stderr (recipe_main adds one bound to the stderr it finds)."""
    import logging

    monkeypatch.setattr(logging.getLogger("align"), "handlers", [])


def write_config(path: Path, overrides: dict) -> Path:
    data: dict = {}
    apply_overrides(data, overrides)
    path.write_text(yaml.safe_dump(data))
    return path


REFUSED = [
    ("sft", {"peft.method": "dora", "lora.init": "pissa"}, "lora.init: pissa does not combine with peft.method dora"),
    ("dpo", {"peft.method": "dora", "lora.init": "olora"}, "lora.init: olora does not combine with peft.method dora"),
    ("sft", {"peft.method": "dora", "lora.init": "loftq"}, "lora.init: loftq does not combine with peft.method dora"),
    ("sft", {"lora.init": "loftq"}, "lora.init: loftq with a none base"),
    ("dpo", {"lora.init": "loftq", "model.quantization": "8bit"}, "lora.init: loftq with a 8bit base"),
    ("sft", {"peft.method": "qlora", "lora.init": "pissa"}, "lora.init: pissa with a 4bit base"),
    ("reward", {"peft.method": "qlora", "lora.init": "pissa_niter_4"}, "lora.init: pissa_niter_4 with a 4bit base"),
    ("sft", {"peft.method": "vera", "lora.init": "pissa"}, "lora.init: applies to LoRA adapters"),
    ("dpo", {"peft.method": "ia3", "lora.rslora": True}, "lora.rslora: applies to LoRA adapters"),
    ("sft", {"peft.method": "full", "lora.plus_ratio": 16}, "lora.plus_ratio: applies to LoRA adapters"),
    ("sft", {"lora.init": "pisa"}, "lora.init: must be one of default, gaussian, eva, pissa, pissa_niter_<n> (n >= 1), olora, loftq, got 'pisa' (did you mean 'pissa'?)"),
    ("dpo", {"lora.init": "pissa_niter_0"}, "lora.init: must be one of"),
    ("sft", {"lora.plus_ratio": 0.5}, "lora.plus_ratio: must be at least 1, got 0.5"),
]


@pytest.mark.parametrize("stage, overrides, message", REFUSED, ids=[f"{s}:{','.join(f'{k}={v}' for k, v in o.items())}" for s, o, _ in REFUSED])
def test_refused_combinations_exit_2_naming_the_key(stage, overrides, message, tmp_path, capsys, monkeypatch, fresh_log):
    from align.cli.recipes import recipe_main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    parent = {"model.name_or_path": "smollm2-135m-instruct"} if stage == "sft" else {"parent_run": str(tmp_path / "none")}
    config = write_config(tmp_path / "c.yaml", {"output_dir": str(out), "data.path": "bundled:demo-prefs", **parent, **overrides})
    capsys.readouterr()
    assert recipe_main(stage, ["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err[-1500:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def _run_refused(stage: str, overrides: dict, tmp_path: Path, capsys) -> str:
    from align.cli.recipes import recipe_main

    config = write_config(tmp_path / f"{stage}.yaml", overrides)
    capsys.readouterr()
    assert recipe_main(stage, ["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not Path(overrides["output_dir"]).exists(), err[-1500:]
    return err


def test_eva_in_an_online_stage_is_refused_before_anything_is_written(tmp_path, sft_parent, tiny_data, capsys, fresh_log):
    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / "grpo", parent_run=str(sft_parent), tracking="none",
                               rewards=[{"judge": "length"}], **{"lora.init": "eva", "grpo.prompts_per_step": 2, "grpo.group_size": 4})
    err = _run_refused("grpo", overrides, tmp_path, capsys)
    assert "lora.init: eva starts A from the activations of the training rows, and this stage's rows are prompts alone" in err


def test_eva_without_enough_tokens_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys, fresh_log):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "tiny.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}] * 2)
    overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "sft", tracking="none", **{"lora.init": "eva", "lora.r": 64, "data.eval_fraction": 0.0})
    err = _run_refused("sft", overrides, tmp_path, capsys)
    assert "lora.init: eva needs training rows with responses of at least 128 tokens" in err


def test_loftq_on_a_base_without_safetensors_is_refused(tmp_path, tiny_model_dir, tiny_data, capsys, fresh_log):
    import shutil

    base = tmp_path / "no-safetensors"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("*.safetensors"))
    overrides = tiny_overrides(base, tiny_data["sft"], tmp_path / "sft", tracking="none", **{"peft.method": "qlora", "lora.init": "loftq"})
    err = _run_refused("sft", overrides, tmp_path, capsys)
    assert "lora.init: loftq reads the full-precision weights from the base's safetensors files" in err


def test_combine_refuses_inits_it_cannot_combine(variant_runs, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model

    (pissa, pissa_rec, _), loftq, plain = variant_runs("pissa"), variant_runs("loftq")[0], variant_runs("gaussian")[0]
    base_location = json.loads((plain / "manifest.json").read_text())["base_model"]["location"]
    raw = tmp_path / "peft-pissa"  # PEFT's own PiSSA format: meant for the residual base PEFT makes
    get_peft_model(load_causal_lm(base_location), LoraConfig(r=LORA_R, target_modules="all-linear", init_lora_weights="pissa")).save_pretrained(raw)
    cases = [
        (["--type", "linear", str(pissa), str(plain)], "--type linear cannot combine"),
        (["--type", "cat", str(loftq), str(plain)], "was trained with lora.init loftq"),
        (["--type", "svd", str(raw), str(plain)], "is a PEFT pissa adapter (adapter_config.json init_lora_weights)"),
    ]
    for args, message in cases:
        out = tmp_path / "combined"
        capsys.readouterr()
        assert lifecycle.main(["combine", *args, "--weights", "0.5", "0.5", "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    out = tmp_path / "cat"  # cat sums the updates exactly: weights (1, 0) give the PiSSA run's policy
    assert lifecycle.main(["combine", "--type", "cat", str(pissa), str(plain), "--weights", "1", "0", "--output", str(out)]) == 0
    combined = PeftModel.from_pretrained(load_causal_lm(base_location), str(out)).eval()
    assert_close(logits(combined, pissa_rec.probe_ids), pissa_rec.logits)
