"""The DPO fast path (prefix sharing + reference cache) against TRL's plain path, on a tiny model.

Same model, adapter initialization, batch and loss: the loss, the chosen/rejected rewards and
every adapter gradient must agree (fp32, CPU). The cache must hit on a rerun and miss when
the base model, the data or the tokenization changes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from align.preference import shared_prefix
from align.preference.dpo_trainer import AlignDPOTrainer, FastPath
from align.preference.ref_cache import RefLogpCache

BATCH = 4


def variable_rows(n: int, offset: int = 0) -> list[dict]:
    """Pairs with prompts and responses of different lengths, chosen and rejected unequal."""
    rows = []
    for i in range(offset, offset + n):
        context = " ".join(["Think step by step."] * (i % 4))
        rows.append({
            "prompt": [{"role": "user", "content": f"{context} What is {i} plus {i % 5}?".strip()}],
            "chosen": [{"role": "assistant", "content": f"{i + i % 5}" + "!" * (i % 3)}],
            "rejected": [{"role": "assistant", "content": " ".join(["Well, let me see."] * (1 + i % 3))}],
        })
    return rows


def load_tiny(model_dir, attn: str = "eager", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)


def make_trainer(model, tokenizer, rows, tmp_path, *, fast: FastPath | None, cache=None, max_length=96, ref_model=None,
                 cuda=False, eval_rows=None, **extra):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**{
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": BATCH, "max_length": max_length,
        "gradient_checkpointing": False, "bf16": cuda, "use_cpu": not cuda, "report_to": [], "learning_rate": 1e-3,
        "beta": 0.1, "dataset_num_proc": None, "seed": 0, "per_device_eval_batch_size": 8, **extra,
    })
    peft = None if ref_model is not None else LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    kwargs = dict(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                  eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                  processing_class=tokenizer, peft_config=peft)
    torch.manual_seed(0)
    if fast is None:
        return DPOTrainer(**kwargs)
    return AlignDPOTrainer(**kwargs, fast_path=fast, cache=cache)


def perturb(*trainers):
    """The same noise on every trainer's adapters, so the policy moves off the reference (rewards not trivially 0)."""
    params = [{n: p for n, p in t.model.named_parameters() if p.requires_grad} for t in trainers]
    assert all(q.keys() == params[0].keys() for q in params)
    assert all(torch.equal(q[n], params[0][n]) for q in params for n in q), "same adapter initialization"
    with torch.no_grad():
        for name, p in params[0].items():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05
            for q in params:
                q[name].add_(noise.to(q[name].device, q[name].dtype))


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def step(trainer, batch=None):
    """Loss, rewards and adapter gradients of one forward/backward on the first batch."""
    model = trainer.model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch if batch is not None else first_batch(trainer))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_packed_rows_hold_each_sequence_once_with_its_positions(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]},
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    packed = shared_prefix.pack_pairs(batch, pad_token_id=0)
    # Pair 0: shared [1, 2], then [3, 4, 5] (chosen) and [3, 6] (rejected), positions restarting at 2.
    assert packed["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 3, 6]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert packed["shift_labels"][0].tolist() == [-100, -100, 4, 5, -100, 6, -100]
    # Pair 1: shared [7], [8, 9] and [8, 10, 11, 12], one pad.
    assert packed["input_ids"][1].tolist() == [7, 8, 9, 8, 10, 11, 12]
    assert packed["shift_labels"][1].tolist() == [-100, 9, -100, 10, 11, 12, -100]
    # TRL's valid log-prob positions are exactly its completion labels.
    assert torch.equal(packed["valid"], batch["completion_mask"][:, 1:].bool())
    mask = shared_prefix.block_mask(packed["segment_ids"], packed["pair_ids"], "sdpa", torch.float32)[0, 0]
    assert not mask[5, 3] and not mask[6, 4], "rejected tokens must not see chosen tokens"
    assert mask[5, 1] and mask[6, 5], "rejected tokens see the shared prompt and themselves"

    # Padding-free: both pairs in one row, no padding, positions restarting at 0 for the second pair.
    free = shared_prefix.pack_pairs(batch, pad_token_id=0, padding_free=True)
    assert free["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 8, 10, 11, 12]]
    assert free["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3, 4]]
    assert free["pair_ids"].tolist() == [[0] * 7 + [1] * 7]
    assert torch.equal(free["valid"], packed["valid"])
    # The same scored positions, in the same order: the LM head's inputs line up with TRL's layout alike.
    assert torch.equal(free["shift_labels"][free["shift_labels"] != -100], packed["shift_labels"][packed["shift_labels"] != -100])
    assert torch.equal(free["index"], packed["index"])
    dense = shared_prefix.block_mask(free["segment_ids"], free["pair_ids"], "sdpa", torch.float32)[0, 0]
    assert not dense[7:, :7].any() and not dense[:7, 7:].any(), "pairs never see each other"
    assert torch.equal(dense[:7, :7], mask) and torch.equal(dense[7:, 7:], shared_prefix.block_mask(
        packed["segment_ids"], packed["pair_ids"], "sdpa", torch.float32)[1, 0]), "within a pair, the one-row-per-pair mask"


@pytest.mark.parametrize("attn, padding_free", [("eager", False), ("sdpa", False), ("sdpa", True)],
                         ids=["eager", "sdpa", "sdpa-padding-free"])
def test_fast_path_matches_plain_trl(tiny_model_dir, tokenizer, tmp_path, attn, padding_free):
    rows = variable_rows(8)
    base = load_tiny(tiny_model_dir, attn)
    plain = make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / "plain", fast=None, max_length=60)
    cache = RefLogpCache(tmp_path / "cache", {"base": "tiny"})
    fast = make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / "fast",
                        fast=FastPath(True, True, {}, padding_free=padding_free), cache=cache, max_length=60)
    perturb(plain, fast)
    batch = first_batch(plain)
    assert batch["input_ids"].shape[1] == 60, "some rows are truncated at max_length"
    loss_a, metrics_a, grads_a = step(plain, batch)
    loss_c, metrics_c, grads_c = step(fast)
    assert cache.misses == BATCH and cache.hits == 0
    assert abs(loss_a - loss_c) < 1e-5
    assert metrics_a.keys() == metrics_c.keys() and metrics_a
    for key in metrics_a:
        assert abs(metrics_a[key] - metrics_c[key]) < 1e-4, key
    assert abs(metrics_a["rewards/margins"]) > 1e-3, "the adapters move the policy away from the reference"
    for name in grads_a:
        torch.testing.assert_close(grads_c[name], grads_a[name], atol=1e-5, rtol=1e-4)
    # The same batch again: the reference comes from the cache, the results do not change.
    loss_warm, metrics_warm, grads_warm = step(fast)
    assert cache.hits == BATCH
    assert abs(loss_warm - loss_c) < 1e-6
    for name in grads_c:
        torch.testing.assert_close(grads_warm[name], grads_c[name], atol=1e-6, rtol=1e-5)


def long_batch(n_pairs: int = 6):
    """TRL's collated batch of pairs long enough to span several 128-token attention tiles."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    gen = torch.Generator().manual_seed(0)

    def tokens(n):
        return (torch.randint(3, 1000, (n,), generator=gen)).tolist()

    examples = [
        {"prompt_ids": tokens(150 + 60 * i), "chosen_ids": tokens(20 + 29 * (i % 4)), "rejected_ids": tokens(90 - 13 * i)}
        for i in range(n_pairs)
    ]
    return DataCollatorForPreference(pad_token_id=0)(examples)


def tiles(num, idx, n_q, n_kv):
    """(rows, q tiles, kv tiles) bool: the tiles a BlockMask lists (count + indices per query tile)."""
    out = torch.zeros(num.size(0), n_q, n_kv, dtype=torch.bool)
    for b in range(num.size(0)):
        for i in range(n_q):
            out[b, i, idx[b, 0, i, : num[b, 0, i]]] = True
    return out


@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "padding-free"])
def test_flex_block_mask_stands_for_the_dense_mask(padding_free):
    """The BlockMask's tiles (full: all visible; partial: its mask rule; others: skipped) give the dense mask.

    FlexAttention trusts this classification: a tile wrongly listed as full would let tokens see
    what they must not, a missing tile would hide what they must see.
    """
    packed = shared_prefix.pack_pairs(long_batch(), pad_token_id=0, padding_free=padding_free)
    segments, pairs = packed["segment_ids"], packed["pair_ids"]
    rows, width = segments.shape
    assert width > 3 * 128, "several tiles per row"
    dense = shared_prefix.block_mask(segments, pairs, "sdpa", torch.float32)[:, 0]
    bm = shared_prefix.flex_block_mask(segments, pairs)
    q_tile, kv_tile = bm.BLOCK_SIZE
    n_q, n_kv = -(-width // q_tile), -(-width // kv_tile)
    partial = tiles(bm.kv_num_blocks, bm.kv_indices, n_q, n_kv)
    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n_q, n_kv) if bm.full_kv_num_blocks is not None else partial & False
    assert not (partial & full).any()
    pos = torch.arange(width)
    tq, tk = pos[:, None] // q_tile, pos[None, :] // kv_tile
    for b in range(rows):
        rule = bm.mask_mod(torch.tensor(b), torch.tensor(0), pos[:, None], pos[None, :])
        token_level = full[b][tq, tk] | (partial[b][tq, tk] & rule)
        assert torch.equal(token_level, dense[b]), f"row {b}"
    assert (~(partial | full)).any(), "masked tiles are skipped, not computed"
    assert full.any(), "tiles of a response over its pair's shared prompt run without evaluating the mask"


def test_flex_attention_matches_the_dense_mask_on_cpu(tiny_model_dir, tokenizer, tmp_path):
    """FlexAttention through the trainer: evaluate() switches the rows to it and back, with TRL's numbers.

    On the CPU FlexAttention has a forward pass only (no backward), so this compares evaluation
    (loss, rewards, log-probs); the gradients are compared on CUDA (gpu test below).
    """
    rows = variable_rows(8)
    base = load_tiny(tiny_model_dir, "eager")
    plain = make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / "plain", fast=None, max_length=60, eval_rows=rows)
    fasts = [
        make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / f"flex-{pf}", max_length=60, eval_rows=rows,
                     fast=FastPath(True, False, {}, attention="flex_attention", padding_free=pf))
        for pf in (False, True)
    ]
    perturb(plain, *fasts)
    seen = []
    for fast in fasts:
        policy = fast.model.get_base_model()
        forward = policy.forward

        def spy(*args, _forward=forward, _policy=policy, **kwargs):
            seen.append(_policy.config._attn_implementation)
            return _forward(*args, **kwargs)

        policy.forward = spy
    expected = plain.evaluate()
    assert abs(expected["eval_rewards/margins"]) > 1e-3, "the adapters move the policy away from the reference"
    for fast in fasts:
        got = fast.evaluate()
        assert fast.model.get_base_model().config._attn_implementation == "eager", "the model's own attention afterwards"
        for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (fast.fast_path.padding_free, key)
    assert seen and set(seen) == {"flex_attention"}, "the shared-prefix rows ran under FlexAttention"


def test_training_switches_to_the_planned_attention_and_back(tiny_model_dir, tokenizer, tmp_path):
    """train() runs the rows under the plan's attention (here sdpa on an eager-loaded model), then hands
    the model back with its own attention, also when training fails."""
    model = load_tiny(tiny_model_dir, "eager")
    trainer = make_trainer(model, tokenizer, variable_rows(BATCH), tmp_path, max_length=60, max_steps=2,
                           fast=FastPath(True, False, {}, attention="sdpa"))
    policy = trainer.model.get_base_model()
    forward, seen = policy.forward, []

    def spy(*args, **kwargs):
        seen.append(policy.config._attn_implementation)
        if len(seen) > 2:
            raise KeyboardInterrupt  # a Ctrl-C in the third forward
        return forward(*args, **kwargs)

    policy.forward = spy
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert seen == ["sdpa"] * 3 and policy.config._attn_implementation == "eager"


def test_full_fine_tuning_reference_copy_takes_the_shared_prefix(tiny_model_dir, tokenizer, tmp_path):
    rows = variable_rows(4)
    base = load_tiny(tiny_model_dir)
    plain = make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / "p", fast=None,
                         ref_model=copy.deepcopy(base).requires_grad_(False))
    fast = make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / "f", fast=FastPath(True, False, {}),
                        ref_model=copy.deepcopy(base).requires_grad_(False))
    loss_a, metrics_a, grads_a = step(plain)
    loss_c, metrics_c, grads_c = step(fast)
    assert abs(loss_a - loss_c) < 1e-5
    assert abs(metrics_a["rewards/chosen"] - metrics_c["rewards/chosen"]) < 1e-4
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(grads_c[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_reference_cache_invalidation(tiny_model_dir, tokenizer, tmp_path):
    """A rerun hits; another base, changed data or changed tokenization miss."""
    from transformers import LlamaForCausalLM

    def run(model, rows, key, max_length=96):
        cache = RefLogpCache(tmp_path / "cache", key)
        known = set(cache.values)
        trainer = make_trainer(model, tokenizer, rows, tmp_path / "run", fast=FastPath(True, True, {}),
                               cache=cache, max_length=max_length)
        batch = first_batch(trainer)
        trainer.model.eval()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
        cache.flush()
        cache.new = set(cache.values) - known
        return cache

    rows = variable_rows(BATCH)
    first = run(load_tiny(tiny_model_dir), rows, {"base": "tiny-a"})
    assert (first.hits, first.misses) == (0, BATCH)
    assert list((tmp_path / "cache").glob("*.rank0.npz")), "flushed to disk"
    again = run(load_tiny(tiny_model_dir), rows, {"base": "tiny-a"})
    assert (again.hits, again.misses) == (BATCH, 0), "a rerun reads the reference from disk"
    assert again.values == first.values

    other = LlamaForCausalLM(load_tiny(tiny_model_dir).config)  # other weights, so another content hash
    assert (run(other, rows, {"base": "tiny-b"}).misses) == BATCH

    changed = copy.deepcopy(rows)
    changed[2]["chosen"][0]["content"] += " (edited)"
    edited = run(load_tiny(tiny_model_dir), changed, {"base": "tiny-a"})
    assert edited.misses == BATCH and len(edited.new) == 1, "the batch is recomputed; one new pair"
    shorter = run(load_tiny(tiny_model_dir), rows, {"base": "tiny-a"}, max_length=56)
    assert shorter.misses == BATCH and len(shorter.new) == 3, "three pairs exceed 56 tokens: other tokens"
    template = tokenizer.chat_template
    tokenizer.chat_template = template.replace("<|im_start|>", "<|im_start|> ")
    try:
        retemplated = run(load_tiny(tiny_model_dir), rows, {"base": "tiny-a"})
    finally:
        tokenizer.chat_template = template
    assert len(retemplated.new) == BATCH


def test_reference_cache_key_names_the_base_and_precision(tiny_model_dir, tmp_path):
    """The stage keys the cache file by the base model's content hash, quantization, dtype, device and attention kernel."""
    from align.core.config_loader import load_config
    from align.stages.dpo import DPOConfig
    from align.preference.dpo_setup import reference_cache

    cfg = load_config(DPOConfig, None, {"model.name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
                                        "dpo.ref_cache_dir": str(tmp_path / "c"), "data.path": "bundled:demo-prefs"})
    model = load_tiny(tiny_model_dir)
    key = reference_cache(cfg, model, "cpu").key
    assert key["base"].startswith("sha256:") and key["dtype"] == "torch.float32" and key["device"] == "cpu"
    assert key["attention"] == "eager" and reference_cache(cfg, model, "cpu", "flex_attention").name != reference_cache(cfg, model, "cpu").name
    other = tmp_path / "other-model"
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(other)
    model.name_or_path = str(other)
    assert reference_cache(cfg, model, "cpu").key["base"] != key["base"]


def test_plan_falls_back_with_a_reason(tiny_model_dir):
    from align.preference.dpo_options import DPOOptions
    from align.preference.dpo_trainer import plan

    model = load_tiny(tiny_model_dir)
    cpu = plan(DPOOptions(), "lora", model)
    # On the CPU: the model's own attention with a dense mask; FlexAttention and padding-free say why not.
    assert cpu.shared_prefix and cpu.attention == "eager" and not cpu.padding_free
    assert "cpu" in cpu.why_not["flex_attention"] and "flex_attention" in cpu.why_not["padding_free"]
    assert cpu.describe().startswith("DPO fast path: shared_prefix (eager), ref_cache; flex_attention off: ")
    asked_off = plan(DPOOptions(flex_attention=False, padding_free=False), "lora", model)
    assert asked_off.shared_prefix and asked_off.why_not == {}, "what the config turned off needs no reason"
    prompt = plan(DPOOptions(), "prompt_tuning", model)
    assert not prompt.shared_prefix and "virtual tokens" in prompt.why_not["shared_prefix"] and prompt.ref_cache
    model.config._attn_implementation = "flash_attention_2"
    flash = plan(DPOOptions(), "lora", model)
    assert not flash.shared_prefix and "flash_attention_2" in flash.why_not["shared_prefix"]
    assert "no backward pass" in flash.why_not["shared_prefix"], "and why FlexAttention cannot stand in"
    off = plan(DPOOptions(shared_prefix=False, ref_cache=False), "lora", model)
    assert "shared_prefix off: dpo.shared_prefix is false" in off.describe()


def test_dpo_stage_beta_sweep_reuses_the_reference(sft_parent, tiny_data, tmp_path):
    """The stage's defaults take the fast path; a second run with another beta never runs the reference."""
    import json

    from align.core.config_loader import load_config
    from align.stages.dpo import DPOConfig
    from align.stages.registry import run_stage
    from conftest import read_metrics, tiny_overrides

    def run(beta):
        overrides = tiny_overrides(None, tiny_data["prefs"], tmp_path / f"beta-{beta}", parent_run=str(sft_parent), **{
            "dpo.beta": beta, "dpo.ref_cache_dir": str(tmp_path / "cache"), "tracking": "none", "samples.num_prompts": 0,
        })
        path = run_stage(load_config(DPOConfig, None, overrides)).path
        summary = json.loads((path / "manifest.json").read_text())["summary"]
        step0 = next(r for r in read_metrics(path) if r["_step"] == 0 and "eval/loss" in r)
        return summary, step0

    first, first_step0 = run(0.1)
    assert first["dpo_fast_path"].startswith("DPO fast path: shared_prefix (eager), ref_cache;")
    assert first["ref_cache_misses"] > 0
    second, second_step0 = run(0.3)
    assert second["ref_cache_misses"] == 0 and second["ref_cache_hits"] > 0
    # The held-out reference log-probs are the same numbers, now read from disk.
    assert second_step0["eval/logps/chosen"] == pytest.approx(first_step0["eval/logps/chosen"], rel=1e-6)
    assert second_step0["eval/loss"] == pytest.approx(0.6931, abs=1e-3)


# --------------------------------------------------------------------------- CUDA (pytest -m gpu)


def cuda_model(tiny_model_dir, attn="sdpa"):
    """bf16 weights, as the stage loads them on CUDA (FlexAttention, unlike sdpa, does not follow autocast:
    fp32 weights would give it fp32 queries and keys after RoPE next to bf16 values)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return load_tiny(tiny_model_dir, attn, dtype=torch.bfloat16).to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("attention, padding_free", [("sdpa", False), ("flex_attention", False), ("flex_attention", True)],
                         ids=["sdpa-dense", "flex-rows", "flex-padding-free"])
def test_fast_path_matches_plain_trl_on_cuda_bf16(tiny_model_dir, tokenizer, tmp_path, attention, padding_free):
    """The comparison of test_fast_path_matches_plain_trl in bf16 on CUDA, gradients included: bf16-sized tolerances."""
    rows = variable_rows(8)
    base = cuda_model(tiny_model_dir)
    plain = make_trainer(copy.deepcopy(base), tokenizer, rows, tmp_path / "plain", fast=None, max_length=60, cuda=True)
    fast_model = copy.deepcopy(base)
    fast_model.set_attn_implementation(attention)
    fast = make_trainer(fast_model, tokenizer, rows, tmp_path / "fast", max_length=60, cuda=True,
                        fast=FastPath(True, False, {}, attention=attention, padding_free=padding_free))
    perturb(plain, fast)
    loss_a, metrics_a, grads_a = step(plain)
    loss_c, metrics_c, grads_c = step(fast)
    assert abs(loss_a - loss_c) < 1e-2
    assert abs(metrics_a["rewards/margins"]) > 1e-3
    for key in metrics_a:
        assert abs(metrics_a[key] - metrics_c[key]) < 5e-2 * max(1.0, abs(metrics_a[key])), key
    # bf16 kernels sum in different orders: compare each adapter gradient by its relative error norm.
    for name in grads_a:
        a, c = grads_a[name].float(), grads_c[name].float()
        assert a.norm() > 0, name
        assert (c - a).norm() / a.norm() < 5e-2, name


@pytest.mark.gpu
def test_plan_takes_flex_attention_on_cuda_and_training_runs_under_it(tiny_model_dir, tokenizer, tmp_path):
    """On CUDA the plan picks FlexAttention with padding-free rows for an sdpa-loaded model; train() runs
    under it (the loss on a repeated batch falls) and hands the model back with sdpa."""
    from align.preference.dpo_trainer import plan
    from align.preference.dpo_options import DPOOptions

    model = cuda_model(tiny_model_dir, "sdpa")
    fast = plan(DPOOptions(), "lora", model)
    assert (fast.shared_prefix, fast.attention, fast.padding_free) == (True, "flex_attention", True), fast.describe()
    assert "flex_attention off" not in fast.describe()
    # One batch seen four times: the loss on it must fall from ln 2.
    trainer = make_trainer(model, tokenizer, variable_rows(BATCH), tmp_path, fast=fast, max_length=60, cuda=True,
                           max_steps=4, logging_steps=1, learning_rate=5e-3)
    seen = []
    policy = trainer.model.get_base_model()
    forward = policy.forward

    def spy(*args, **kwargs):
        seen.append(policy.config._attn_implementation)
        return forward(*args, **kwargs)

    policy.forward = spy
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert set(seen) == {"flex_attention"} and len(losses) == 4
    assert losses[-1] < losses[0] and all(map(torch.isfinite, torch.tensor(losses)))
    assert policy.config._attn_implementation == "sdpa"
