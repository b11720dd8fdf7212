"""How conversations become tokens.

Chat models use their own chat template. Base models without one get the instruction
template (### Instruction / ### Input / ### Response), installed as the tokenizer's
chat template so every later step (TRL's DPO tokenization, generation, the merged
model saved for the next stage) renders conversations the same way.

SFT trains on assistant tokens only. Rather than relying on `{% generation %}`
markers (few templates have them), the assistant spans are found by rendering each
conversation prefix: the tokens an assistant turn adds after the generation prompt
are that turn's span. This works for any template that renders prefixes
consistently, which is what inference relies on anyway; a template that renders the
final assistant turn differently from earlier ones (Qwen3's empty think block) is
handled too.

Some templates have no usable system role: Gemma 2's raises on one, Mistral v0.3's
renders it only when the conversation ends with a user turn (so a prompt and the same
prompt with its answer disagree, and TRL would train on the prompt's text).
`ensure_system_role` detects this by rendering probe conversations and then folds a
leading system message into the first user turn ("{system}\n\n{user}", what Gemma 3's
template does itself), by prefixing the template; the fold travels with the tokenizer
into every later stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from align.core.errors import ModelError

log = logging.getLogger("align")

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
    ensure_system_role(tokenizer, model_name)
    return "model"


# Prefixed to a template without a usable system role. Jinja's top-level `set` rebinds
# `messages` for the rest of the template; the marker makes the fold idempotent.
FOLD_MARKER = "{#- align: a leading system message is folded into the first user turn -#}"
FOLD_SYSTEM = FOLD_MARKER + (
    "{%- if messages|length > 1 and messages[0]['role'] == 'system' and messages[1]['role'] == 'user' "
    "and messages[0]['content'] is string and messages[1]['content'] is string %}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}] + messages[2:] %}"
    "{%- endif %}"
)

_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "Answer briefly.", "Name a colour.", "Blue."


def system_role_problem(tokenizer) -> str | None:
    """Why the chat template cannot take a leading system message as is, or None when it can.

    Probes: the template must render [system, user] and [system, user, assistant], keep the
    system text in both, and render the first as a prefix of the second (what training on a
    prompt and its answer needs). A template that fails these without a system message too
    has another problem, not this one (None).
    """
    from jinja2.exceptions import TemplateError

    system = {"role": "system", "content": _PROBE_SYSTEM}
    user, answer = {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        plain_head, plain_full = render([user], True), render([user, answer], False)
    except TemplateError:
        return None
    if not plain_full.startswith(plain_head):
        return None
    try:
        head, full = render([system, user], True), render([system, user, answer], False)
    except TemplateError as exc:
        return f"rejects a system message ({exc})"
    if _PROBE_SYSTEM not in head or _PROBE_SYSTEM not in full:
        return "drops the system message from some conversations"
    if not full.startswith(head):
        return "renders the system message differently once the answer follows"
    return None


def ensure_system_role(tokenizer, model_name: str) -> str | None:
    """Fold a leading system message into the first user turn where the template cannot take it.

    Returns the problem that made align fold (None when the template is fine). The fold is
    logged once per load and checked: after it, a system message must render consistently.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or template.startswith(FOLD_MARKER):
        return None
    problem = system_role_problem(tokenizer)
    if problem is None:
        return None
    tokenizer.chat_template = FOLD_SYSTEM + template
    if (still := system_role_problem(tokenizer)) is not None:
        tokenizer.chat_template = template
        raise ModelError(f"model '{model_name}': its chat template {problem}, and folding the system message into the first user turn does not fix it ({still})")
    log.info(
        "model '%s': its chat template %s; a leading system message is folded into the first user turn "
        "('<system>\\n\\n<user>', as Gemma 3's template does)", model_name, problem,
    )
    return problem


def folds_system(tokenizer) -> bool:
    """Whether align folded the system message for this tokenizer's template."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and template.startswith(FOLD_MARKER)


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
        if through == full[: len(through)]:
            end = len(through)
        else:
            # The template renders a final assistant turn differently from an earlier one (Qwen3 adds
            # an empty think block to the last turn only): the span is the longest tail of this turn's
            # final rendering that the full rendering continues with at `start`.
            tail = _tail_overlap(through[start:], full[start:])
            end = start + tail if tail else common_prefix_length(through, full)
        for j in range(start, min(end, len(full))):
            mask[j] = 1
    truncated = len(full) > max_length
    full, mask = full[:max_length], mask[:max_length]
    labels = [t if m else -100 for t, m in zip(full, mask)]
    return Tokenized(full, labels, truncated)


def _tail_overlap(turn: list[int], rest: list[int]) -> int:
    """The largest k such that rest[:k] equals the last k tokens of turn (0 if none)."""
    for k in range(min(len(turn), len(rest)), 0, -1):
        if rest[:k] == turn[len(turn) - k :]:
            return k
    return 0


def prompt_text(tokenizer, prompt: list[dict]) -> str:
    """The text a model continues from: the prompt rendered with the generation prompt."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
