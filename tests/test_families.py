"""Model families: each family's real chat template, architecture and quirks through align's real code.

Per family (align.modeling.families), a tiny random-init model of the family's architecture class
that speaks its real chat template (the SmolLM2 tokenizer taught the template's tokens):
- the template renders the exact known strings, system prompt handling included;
- SFT labels cover exactly the assistant turns;
- LoRA all-linear adapts the attention and MLP projections, never the LM head or embeddings;
- the DPO fast path equals TRL's layout, or falls back with its reason;
- merging equals base + adapter; a QLoRA SFT step, a DPO step, a reward-model step and a PPO step run
  through the real stages.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, write_jsonl

from align.core.config import ModelConfig

from align.core.config_loader import load_config
from align.modeling import families as fam
from align.modeling.families import FAMILIES

NAMES = list(FAMILIES)
SYSTEM, USER, ANSWER = "Be brief.", "Capital of France?", "Paris."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
TWO_TURNS = CHAT + [{"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]

LLAMA_HEADER = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
GEMMA_FOLDED = "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"

# What each family's own template renders for CHAT (after align's system-message fold where the
# template has no usable system role), and for CHAT's prompt with the generation prompt.
RENDERED = {
    "llama3": (
        LLAMA_HEADER.format(date="26 Jul 2024") + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>",
        LLAMA_HEADER.format(date="26 Jul 2024") + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2.5": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nParis.<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "mistral": ("<s>[INST] Be brief.\n\nCapital of France?[/INST] Paris.</s>", "<s>[INST] Be brief.\n\nCapital of France?[/INST]"),
    "gemma2": (GEMMA_FOLDED + "Paris.<end_of_turn>\n", GEMMA_FOLDED),
    "gemma3": (GEMMA_FOLDED + "Paris.<end_of_turn>\n", GEMMA_FOLDED),
    "phi3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n<|endoftext|>",
        "<|system|>\nBe brief.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\n",
    ),
    "smollm2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
    ),
}

# The labelled spans of TWO_TURNS: each assistant turn and the end-of-turn tokens the template puts after it.
SPANS = {
    "llama3": ["Paris.<|eot_id|>", "Rome.<|eot_id|>"],
    "qwen2.5": ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"],
    # Qwen3 renders the empty think block on the final assistant turn only.
    "qwen3": ["Paris.<|im_end|>\n", "<think>\n\n</think>\n\nRome.<|im_end|>\n"],
    "mistral": [" Paris.</s>", " Rome.</s>"],
    "gemma2": ["Paris.<end_of_turn>\n", "Rome.<end_of_turn>\n"],
    "gemma3": ["Paris.<end_of_turn>\n", "Rome.<end_of_turn>\n"],
    "phi3": ["Paris.<|end|>\n", "Rome.<|end|>\n<|endoftext|>"],
    "smollm2": ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"],
}

ATTENTION_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA_TARGETS = {name: ATTENTION_MLP for name in NAMES} | {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}


@pytest.fixture(scope="module")
def base_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, base_tokenizer):
    """family name -> a saved tiny random-init model of that family (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = fam.save_random_model(FAMILIES[name], root / name, base_tokenizer)
        return built[name]

    return get


def load_tokenizer(model_dir: Path):
    """The tokenizer exactly as every stage loads it (align.modeling.models.load_tokenizer)."""
    from align.modeling import models

    return models.load_tokenizer(models.resolve(str(model_dir)), ModelConfig())


def render(tok, messages, gen=False, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)


def labelled_spans(tok, ids, labels) -> list[str]:
    spans, current = [], []
    for t, label in zip(ids, labels):
        if label != -100:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


# --------------------------------------------------------------------------- configs


def test_every_family_and_checkpoint_is_complete():
    for family in FAMILIES.values():
        assert family.checkpoints and family.quirks, family.name
        for c in family.checkpoints:
            assert fam.chat_template(c.template), c.model_id
    assert fam.get_family("qwen3") is FAMILIES["qwen3"]
    with pytest.raises(Exception, match="did you mean 'gemma2'"):
        fam.get_family("gemma-2")
    recipes = {c.recipes for f in FAMILIES.values() for c in f.checkpoints if c.recipes}
    assert recipes == {p.name for p in (Path(__file__).parents[1] / "recipes" / "configs").iterdir() if p.is_dir()}


@pytest.mark.parametrize("model_id", [c.model_id for f in FAMILIES.values() for c in f.checkpoints])
def test_real_config_values_give_the_published_parameter_count(model_id):
    """Hidden size, layers, heads, kv heads, intermediate, vocab and tying all enter the count."""
    family = fam.family_of_model(model_id)
    checkpoint = family.checkpoint(model_id)
    config = fam.real_config(family, checkpoint)
    assert type(config).__name__ == family.config_class and config.model_type == family.model_type
    assert fam.count_parameters_meta(config) == checkpoint.parameters


def test_quirk_values_reach_the_configs():
    gemma2 = fam.real_config(FAMILIES["gemma2"])
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.sliding_window) == (50.0, 30.0, 4096)
    assert gemma2.layer_types[:2] == ["sliding_attention", "full_attention"]
    gemma3 = fam.real_config(FAMILIES["gemma3"])
    assert gemma3.final_logit_softcapping is None and gemma3.sliding_window == 512
    assert gemma3.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma3.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert fam.real_config(FAMILIES["qwen2.5"]).sliding_window is None  # use_sliding_window: false
    assert fam.real_config(FAMILIES["mistral"]).sliding_window is None
    assert fam.real_config(FAMILIES["phi3"]).sliding_window == 2047
    llama = fam.real_config(FAMILIES["llama3"])
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.tie_word_embeddings
    assert not fam.real_config(FAMILIES["llama3"], FAMILIES["llama3"].checkpoints[1]).tie_word_embeddings
    shape = fam.shape_config(FAMILIES["llama3"], layers=2)
    assert (shape.num_hidden_layers, shape.hidden_size, shape.vocab_size) == (2, 2048, 128256)


