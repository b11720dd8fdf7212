"""Conversation rendering: assistant-only labels, and the instruction template for base models."""

from __future__ import annotations

import pytest

from align.core.errors import ModelError
from align.modeling.templates import INSTRUCTION_TEMPLATE, apply_chat_template_choice, tokenize_for_sft

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture()
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


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


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    out = tokenize_for_sft(tokenizer, CHAT, max_length=512)
    assert out.input_ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    spans = labelled_spans(tokenizer, out.input_ids, out.labels)
    # Each assistant turn with its end-of-turn token (so the model learns to stop); nothing else.
    assert spans == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    assert not out.truncated


def test_truncation_is_reported(tokenizer):
    out = tokenize_for_sft(tokenizer, CHAT, max_length=10)
    assert out.truncated and len(out.input_ids) == 10 and all(l == -100 for l in out.labels)


def test_instruction_template_for_a_base_model_without_one(tokenizer):
    tokenizer.chat_template = None
    assert apply_chat_template_choice(tokenizer, "auto", "base") == "instruction"
    assert tokenizer.chat_template == INSTRUCTION_TEMPLATE
    text = tokenizer.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text == f"{tokenizer.bos_token}### Instruction:\nCapital of France?\n\n### Response:\nParis.{tokenizer.eos_token}\n\n"
    prompt = tokenizer.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("### Response:\n")
    out = tokenize_for_sft(tokenizer, CHAT[1:3], max_length=512)
    assert labelled_spans(tokenizer, out.input_ids, out.labels) == [f"Paris.{tokenizer.eos_token}\n\n"]


def test_template_choices(tokenizer):
    own = tokenizer.chat_template
    assert apply_chat_template_choice(tokenizer, "auto", "m") == "model" and tokenizer.chat_template == own
    assert apply_chat_template_choice(tokenizer, "instruction", "m") == "instruction"
    tokenizer.chat_template = None
    with pytest.raises(ModelError, match="has no chat template"):
        apply_chat_template_choice(tokenizer, "model", "m")
