"""CUDA-only checks (pytest -m gpu; recipes/gpu_check.sh runs them): QLoRA merge on the GPU, Liger.

The fast path's CUDA tests (FlexAttention against TRL, gradients included) are in test_dpo_fast.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LN2, read_metrics, tiny_overrides

from align.core.config import ModelConfig

from align.core.config_loader import load_config
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_qlora_sft_merge_then_dpo_on_cuda(tmp_path, tiny_model_dir, tiny_data):
    """SFT on a 4-bit base; the merge dequantizes on the GPU, adds the adapter and saves full precision; DPO
    re-quantizes it, and its step-0 reference is the merged model (loss ln 2), under the fast path."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from align.modeling.models import load_model, resolve
    from align.stages.registry import run_stage
    from align.stages.stage_run import resolve_base

    common = {"peft.method": "qlora", "train.max_steps": 3, "train.learning_rate": 5e-3, "tracking": "none",
              "samples.num_prompts": 1}
    run_stage(load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "sft", **common)))
    merged_dir, adapter_dir = tmp_path / "sft" / "merged", tmp_path / "sft" / "adapter"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    # Merged weight = the dequantized 4-bit base + (alpha / r) B A, up to bf16 rounding.
    base = load_model(resolve(str(tiny_model_dir)), ModelConfig(quantization="4bit"), "cuda:0")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    base = base.dequantize()
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    merged = load_file(str(merged_dir / "model.safetensors"))
    checked = 0
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a = adapter[f"base_model.model.{layer}.lora_A.weight"].float().cuda()
        b = adapter[f"base_model.model.{layer}.lora_B.weight"].float().cuda()
        delta = lora["lora_alpha"] / lora["r"] * (b @ a)
        weight = base.get_submodule(layer).weight.float()
        assert delta.abs().max() > 1e-3, "the adapter trained"
        torch.testing.assert_close(merged[f"{layer}.weight"].float().cuda(), weight + delta, rtol=1e-2, atol=2e-4)
        checked += 1
    assert checked == 2

    dpo_cfg = load_config(DPOConfig, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "dpo", parent_run=str(tmp_path / "sft"), **common))
    run = run_stage(dpo_cfg)
    first = next(r for r in read_metrics(run.path) if r["_step"] == 1 and "train/loss" in r)
    assert first["train/loss"] == pytest.approx(LN2, abs=1e-3)
    assert first["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-3)
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["dpo_fast_path"].startswith("DPO fast path: shared_prefix (flex_attention, padding-free)")
    base_ref, _ = resolve_base(dpo_cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in load_model(base_ref, dpo_cfg.model).modules()), "re-quantized"


def test_liger_kernel_in_sft_and_dpo_on_cuda(tmp_path, tiny_model_dir, tiny_data):
    """train.liger_kernel reaches TRL, Liger's kernels replace the Llama ones, the numbers stay, and DPO's fast path stays on."""
    pytest.importorskip("liger_kernel")
    script = Path(__file__).with_name("gpu_liger_run.py")
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tiny_data["sft"]), str(tiny_data["prefs"]),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rope"].startswith("liger_kernel"), "Liger's RoPE replaced transformers' in this process"
    sft, dpo = result["sft"], result["dpo"]
    # Held-out loss before training (transformers' kernels) and after (Liger's), the adapter unmoved.
    assert math.isfinite(sft["eval_loss_after"])
    assert sft["eval_loss_after"] == pytest.approx(sft["eval_loss_before"], rel=2e-2)
    assert dpo["eval_loss_after"] == pytest.approx(LN2, abs=1e-2)
    assert dpo["dpo_fast_path"].startswith("DPO fast path: shared_prefix (flex_attention, padding-free), ref_cache")


def test_reference_free_and_group_methods_on_cuda(tmp_path, tiny_model_dir, tiny_data):
    """SimPO's reference-free trainer (shared prefix under a dense mask) and GRPO's sample -> score -> update
    loop run on CUDA in the GPU dtype: finite losses, the shared-prefix layout kept, GRPO's fresh policy at KL 0
    to the reference and its adapter moved."""
    from safetensors.torch import load_file


    from align.stages.registry import run_stage
    from align.stages.grpo import GRPOConfig
    from align.stages.simpo import SimPOConfig

    common = {"train.max_steps": 2, "tracking": "none", "samples.num_prompts": 1}
    run_stage(load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], tmp_path / "sft", **common)))
    parent = str(tmp_path / "sft")

    run = run_stage(load_config(SimPOConfig, None, tiny_overrides(None, tiny_data["prefs"], tmp_path / "simpo", parent_run=parent, **common)))
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["batch_layout"] == "shared prefix"
    assert math.isfinite(summary["eval_loss_after"])

    overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / "grpo", parent_run=parent, **common,
                               rewards=[{"judge": "length", "args": {"max_words": 3}}],
                               **{"train.batch_size": 4, "grpo.prompts_per_step": 2, "grpo.group_size": 4,
                                  "grpo.max_new_tokens": 6, "grpo.eval_prompts": 3})
    run = run_stage(load_config(GRPOConfig, None, overrides))
    step0 = next(r for r in read_metrics(run.path) if r["_step"] == 0 and "eval/kl" in r)
    assert step0["eval/kl"] == 0.0, "the fresh adapter is the reference exactly"
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert math.isfinite(summary["eval_kl_after"])
    weights = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert any(v.float().abs().max() > 0 for k, v in weights.items() if "lora_B" in k), "the policy adapter moved"
