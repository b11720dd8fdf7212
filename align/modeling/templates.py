"""How conversations become tokens.

Chat models use their own chat template. Base models without one get the instruction
template (### Instruction / ### Input / ### Response), installed as the tokenizer's
chat template so every later step (TRL's DPO tokenization, generation, the merged
model saved for the next stage) renders conversations the same way.

SFT trains on assistant tokens only. Rather than relying on `{% generation %}`
markers (few templates have them), the assistant spans are found by rendering each
conversation prefix: the tokens an assistant turn adds after the generation prompt
are that turn's span. This works for any template that renders prefixes
consistently, which is what inference relies on anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from align.core.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTRUCTION_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def instruction_user_content(instruction: str, input_text: str | None) -> str:
    """An Alpaca-style row's user turn; its `input` renders under '### Input:'."""
    if input_text and input_text.strip():
        return f"{instruction}\n\n### Input:\n{input_text}"
    return instruction


def apply_chat_template_choice(tokenizer: "PreTrainedTokenizerBase", mode: str, model_name: str) -> str:
    """Install the template that `model.chat_template` asks for; returns which one is in use."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if mode == "model" and not has_own:
        raise ModelError(
            f"model '{model_name}': model.chat_template is 'model' but the tokenizer has no chat template "
            "(use 'instruction' or 'auto')"
        )
    if mode == "instruction" or (mode == "auto" and not has_own):
        tokenizer.chat_template = INSTRUCTION_TEMPLATE
        return "instruction"
    return "model"


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # -100 outside assistant turns
    truncated: bool


def tokenize_for_sft(tokenizer, messages: list[dict], max_length: int) -> Tokenized:
    """Token ids of a conversation with labels on assistant turns only, cut to max_length."""
    full = chat_ids(tokenizer, messages)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = chat_ids(tokenizer, messages[: i + 1])
        start = common_prefix_length(before, through)
        # The turn's span in the full rendering: where `through` ends, if it is a prefix of it.
        end = len(through) if through == full[: len(through)] else common_prefix_length(through, full)
        for j in range(start, min(end, len(full))):
            mask[j] = 1
    truncated = len(full) > max_length
    full, mask = full[:max_length], mask[:max_length]
    labels = [t if m else -100 for t, m in zip(full, mask)]
    return Tokenized(full, labels, truncated)


def prompt_text(tokenizer, prompt: list[dict]) -> str:
    """The text a model continues from: the prompt rendered with the generation prompt."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
