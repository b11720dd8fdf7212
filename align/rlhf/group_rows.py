"""The log-prob passes of GRPO and RLOO with each group's prompt computed once.

A rollout holds G responses per prompt as G rows, [left-padded prompt | right-padded response]:
the prompt runs through the model G times, and every row is as wide as the longest prompt plus
the longest response. Here the responses of one prompt share one row,

    [prompt but its last token | last prompt token, response 1 but its last token | last prompt token, response 2 ...]

under a block mask (align.modeling.packing: each part sees the prompt and itself, never another
response) with position ids that continue the prompt's in every part. The last prompt token is
repeated per part because its hidden state predicts that response's first token; a response's
own last token predicts nothing, so it is no input. Every scored token then has exactly the
context and position it has in its own row: the log-probs are the same up to float rounding, on
about P + G * R tokens per group instead of G * (P_max + R_max). The LM head runs on the scored
positions only.

Used where it is exact and the model takes it: eager or sdpa attention (a dense 4D mask), no
logit scaling outside the LM head, no sliding window shorter than the rows, no virtual tokens
(prompt learning). Otherwise `logprobs` runs the plain rows (align.modeling.generation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.modeling.generation import response_logprobs
from align.modeling.packing import PAD, SHARED, block_mask, sliding_window_reason, unsupported_reason

DENSE_ATTENTION = ("eager", "sdpa")


@dataclass
class GroupRows:
    """Packed rows of some responses of a rollout (R rows of width L) and where their log-probs go."""

    input_ids: torch.Tensor  # (R, L)
    position_ids: torch.Tensor  # (R, L)
    segments: torch.Tensor  # (R, L): PAD, SHARED, or 1 + the response's place in its row
    group_ids: torch.Tensor  # (R, L): one id per row (a row holds one prompt's responses), -1 on padding
    scored: torch.Tensor  # (R, L) bool: the position predicts a response token
    targets: torch.Tensor  # (R, L): that token (0 elsewhere)
    index: torch.Tensor  # (B, n_resp): for response b's token t, its place among the scored positions (row-major)
    valid: torch.Tensor  # (B, n_resp) bool: t < response b's length


def pack_groups(seq: torch.Tensor, attn: torch.Tensor, n_resp: int, groups: torch.Tensor, pad_id: int) -> GroupRows:
    """Rows of `seq` ([left-padded prompt | right-padded response], B rows) packed by prompt: `groups[b]`
    names response b's prompt (responses with equal ids share their prompt and one packed row)."""
    n_prompt = seq.size(1) - n_resp
    lengths = attn[:, n_prompt:].sum(1).tolist()
    order: dict[int, list[int]] = {}
    for b, g in enumerate(groups.tolist()):
        order.setdefault(g, []).append(b)
    rows = list(order.values())
    prompts = [seq[r[0], :n_prompt][attn[r[0], :n_prompt].bool()] for r in rows]
    widths = [len(p) - 1 + sum(lengths[b] for b in r) for p, r in zip(prompts, rows)]
    shape, device = (len(rows), max(widths)), seq.device
    ids = torch.full(shape, pad_id, dtype=torch.long, device=device)
    positions = torch.zeros(shape, dtype=torch.long, device=device)
    segments = torch.full(shape, PAD, dtype=torch.long, device=device)
    targets = torch.zeros(shape, dtype=torch.long, device=device)
    flat = torch.zeros((seq.size(0), n_resp), dtype=torch.long, device=device)
    valid = torch.zeros((seq.size(0), n_resp), dtype=torch.bool, device=device)
    for i, (prompt, members) in enumerate(zip(prompts, rows)):
        shared = len(prompt) - 1
        ids[i, :shared], positions[i, :shared], segments[i, :shared] = prompt[:-1], torch.arange(shared, device=device), SHARED
        start = shared
        for part, b in enumerate(members, start=1):
            n = lengths[b]
            response = seq[b, n_prompt : n_prompt + n]
            span = slice(start, start + n)
            ids[i, span] = torch.cat([prompt[-1:], response[:-1]])
            positions[i, span] = torch.arange(shared, shared + n, device=device)
            segments[i, span] = part
            targets[i, span] = response
            flat[b, :n] = i * shape[1] + torch.arange(start, start + n, device=device)
            valid[b, :n] = True
            start += n
    scored = segments > SHARED
    rank = torch.cumsum(scored.flatten(), 0) - 1  # place of each position among the scored ones
    group_ids = torch.where(segments == PAD, -1, torch.arange(len(rows), device=device)[:, None])
    return GroupRows(ids, positions, segments, group_ids, scored, targets, torch.where(valid, rank[flat], 0), valid)


def packing_blocker(model, seq_len: int) -> str | None:
    """Why the packed rows cannot stand for the plain rows of this model (None: they can)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
        return "a prompt-learning adapter prepends virtual tokens"
    attention = plain.config._attn_implementation
    if attention not in DENSE_ATTENTION:
        return f"attention '{attention}' takes no dense 4D mask"
    return unsupported_reason(plain) or sliding_window_reason(plain, seq_len)


def packed_logprobs(model, rows: GroupRows, with_entropy: bool = False):
    """Per-token log-probs (B, n_resp) of the packed responses (0 past each response's end), and
    optionally the entropies (no gradient: they are reported, not optimized)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = getattr(plain, plain.base_model_prefix), plain.get_output_embeddings()
    dtype = head.weight.dtype if head.weight.is_floating_point() else torch.float32
    mask = block_mask(rows.segments, rows.group_ids, plain.config._attn_implementation, dtype)
    hidden = backbone(input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.position_ids, use_cache=False).last_hidden_state
    logp = torch.log_softmax(head(hidden[rows.scored]).float(), dim=-1)
    token = logp.gather(-1, rows.targets[rows.scored][:, None]).squeeze(-1)
    out = token[rows.index] * rows.valid
    if not with_entropy:
        return out
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return out, entropy[rows.index] * rows.valid


def logprobs(model, seq, attn, n_resp: int, groups: torch.Tensor | None, pad_id: int, with_entropy: bool = False):
    """Per-token log-probs of the last n_resp tokens of `seq`: packed by `groups` where the model allows it."""
    if groups is None or packing_blocker(model, seq.size(1)) is not None:
        return response_logprobs(model, seq, attn, n_resp, with_entropy)
    return packed_logprobs(model, pack_groups(seq, attn, n_resp, groups, pad_id), with_entropy)
