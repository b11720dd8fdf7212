"""The model families align ships recipes for, and what each needs to be trained right.

A family is one transformers architecture with its chat template and quirks. Per family:
the architecture and config class, the real checkpoints (model ids) with their published
config values, a tiny variant of the same architecture for CPU tests, the tokens its chat
template emits, and the quirks that change how align treats it. Pure data plus small
builders: nothing here downloads, and torch/transformers are imported inside functions.

The chat templates are the models' own (chat_templates/*.jinja, provenance in
chat_templates/SOURCES.md), stored byte for byte. Two of them cannot render a training
conversation as its prompt plus its answer: Gemma 2 rejects a system message, and Mistral
v0.3 shows the system message only when the conversation ends with a user turn (so a
prompt and the same prompt with its answer disagree). align folds such a system message
into the first user turn, as Gemma 3's own template does; see
align.modeling.templates.ensure_system_role.

Configs use the published config.json names (rope_theta, rope_scaling,
sliding_window_pattern, ...), which transformers 5 converts on load. `shape_config` builds a
real-width model with fewer layers (GPU smoke checks); `tiny_config` a few-layer, narrow one.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.core.errors import ModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"

# Widths of every tiny variant; a family may override (head_dim, windows, ...).
TINY_WIDTHS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}


@dataclass(frozen=True)
class Checkpoint:
    """One real model: its hub id, chat template and published config values."""

    model_id: str
    template: str  # file stem under chat_templates/
    config: dict[str, Any]  # config.json values (architecture fields only)
    parameters: int  # published parameter count (model card / hub); a test checks the config values against it
    recipes: str | None = None  # recipes/configs/<folder>, when align ships recipes for it


@dataclass(frozen=True)
class Tokens:
    """What the chat template emits, so a stand-in tokenizer can speak it as single tokens."""

    bos: str | None
    eos: str
    pad: str | None  # None: the eos pads (align's default when a tokenizer has no pad)
    special: tuple[str, ...] = ()  # control tokens of the template (never split, hidden by decode(skip_special_tokens))
    added: tuple[str, ...] = ()  # plain added tokens (Qwen3's <think>): one token each, kept by decode
    end_of_turn: str | None = None  # where generation stops when it is not the eos (generation_config eos ids)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    model_type: str
    architecture: str  # transformers causal-LM class
    config_class: str
    checkpoints: tuple[Checkpoint, ...]
    tokens: Tokens
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides of TINY_WIDTHS for this architecture
    quirks: tuple[str, ...] = ()

    @property
    def default(self) -> Checkpoint:
        return self.checkpoints[0]

    def checkpoint(self, model_id: str) -> Checkpoint:
        for c in self.checkpoints:
            if c.model_id == model_id:
                return c
        raise ModelError(f"family {self.name}: no checkpoint {model_id!r} (known: {', '.join(c.model_id for c in self.checkpoints)})")


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3", "Llama 3.x", "llama", "LlamaForCausalLM", "LlamaConfig",
            (
                Checkpoint(
                    "meta-llama/Llama-3.2-1B-Instruct", "llama3_2",
                    dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                         rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
                    parameters=1_235_814_400, recipes="llama-3.2-1b-instruct",
                ),
                Checkpoint(
                    "meta-llama/Llama-3.1-8B-Instruct", "llama3_1",
                    dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
                    parameters=8_030_261_248, recipes="llama-3.1-8b-instruct",
                ),
            ),
            # Llama 3's tokenizer splits a newline run from the word after it ("\n\n" + "Paris"); a stand-in
            # tokenizer needs the header's "\n\n" as one token to put the answer's first token where Llama 3 does.
            Tokens(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                   added=("\n\n",)),
            tiny=dict(rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 128}),
            quirks=(
                "The system header is always rendered, with 'Cutting Knowledge Date: December 2023' and 'Today Date: ...'; "
                "Llama 3.2's template takes today's date (strftime_now), so a conversation renders differently on "
                "another day (other tokens: reference-cache misses, never wrong values).",
                "Llama 3.2 1B ties its embeddings and LM head; 3.1 8B does not.",
                "rope_scaling type llama3 (context extension to 131072).",
            ),
        ),
        Family(
            "qwen2.5", "Qwen2.5", "qwen2", "Qwen2ForCausalLM", "Qwen2Config",
            (
                Checkpoint(
                    "Qwen/Qwen2.5-1.5B-Instruct", "qwen2_5",
                    dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                         use_sliding_window=False, sliding_window=32768, max_window_layers=21,
                         bos_token_id=151643, eos_token_id=151645),
                    parameters=1_543_714_304, recipes="qwen2.5-1.5b-instruct",
                ),
                Checkpoint(
                    "Qwen/Qwen2.5-7B-Instruct", "qwen2_5",
                    dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                         use_sliding_window=False, sliding_window=131072, max_window_layers=28,
                         bos_token_id=151643, eos_token_id=151645),
                    parameters=7_615_616_512, recipes="qwen2.5-7b-instruct",
                ),
            ),
            Tokens(bos=None, eos="<|im_end|>", pad="<|endoftext|>", special=("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
            quirks=(
                "q_proj, k_proj and v_proj carry biases (o_proj and the MLP do not); LoRA leaves them frozen and merging keeps them.",
                "Without a system message the template inserts Qwen's default one.",
                "The 1.5B ties embeddings; the 7B does not (and pads its vocabulary to 152064).",
                "sliding_window is set but use_sliding_window is false: every layer attends to the whole sequence.",
            ),
        ),
        Family(
            "qwen3", "Qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config",
            (
                Checkpoint(
                    "Qwen/Qwen3-8B", "qwen3",
                    dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                         max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                         attention_bias=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
                    parameters=8_190_735_360,
                ),
                Checkpoint(
                    "Qwen/Qwen3-1.7B", "qwen3",
                    dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                         attention_bias=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
                    # The model card's 1.7B (1.4B without embeddings); the hub's file listing counts the tied LM head twice.
                    parameters=1_720_574_976,
                ),
            ),
            Tokens(bos=None, eos="<|im_end|>", pad="<|endoftext|>", special=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                   added=("<think>", "</think>")),
            quirks=(
                "Thinking tags: the final assistant turn renders as '<think>\\n{reasoning}\\n</think>\\n\\n{answer}' (an empty "
                "think block without reasoning); earlier assistant turns render without it. SFT labels follow the "
                "rendering, so a final turn teaches the empty think block, an earlier one the plain answer.",
                "q_norm/k_norm on the attention heads; no attention biases.",
            ),
        ),
        Family(
            "mistral", "Mistral v0.3", "mistral", "MistralForCausalLM", "MistralConfig",
            (
                Checkpoint(
                    "mistralai/Mistral-7B-Instruct-v0.3", "mistral_v0_3",
                    dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=32768, tie_word_embeddings=False,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5, hidden_act="silu",
                         sliding_window=None, bos_token_id=1, eos_token_id=2),
                    parameters=7_248_023_552, recipes="mistral-7b-instruct-v0.3",
                ),
            ),
            Tokens(bos="<s>", eos="</s>", pad=None, special=("[INST]", "[/INST]")),
            quirks=(
                "Roles must alternate user/assistant after an optional system message (the template raises otherwise).",
                "The system message is rendered only when the conversation ends with a user turn, inside that last "
                "[INST]: a prompt and the same prompt with its answer render differently. align folds it into the "
                "first user turn, which renders a single-turn prompt exactly as the template does.",
                "No generation prompt: a prompt ends with [/INST]; the answer is ' ' + answer.strip() + '</s>'.",
                "v0.3 has no sliding window (v0.1 had 4096).",
            ),
        ),
        Family(
            "gemma2", "Gemma 2", "gemma2", "Gemma2ForCausalLM", "Gemma2Config",
            (
                Checkpoint(
                    "google/gemma-2-9b-it", "gemma2",
                    dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, vocab_size=256000,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                         hidden_activation="gelu_pytorch_tanh", sliding_window=4096, attn_logit_softcapping=50.0,
                         final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1, pad_token_id=0),
                    parameters=9_241_705_984, recipes="gemma-2-9b-it",
                ),
            ),
            Tokens(bos="<bos>", eos="<eos>", pad="<pad>", special=("<start_of_turn>", "<end_of_turn>"),
                   end_of_turn="<end_of_turn>"),
            tiny=dict(sliding_window=48, query_pre_attn_scalar=16),
            quirks=(
                "No system role: the template raises 'System role not supported'. align folds a system message into "
                "the first user turn ('{system}\\n\\n{user}', what Gemma 3's template does) and logs it.",
                "Logit soft-capping: attention scores (50) and final logits (30) pass through cap*tanh(x/cap). The DPO "
                "fast path projects the LM head itself, so it falls back to TRL's layout for this family.",
                "Sliding-window attention (4096) on every other layer; sdpa cannot soft-cap, so align runs eager "
                "attention on GPUs too (or flash_attention_2 when asked).",
                "The assistant role is 'model'; generation stops at <end_of_turn>. Embeddings are tied and scaled by sqrt(hidden).",
            ),
        ),
        Family(
            "gemma3", "Gemma 3 (text)", "gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig",
            (
                Checkpoint(
                    "google/gemma-3-1b-it", "gemma3",
                    dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, vocab_size=262144,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
                         rope_local_base_freq=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
                         hidden_activation="gelu_pytorch_tanh", sliding_window=512, sliding_window_pattern=6,
                         final_logit_softcapping=None, attn_logit_softcapping=None,
                         bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0),
                    parameters=999_885_952,
                ),
            ),
            Tokens(bos="<bos>", eos="<eos>", pad="<pad>", special=("<start_of_turn>", "<end_of_turn>"),
                   end_of_turn="<end_of_turn>"),
            tiny=dict(sliding_window=48, sliding_window_pattern=2, query_pre_attn_scalar=16),
            quirks=(
                "The template folds a system message into the first user turn itself.",
                "Local sliding-window layers (512 tokens on the 1B) between global ones (5:1), with their own rope base: "
                "sequences longer than the window make the DPO fast path fall back (its block mask has no window).",
                "No soft-capping (unlike Gemma 2); q_norm/k_norm. Text-only Gemma3ForCausalLM (the 1B; larger Gemma 3 are multimodal).",
            ),
        ),
        Family(
            "phi3", "Phi-3", "phi3", "Phi3ForCausalLM", "Phi3Config",
            (
                Checkpoint(
                    "microsoft/Phi-3-mini-4k-instruct", "phi3",
                    dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
                         max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0,
                         rope_scaling=None, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=2047,
                         bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
                    parameters=3_821_079_552,
                ),
            ),
            Tokens(bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                   special=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), end_of_turn="<|end|>"),
            tiny=dict(sliding_window=40, num_key_value_heads=4),
            quirks=(
                "Fused projections: qkv_proj (q, k and v in one matrix) and gate_up_proj; LoRA all-linear adapts those.",
                "Without a generation prompt the template ends the conversation with <|endoftext|> (the eos).",
                "Sliding window 2047 on every layer.",
            ),
        ),
        Family(
            "smollm2", "SmolLM2", "llama", "LlamaForCausalLM", "LlamaConfig",
            (
                Checkpoint(
                    "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2",
                    dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
                    parameters=134_515_008, recipes="smollm2-135m",
                ),
            ),
            Tokens(bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", special=("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
            quirks=(
                "The embedded default model (alias smollm2-135m-instruct); ChatML with a default system message.",
            ),
        ),
    )
}


def get_family(name: str) -> Family:
    if name in FAMILIES:
        return FAMILIES[name]
    close = difflib.get_close_matches(name, list(FAMILIES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ModelError(f"unknown model family '{name}'{hint}; known: {', '.join(FAMILIES)}")


def family_of_model(model_id: str) -> Family | None:
    """The family a known checkpoint id belongs to."""
    for family in FAMILIES.values():
        if any(c.model_id == model_id for c in family.checkpoints):
            return family
    return None


@lru_cache(maxsize=None)
def chat_template(name: str) -> str:
    """A stored chat template by file stem (llama3_1, qwen3, ...), exactly as the model ships it."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        raise ModelError(f"no stored chat template '{name}' (known: {', '.join(known)})")
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- configs


