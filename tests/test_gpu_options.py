"""Training options for GPUs, checked on the CPU: gradient checkpointing chosen by memory, Liger's wiring."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from align.core import memory
from align.core.config_loader import load_config
from align.core.errors import ConfigError
from align.modeling.train_setup import gradient_checkpointing, liger_problem
from align.stages.dpo import DPOConfig
from align.stages.sft import SFTConfig
from conftest import tiny_overrides

GIB = 2**30
# The first GPU run's 1B shape (recipes/bench_dpo.py SHAPES["llama-1b"]), bf16.
ONE_B = memory.Shape(layers=16, hidden=2048, intermediate=8192, kv_dim=512, vocab=128256, bytes_per_value=2)


def test_shape_is_read_from_a_llama_config():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    assert memory.Shape.of(config, 2) == ONE_B


def test_checkpointing_turns_on_only_when_the_activations_do_not_fit():
    tokens = 8 * 2 * 1800  # batch 8 pairs, two rows each, max_length 1800
    roomy = memory.decide(ONE_B, tokens, free_bytes=78 * GIB)
    assert not roomy.on and "fits in 85% of the 78.0 GiB free" in roomy.describe()
    tight = memory.decide(ONE_B, tokens, free_bytes=24 * GIB)
    assert tight.on and "over 85% of the 24.0 GiB free" in tight.describe() and "even that" not in tight.reason
    assert tight.with_bytes < tight.without_bytes / 3, "checkpointing keeps only each layer's input"
    hopeless = memory.decide(ONE_B, tokens, free_bytes=2 * GIB)
    assert hopeless.on and "lower train.batch_size or train.max_length" in hopeless.reason
    unknown = memory.decide(ONE_B, tokens, free_bytes=None)
    assert not unknown.on and "free memory unknown" in unknown.reason
    # The decision names its numbers: the estimate, the token bound and the model's depth and width.
    assert f"{tokens} tokens per micro-batch" in roomy.reason and "16 layers, hidden 2048" in roomy.reason


def test_the_decision_is_monotonic_in_the_micro_batch():
    """More tokens never turn checkpointing off; more free memory never turns it on."""
    free = 40 * GIB
    decisions = [memory.decide(ONE_B, 1800 * 2 * batch, free).on for batch in (1, 2, 4, 8, 16, 32, 64)]
    assert decisions == sorted(decisions) and decisions[0] is False and decisions[-1] is True
    ons = [memory.decide(ONE_B, 1800 * 2 * 16, g * GIB).on for g in (8, 16, 32, 64, 128, 256)]
    assert ons == sorted(ons, reverse=True)


def test_the_estimate_counts_activations_per_layer_and_the_head_tile():
    one_layer = memory.Shape(layers=1, hidden=10, intermediate=30, kv_dim=4, vocab=100, bytes_per_value=2)
    two_layers = memory.Shape(layers=2, hidden=10, intermediate=30, kv_dim=4, vocab=100, bytes_per_value=2)
    head = 7 * 100 * 4 * 2  # float32 tile of tokens x vocabulary, and its gradient
    per_layer = (6 * 10 + 2 * 4 + 3 * 30) * 2
    assert memory.activation_bytes(one_layer, 7, False) == 7 * per_layer + head
    assert memory.activation_bytes(two_layers, 7, False) == 2 * 7 * per_layer + head
    assert memory.activation_bytes(two_layers, 7, True) == 7 * (2 * 10 * 2 + per_layer) + head
    wide_vocab = memory.Shape(1, 10, 30, 4, 10**6, 2)
    assert memory.activation_bytes(wide_vocab, 7, False) - 7 * per_layer == 7 * memory.HEAD_TILE * 8, "one tile, not the vocabulary"


def test_auto_decides_from_the_loaded_model_and_logs_it(tiny_model_dir, tmp_path, caplog):
    from align.modeling.models import load_model, resolve

    cfg = load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "o"))
    assert cfg.train.gradient_checkpointing == "auto", "the default"
    model = load_model(resolve(str(tiny_model_dir)), cfg.model, "cpu")
    with caplog.at_level(logging.INFO, logger="align"):
        assert gradient_checkpointing(cfg, model, "cpu", rows_per_example=1) is False
    assert "gradient checkpointing auto -> off" in caplog.text and "tokens per micro-batch" in caplog.text
    cfg.train.gradient_checkpointing = True
    assert gradient_checkpointing(cfg, model, "cpu", rows_per_example=1) is True
    cfg.train.gradient_checkpointing = "auto"
    cfg.peft.method = "prefix_tuning"  # its prefix lives in the cache, which a recomputed forward appends twice
    assert gradient_checkpointing(cfg, None, "cpu", rows_per_example=1) is False


def test_gradient_checkpointing_accepts_true_false_auto_only(tmp_path):
    base = tiny_overrides(tmp_path, tmp_path / "d.jsonl", tmp_path / "o")
    for value in (True, False, "auto"):
        assert load_config(SFTConfig, None, {**base, "train.gradient_checkpointing": value}).train.gradient_checkpointing == value
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: expected true/false or one of 'auto'"):
        load_config(SFTConfig, None, {**base, "train.gradient_checkpointing": "sometimes"})


def test_liger_needs_the_package_and_a_cuda_device():
    assert liger_problem("cuda:0", installed=True) is None
    assert "pip install 'align[gpu]'" in liger_problem("cuda:0", installed=False)
    assert "Triton GPU kernels" in liger_problem("cpu", installed=True)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_the_package_is_a_config_error_before_anything_runs(tiny_model_dir, tiny_data, tmp_path):
    from align.stages.registry import load_stage_config

    for stage, data, extra in (("sft", tiny_data["sft"], {}), ("dpo", tiny_data["prefs"], {})):
        overrides = tiny_overrides(tiny_model_dir, data, tmp_path / stage, **{"train.liger_kernel": True, **extra})
        with pytest.raises(ConfigError, match=r"train.liger_kernel: the liger-kernel package is not installed \(pip install 'align\[gpu\]'"):
            load_stage_config(stage, None, overrides)
        assert not (tmp_path / stage).exists()


def test_ppo_refuses_liger(tmp_path):
    from align.stages.ppo import PPOConfig

    overrides = {"output_dir": str(tmp_path / "o"), "data.path": "d", "parent_run": "p", "reward_run": "r",
                 "train.max_steps": 1, "train.liger_kernel": True}
    with pytest.raises(ConfigError, match="train.liger_kernel: applies to the TRL trainers"):
        load_config(PPOConfig, None, overrides)


def test_trainer_arguments_carry_the_decisions(tiny_model_dir, tiny_data, tmp_path):
    """What reaches TRL: use_liger_kernel from train.liger_kernel, gradient_checkpointing as decided."""
    from trl import DPOConfig as TRLDPOConfig

    from align.core.artifacts import RunDir
    from align.modeling.models import load_model, resolve
    from align.modeling.train_setup import trainer_kwargs

    cfg = load_config(DPOConfig, None, tiny_overrides(tiny_model_dir, tiny_data["prefs"], tmp_path / "o"))
    model = load_model(resolve(str(tiny_model_dir)), cfg.model, "cpu")
    args = TRLDPOConfig(**trainer_kwargs(cfg, RunDir(tmp_path / "o"), "cpu", has_eval=False, model=model, rows_per_example=2))
    assert args.use_liger_kernel is False and args.gradient_checkpointing is False
    cfg.train.liger_kernel = True
    with pytest.raises(ConfigError, match="train.liger_kernel: "):
        trainer_kwargs(cfg, RunDir(tmp_path / "o"), "cpu", has_eval=False, model=model, rows_per_example=2)