# --------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", NAMES)
def test_template_renders_the_known_strings(name, model_dirs):
    tok = load_tokenizer(model_dirs(name))
    full, prompt = RENDERED[name]
    kwargs = {"date_string": "26 Jul 2024"} if name == "llama3" else {}
    assert render(tok, CHAT, **kwargs) == full
    assert render(tok, CHAT[:2], gen=True, **kwargs) == prompt
    # Every token the template emits around the text is one token, as in the real tokenizer.
    for token in (*FAMILIES[name].tokens.special, *FAMILIES[name].tokens.added):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token


def test_system_message_handling_per_family(model_dirs, base_tokenizer):
    from jinja2.exceptions import TemplateError

    from align.modeling.templates import ensure_system_role, folds_system, system_role_problem

    raw = {name: fam.family_tokenizer(FAMILIES[name], base_tokenizer) for name in NAMES}
    # Gemma 2 has no system role: its own template raises.
    with pytest.raises(TemplateError, match="System role not supported"):
        render(raw["gemma2"], CHAT)
    assert "rejects a system message" in system_role_problem(raw["gemma2"])
    # Mistral v0.3 shows the system message only when the conversation ends with a user turn.
    assert render(raw["mistral"], CHAT) == "<s>[INST] Capital of France?[/INST] Paris.</s>"
    assert render(raw["mistral"], CHAT[:2], gen=True) == "<s>[INST] Be brief.\n\nCapital of France?[/INST]"
    assert "drops the system message" in system_role_problem(raw["mistral"])
    with pytest.raises(TemplateError, match="must alternate"):
        render(raw["mistral"], [CHAT[1], CHAT[1]])
    # Every other family takes a system message as it is; the defaults differ.
    for name in NAMES:
        if name not in ("gemma2", "mistral"):
            assert system_role_problem(raw[name]) is None, name
            assert not folds_system(load_tokenizer(model_dirs(name)))
    assert "You are Qwen, created by Alibaba Cloud." in render(raw["qwen2.5"], CHAT[1:])
    assert "named SmolLM" in render(raw["smollm2"], CHAT[1:])
    assert LLAMA_HEADER.format(date="26 Jul 2024") + "<|eot_id|>" in render(raw["llama3"], CHAT[1:], date_string="26 Jul 2024")
    # Llama 3.2 dates the system header today; 3.1 keeps its fixed date.
    assert f"Today Date: {time.strftime('%d %b %Y')}\n" in render(raw["llama3"], CHAT)
    llama31 = fam.family_tokenizer(FAMILIES["llama3"], base_tokenizer, "llama3_1")
    assert render(llama31, CHAT) == RENDERED["llama3"][0]
    # Qwen3's generation prompt with thinking off pre-fills the empty think block.
    assert render(raw["qwen3"], CHAT[:2], gen=True, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # align's fold renders Gemma 2 exactly as Gemma 3's own template does, and sticks: a second load keeps it once.
    for name in ("gemma2", "mistral"):
        tok = load_tokenizer(model_dirs(name))
        assert folds_system(tok) and system_role_problem(tok) is None
        assert ensure_system_role(tok, name) is None and tok.chat_template.count("align: a leading system") == 1
    assert render(load_tokenizer(model_dirs("gemma2")), CHAT) == render(raw["gemma3"], CHAT)


# --------------------------------------------------------------------------- SFT labels


@pytest.mark.parametrize("name", NAMES)
def test_sft_labels_cover_exactly_the_assistant_turns(name, model_dirs):
    from align.modeling.templates import tokenize_for_sft

    tok = load_tokenizer(model_dirs(name))
    out = tokenize_for_sft(tok, CHAT, max_length=512)
    assert out.input_ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert all(label in (-100, t) for t, label in zip(out.input_ids, out.labels))
    # The one labelled span is what the assistant turn adds to the rendering: its answer and end tokens.
    full, prompt = render(tok, CHAT), render(tok, CHAT[:2], gen=True)
    assert labelled_spans(tok, out.input_ids, out.labels) == [full[len(prompt):]]
    assert full[len(prompt):] == SPANS[name][-1].replace("Rome.", "Paris.")  # a final turn, as TWO_TURNS' last
    two = tokenize_for_sft(tok, TWO_TURNS, max_length=512)
    assert labelled_spans(tok, two.input_ids, two.labels) == SPANS[name]


# --------------------------------------------------------------------------- LoRA targets


def lora_stage_config(model_dir, method="lora"):
    from align.stages.sft import SFTConfig

    return load_config(SFTConfig, None, {"output_dir": "unused", "model.name_or_path": str(model_dir), "data.path": "unused.jsonl",
                                         "peft.method": method, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
                                         "lora.target_modules": "all-linear"})


@pytest.mark.parametrize("name", NAMES)
def test_lora_all_linear_adapts_attention_and_mlp_only(name, model_dirs):
    from peft import get_peft_model

    from align.modeling import models
    from align.modeling.adapters import peft_config_for

    model_dir = model_dirs(name)
    base = models.load_model(models.resolve(str(model_dir)), ModelConfig(), device="cpu")
    tied = base.config.tie_word_embeddings
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    cfg = lora_stage_config(model_dir)
    model = get_peft_model(base, peft_config_for(cfg))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert adapted == LORA_TARGETS[name]
    layers = base.config.num_hidden_layers
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(wrapped) == layers * len(LORA_TARGETS[name])
    # Never the LM head or the embeddings; tied weights stay one tensor.
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert not hasattr(head, "lora_A") and not hasattr(embed, "lora_A")
    assert (head.weight is embed.weight) == tied and not head.weight.requires_grad
    # Only LoRA matrices train, r * (d_in + d_out) each; base weights and biases stay frozen.
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for _, m in model.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert sum(p.numel() for p in trainable.values()) == expected
    biases = {n for n, p in model.named_parameters() if n.endswith(".bias")}
    if name == "qwen2.5":  # q, k and v carry biases, frozen under their LoRA wrapper; o_proj and the MLP have none
        assert {n.split(".")[-3] for n in biases} == {"q_proj", "k_proj", "v_proj"}
        assert all(n.endswith("base_layer.bias") for n in biases)
    else:
        assert not biases


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("name", NAMES)
def test_merged_model_equals_base_plus_adapter(name, model_dirs, tmp_path):
    from peft import PeftModel, get_peft_model

    from align.modeling import models
    from align.modeling.adapters import merge_adapter, peft_config_for

    model_dir = model_dirs(name)
    ref = models.resolve(str(model_dir))
    tok = load_tokenizer(model_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(models.load_model(ref, ModelConfig(), device="cpu"), peft_config_for(lora_stage_config(model_dir)))
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_adapter(ref, ModelConfig(), tmp_path / "adapter", tmp_path / "merged", tok)

    ids = torch.tensor([tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        merged = models.load_model(models.resolve(str(tmp_path / "merged")), ModelConfig(), device="cpu")
        base = models.load_model(ref, ModelConfig(), device="cpu")
        plain = base(ids).logits
        with_adapter = PeftModel.from_pretrained(models.load_model(ref, ModelConfig(), device="cpu"), str(tmp_path / "adapter"))(ids).logits
        folded = merged(ids).logits
    assert (with_adapter - plain).abs().max() > 1e-3, "the adapter changes the model"
    torch.testing.assert_close(folded, with_adapter, rtol=1e-4, atol=1e-4 * with_adapter.abs().max().item())
    if merged.config.tie_word_embeddings:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    if name == "qwen2.5":  # the biases survive the merge unchanged
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.bias, base.model.layers[0].self_attn.q_proj.bias)
    # The merged folder carries the template the stages trained with (the fold included).
    assert load_tokenizer(tmp_path / "merged").chat_template == tok.chat_template


# --------------------------------------------------------------------------- DPO fast path


def pairs(n: int, context: int = 1) -> list[dict]:
    """Pairs of different lengths, some with a system message (folded where the template needs it)."""
    rows = []
    for i in range(n):
        system = [{"role": "system", "content": "Answer in one line."}] if i % 2 else []
        context_words = " ".join(["Think it through."] * (i % 4) * context)
        rows.append({
            "prompt": system + [{"role": "user", "content": f"{context_words} What is {i} plus {i % 5}?".strip()}],
            "chosen": [{"role": "assistant", "content": f"{i + i % 5}" + "!" * (i % 3)}],
            "rejected": [{"role": "assistant", "content": " ".join(["Well, let me see."] * (1 + i % 3))}],
        })
    return rows


def truncation_lengths(tok, rows) -> tuple[int, int]:
    """(where the last pair's chosen and rejected tokens diverge, the longest sequence): a max_length
    between the two truncates some rows and never cuts a pair down to two equal responses (a tie)."""
    from align.modeling.templates import chat_ids, common_prefix_length

    diverge, longest = 0, 0
    for r in rows:
        c, j = chat_ids(tok, r["prompt"] + r["chosen"]), chat_ids(tok, r["prompt"] + r["rejected"])
        diverge, longest = max(diverge, common_prefix_length(c, j)), max(longest, len(c), len(j))
    return diverge, longest


def dpo_compare(model_dir, tok, tmp_path, fast, max_length, rows):
    """Loss, reward metrics and adapter gradients of TRL's plain DPO and of AlignDPOTrainer with `fast`."""
    import copy

    from test_dpo_fast import first_batch, make_trainer, step
    from transformers import AutoModelForCausalLM

    from align.preference.ref_cache import RefLogpCache

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    plain = make_trainer(copy.deepcopy(base), tok, rows, tmp_path / "plain", fast=None, max_length=max_length)
    cache = RefLogpCache(tmp_path / "cache", {"base": str(model_dir)}) if fast.ref_cache else None
    ours = make_trainer(copy.deepcopy(base), tok, rows, tmp_path / "ours", fast=fast, cache=cache, max_length=max_length)
    a = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    c = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # move the adapters off zero so rewards and margins are not trivially 0
        for name, p in a.items():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
            p.add_(noise)
            c[name].add_(noise)
    batch = first_batch(plain)
    return step(plain, batch), step(ours), batch


def assert_same_step(result_a, result_c):
    (loss_a, metrics_a, grads_a), (loss_c, metrics_c, grads_c) = result_a, result_c
    assert abs(loss_a - loss_c) <= 1e-5 * max(1.0, abs(loss_a))
    assert metrics_a.keys() == metrics_c.keys() and metrics_a
    for key in metrics_a:
        assert abs(metrics_a[key] - metrics_c[key]) <= 1e-4 * max(1.0, abs(metrics_a[key])), key
    assert abs(metrics_a["rewards/margins"]) > 1e-4, "the adapters move the policy away from the reference"
    for name in grads_a:
        torch.testing.assert_close(grads_c[name], grads_a[name], atol=1e-5 * max(1.0, grads_a[name].abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_dpo_fast_path_equals_trl_or_falls_back_with_its_reason(name, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.preference.dpo_trainer import plan
    from align.stages.dpo import DPOOptions

    model_dir = model_dirs(name)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    window = getattr(model.config, "sliding_window", None)
    rows = pairs(8)
    diverge, longest = truncation_lengths(tok, rows)
    max_length = diverge + 3
    assert max_length < longest and max_length <= (window or max_length), "within the window, some rows truncated"
    fast = plan(DPOOptions(), "lora", model, max_length=max_length)
    if name == "gemma2":
        assert not fast.shared_prefix and "final_logit_softcapping" in fast.why_not["shared_prefix"]
    else:
        assert fast.shared_prefix, fast.describe()
    result_a, result_c, batch = dpo_compare(model_dir, tok, tmp_path, fast, max_length, rows)
    assert batch["input_ids"].shape[1] == max_length, "some rows reach max_length"
    assert_same_step(result_a, result_c)


@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_sliding_window_longer_than_the_window_falls_back_and_must(name, model_dirs, tmp_path):
    """Past the window, plan() turns prefix sharing off; forcing it on would change the result."""
    from transformers import AutoModelForCausalLM

    from align.preference.dpo_trainer import FastPath, plan
    from align.stages.dpo import DPOOptions

    model_dir = model_dirs(name)
    tok = load_tokenizer(model_dir)
    window = AutoModelForCausalLM.from_pretrained(model_dir).config.sliding_window
    rows = pairs(8, context=6)  # prompts of up to ~100 tokens: far past the window
    diverge, longest = truncation_lengths(tok, rows)
    max_length = longest
    assert diverge < max_length and longest > window + 40
    fast = plan(DPOOptions(), "lora", AutoModelForCausalLM.from_pretrained(model_dir), max_length=max_length)
    assert not fast.shared_prefix and f"window {window}" in fast.why_not["shared_prefix"] and fast.ref_cache
    result_a, result_c, _ = dpo_compare(model_dir, tok, tmp_path / "planned", fast, max_length, rows)
    assert_same_step(result_a, result_c)
    forced = dpo_compare(model_dir, tok, tmp_path / "forced", FastPath(True, False, {}), max_length, rows)[1]
    # Forced on, the block mask lets tokens see past the window: the log-probs move by far more than
    # the float noise between two exact layouts (random-init attention is nearly uniform, so the
    # shift is small in absolute terms, but deterministic).
    key = "logps/chosen"
    noise = abs(result_a[1][key] - result_c[1][key])
    shift = abs(result_a[1][key] - forced[1][key])
    assert shift > 5e-4 and shift > 100 * noise, (shift, noise)


def test_gemma2_runs_eager_attention_on_a_gpu(model_dirs):
    """sdpa cannot soft-cap attention scores: Gemma 2 declares no sdpa support and align picks eager."""
    from align.modeling import models

    ref = models.resolve(str(model_dirs("gemma2")))
    gemma2 = models.model_class_of(ref, ModelConfig())
    assert models.resolve_attn("auto", "cuda:0", gemma2) == "eager"
    assert models.resolve_attn("auto", "cuda:0", models.model_class_of(models.resolve(str(model_dirs("gemma3"))), ModelConfig())) == "sdpa"
    assert models.resolve_attn("flash_attention_2", "cuda:0", gemma2) == "flash_attention_2"


# --------------------------------------------------------------------------- the stages, per family


def family_data(root: Path) -> Path:
    """Preference rows (some with a system message) for every stage; SFT trains on their chosen answers."""
    return write_jsonl(root / "prefs.jsonl", pairs(16))


def stage_overrides(model_dir, data, out, **extra):
    """Seconds-long stage runs: no held-out evaluation or sample generation (other tests cover those)."""
    from conftest import tiny_overrides

    return tiny_overrides(model_dir, data, out, **{
        "train.max_steps": 2, "train.max_length": 128, "tracking": "none", "data.eval_fraction": 0.0,
        "samples.num_prompts": 0, **extra,
    })


# Each chain takes ~20-60 s on the 2-core CPU: the default run takes the two families with the most
# quirks on the way (Gemma 2: folded system message, soft-capping fallback, its reward head; Phi-3:
# fused projections, sliding-window fallback); `-m slow` runs every family.
CHAIN_DEFAULT = ("gemma2", "phi3")


@pytest.mark.parametrize("name", [n if n in CHAIN_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_qlora_sft_then_dpo_reward_and_ppo_run_on_the_family(name, model_dirs, tmp_path):
    """QLoRA SFT (4-bit NF4 base) -> merge -> DPO -> reward model -> PPO through the real stages."""
    from safetensors.torch import load_file

    from align.core.artifacts import RunDir
    from align.stages.registry import run_stage
    from align.stages.dpo import DPOConfig
    from align.stages.ppo import PPOConfig
    from align.stages.reward import RewardConfig
    from align.stages.sft import SFTConfig

    model_dir = model_dirs(name)
    data = family_data(tmp_path)
    run_sft = run_stage(load_config(SFTConfig, None, stage_overrides(model_dir, data, tmp_path / "sft", **{"peft.method": "qlora", "train.max_steps": 1})))
    manifest = json.loads((run_sft.path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and RunDir(run_sft.path).config()["model"]["quantization"] == "4bit"
    assert any("chosen answers of 16 preference rows" in note for note in manifest["dataset"]["notes"])
    adapter = load_file(run_sft.path / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items()), "one QLoRA step moved lora_B (it starts at 0)"
    assert (run_sft.path / "merged" / "config.json").is_file()

    parent = {"parent_run": str(run_sft.path)}
    run_dpo = run_stage(load_config(DPOConfig, None, stage_overrides(None, data, tmp_path / "dpo", **parent)))
    first = next(r for r in read_metrics(run_dpo.path) if "train/loss" in r)
    # The reference is the merged SFT model with the adapter off: the first step's loss is ln 2.
    assert first["_step"] == 1 and first["train/loss"] == pytest.approx(math.log(2), abs=1e-3)
    described = json.loads((run_dpo.path / "manifest.json").read_text())["summary"]["dpo_fast_path"]
    if name == "gemma2":
        assert "shared_prefix off: the model scales its logits (final_logit_softcapping)" in described
    elif name in ("gemma3", "phi3"):  # the tiny windows (48, 40) are shorter than max_length 128
        assert "shared_prefix off: sliding-window attention" in described
    else:
        assert described.startswith("DPO fast path: shared_prefix (") and "ref_cache" in described
        assert "shared_prefix off" not in described

    run_rm = run_stage(load_config(RewardConfig, None, stage_overrides(None, data, tmp_path / "reward", **parent,
                                                                       **{"reward.stats_samples": 4})))
    rm_config = json.loads((run_rm.path / "adapter" / "adapter_config.json").read_text())
    assert rm_config["task_type"] == "SEQ_CLS" and "score" in rm_config["modules_to_save"]
    assert json.loads((run_rm.path / "reward_stats.json").read_text())["std"] > 0

    ppo_cfg = load_config(PPOConfig, None, stage_overrides(None, data, tmp_path / "ppo", **parent, reward_run=str(run_rm.path), **{
        "train.max_steps": 1, "ppo.rollout_batch_size": 2, "ppo.minibatch_size": 2, "ppo.max_new_tokens": 4}))
    run_ppo = run_stage(ppo_cfg)
    step = next(r for r in read_metrics(run_ppo.path) if "ppo/kl" in r)
    assert step["ppo/kl"] == pytest.approx(0.0, abs=1e-5), "rollouts of a fresh policy adapter are the reference's"
    assert math.isfinite(step["ppo/value_loss"]) and step["ppo/response_length"] > 0
    assert json.loads((run_ppo.path / "manifest.json").read_text())["status"] == "finished"
