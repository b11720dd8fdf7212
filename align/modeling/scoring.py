"""Reward scoring, reward statistics and batched sequence log-probs: one implementation of each.

The reward stage, PPO, evaluation and the reward-model judge all score conversations here, so
a score means the same everywhere: the score head applied to the hidden state of the last
non-padding token of the conversation rendered with the chat template (how transformers'
sequence classifiers pool, and what RewardTrainer trains).
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

from align.modeling.templates import chat_ids, common_prefix_length

if TYPE_CHECKING:
    import torch

    from align.core.artifacts import RunDir

STATS = "reward_stats.json"  # in a reward RunDir: mean and std of its scores, for PPO's normalization


def pad_batch(sequences: list[list[int]], pad_id: int, device) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded (input_ids, attention_mask) of token id lists."""
    import torch

    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    return input_ids, attention


def reward_model_parts(model) -> tuple["torch.nn.Module", "torch.nn.Module"]:
    """(backbone, score head) of a sequence-classification model, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.score


def score_conversations(backbone, head, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> "torch.Tensor":
    """Float32 scores of whole conversations: the head on the last non-padding token's hidden state.

    No gradients; the caller chooses the adapter (and eval mode) the backbone runs with.
    """
    import torch

    device = next(head.parameters()).device
    dtype = next(head.parameters()).dtype
    out = []
    with torch.no_grad():
        for start in range(0, len(conversations), batch_size):
            ids = [chat_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
            input_ids, attention = pad_batch(ids, tokenizer.pad_token_id, device)
            hidden = backbone(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
            # The last token that is not the pad id, as transformers' sequence classifiers (and so
            # RewardTrainer) pool: where the template's final token is the pad id, the one before it.
            non_pad = (input_ids != tokenizer.pad_token_id).int()
            last = (torch.arange(input_ids.size(1), device=device) * non_pad).argmax(-1)
            picked = hidden[torch.arange(len(ids), device=device), last]
            out.append(head(picked.to(dtype)).squeeze(-1).float())
    return torch.cat(out) if out else torch.zeros(0)


def score_with_model(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
    """`score_conversations` with a (PEFT) sequence-classification reward model, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        backbone, head = reward_model_parts(model)
        return score_conversations(backbone, head, tokenizer, conversations, batch_size).tolist()
    finally:
        model.train(was_training)


def normalization_stats(scores: list[float]) -> dict:
    """Mean and (sample) std of reward scores."""
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1)) ** 0.5
    return {"mean": mean, "std": std, "n": len(scores)}


def stats_sample(rows: list[dict], n: int, seed: int) -> list[list[dict]]:
    """A seeded sample of n training conversations (chosen and rejected alike) to compute the stats on."""
    responses = [row["prompt"] + row[side] for row in rows for side in ("chosen", "rejected")]
    return random.Random(seed).sample(responses, min(n, len(responses)))


def read_stats(run: "RunDir") -> dict:
    """The normalization stats a reward run saved."""
    return json.loads((run.path / STATS).read_text())


def check_reward_files(run: "RunDir", where: str, need_stats: bool, stats_hint: str) -> None:
    """A reward run's adapter holds its score head and, when scores are normalized, its stats are readable:
    checked before a stage that scores with it writes anything. `stats_hint` says how to do without the stats."""
    from safetensors import safe_open

    from align.core.errors import DataError

    weights = run.adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - missing, truncated or not safetensors
        raise DataError(f"{where}: cannot read {weights} ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not any(k.endswith("score.weight") for k in keys):
        raise DataError(f"{where}: {weights} has no score head; is {run.path} a reward-model run?")
    if not need_stats:
        return
    try:
        stats = read_stats(run)
        if not all(isinstance(stats.get(k), (int, float)) for k in ("mean", "std")):
            raise ValueError("no numeric mean and std")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{where}: cannot read {run.path / STATS} ({type(exc).__name__}: {exc}); {stats_hint}") from None


def completion_logprobs(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]], batch_size: int) -> list[float]:
    """Summed log-prob of each completion after its prompt (the implicit-reward building block).

    The completion's tokens are those after the rendered prompt with its generation prompt.
    """
    import torch

    out: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            head = chat_ids(tokenizer, prompt, add_generation_prompt=True)
            full = chat_ids(tokenizer, prompt + completion)
            rows.append((full, common_prefix_length(head, full)))
        ids, attn = pad_batch([full for full, _ in rows], tokenizer.pad_token_id, device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (full, start_at) in enumerate(rows):
            out.append(logp[i, start_at - 1 : len(full) - 1].sum().item())
    return out