def _config_class(family: Family):
    import transformers

    return getattr(transformers, family.config_class)


def real_config(family: Family, checkpoint: Checkpoint | None = None) -> "PretrainedConfig":
    """The published config of a checkpoint (default: the family's first)."""
    checkpoint = checkpoint or family.default
    return _config_class(family)(**checkpoint.config)


def shape_config(
    family: Family, checkpoint: Checkpoint | None = None, *, layers: int | None = None, vocab_size: int | None = None
) -> "PretrainedConfig":
    """The real widths, optionally fewer layers (a few-layer model runs every kernel at its real size)."""
    checkpoint = checkpoint or family.default
    values = dict(checkpoint.config)
    if layers is not None:
        values["num_hidden_layers"] = layers
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return _config_class(family)(**values)


def tiny_config(family: Family, vocab_size: int, **overrides) -> "PretrainedConfig":
    """A few-layer, narrow model of the family's architecture: same modules, quirks and attention layout."""
    values = {**family.default.config, **TINY_WIDTHS, **family.tiny, **overrides, "vocab_size": vocab_size}
    values.pop("bos_token_id", None), values.pop("eos_token_id", None), values.pop("pad_token_id", None)
    return _config_class(family)(**values)


def count_parameters_meta(config: "PretrainedConfig") -> int:
    """Parameters of a model built from `config`, counted without allocating its weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- tokenizers


def family_tokenizer(family: Family, base: "PreTrainedTokenizerBase", template: str | None = None) -> "PreTrainedTokenizerBase":
    """A copy of `base` that speaks the family's chat template: its control tokens as single tokens,
    its bos/eos/pad, and the template itself (default: the family's first checkpoint's).

    The words in between are tokenized by `base`'s vocabulary; what matters for masks, labels and
    prefix sharing is that every token the template emits around them is one token, as in the
    real tokenizer.
    """
    import copy

    tok = copy.deepcopy(base)
    t = family.tokens
    specials = [s for s in (t.bos, t.eos, t.pad, *t.special) if s]
    tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(specials))}, replace_extra_special_tokens=False)
    if t.added:
        tok.add_tokens(list(t.added), special_tokens=False)
    tok.bos_token = t.bos
    tok.eos_token = t.eos
    tok.pad_token = t.pad or t.eos
    tok.chat_template = chat_template(template or family.default.template)
    for name in (*specials, *t.added):
        if len(tok(name, add_special_tokens=False)["input_ids"]) != 1:
            raise ModelError(f"family {family.name}: {name!r} does not tokenize as one token")
    return tok


def end_of_turn_ids(family: Family, tokenizer) -> list[int]:
    """The ids generation stops at: the eos, and the end-of-turn token where the family has one."""
    ids = [tokenizer.convert_tokens_to_ids(family.tokens.eos)]
    if family.tokens.end_of_turn:
        ids.append(tokenizer.convert_tokens_to_ids(family.tokens.end_of_turn))
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------- random-init model folders


def save_random_model(
    family: Family,
    out: Path,
    base_tokenizer: "PreTrainedTokenizerBase",
    *,
    checkpoint: Checkpoint | None = None,
    size: str = "tiny",
    layers: int = 2,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a random-init model of the family's architecture with its chat template: a model folder
    any stage takes as model.name_or_path (safetensors, tokenizer, generation config).

    size="tiny": narrow widths (TINY_WIDTHS), the tokenizer's vocabulary. size="shape": the
    checkpoint's real widths and vocabulary size with `layers` layers (ids past the stand-in
    tokenizer's are never produced by it, but the embedding and LM head have their real size).
    The tokenizer is `base_tokenizer` taught the template's tokens (family_tokenizer). `dtype` and
    `device` are where the random weights are drawn and the dtype they are saved in (a real-width
    model initializes in seconds on a GPU, in minutes on a CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    checkpoint = checkpoint or family.default
    tok = family_tokenizer(family, base_tokenizer, checkpoint.template)
    if size == "tiny":
        config = tiny_config(family, vocab_size=len(tok), num_hidden_layers=layers)
    elif size == "shape":
        config = shape_config(family, checkpoint, layers=layers, vocab_size=max(len(tok), checkpoint.config["vocab_size"]))
    else:
        raise ValueError(f"size must be 'tiny' or 'shape', got {size!r}")
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=end_of_turn_ids(family, tok), pad_token_id=tok.pad_token_id
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
