"""Prefix sharing for DPO: the prompt is computed once for the chosen and the rejected response.

TRL's collator lays a batch of B pairs out as 2B rows, [prompt + chosen] then [prompt + rejected],
each padded to the longest; the prompt runs through the model twice. Here each pair becomes
one row,

    [shared prompt tokens | last prompt token, chosen | last prompt token, rejected | padding]

with a block attention mask: the chosen segment sees the shared tokens and itself, the rejected
segment the shared tokens and itself, never each other; both segments restart their position
ids where the prompt ends. The last prompt token is repeated in each segment because its
hidden state predicts the first response token, which differs between the two. Every token
then sees exactly the context (and position) it has in TRL's layout, so the log-probs are the
same up to float rounding.

The row is built from TRL's own collated batch (same tokens, same truncation; the trainer's
collator adds it under KEY), and the per-token outputs are gathered back into TRL's 2B-row layout, so TRL's loss code, all its loss
types and metrics, run unchanged on them.
"""

from __future__ import annotations

import functools

import torch
from trl.trainer.utils import FusedCausalLMOutput

from align.modeling.templates import common_prefix_length

PAD, SHARED, CHOSEN, REJECTED = -1, 0, 1, 2
KEY = "shared_prefix"  # the batch entry the patched forward looks for
HEAD_CHUNK = 32768  # vocabulary tile of the log-prob kernel (TRL's own choice)

# Attention implementations that take an arbitrary 4D mask.
SUPPORTED_ATTENTION = ("eager", "sdpa")


def pack_pairs(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One shared-prefix row per pair from TRL's collated [chosen rows; rejected rows] batch.

    Returns input_ids, position_ids, segment_ids and shift_labels (B, L'), plus `index` and
    `valid` (2B, L-1): for each of TRL's per-token log-prob positions, where its value lives
    among the scored packed positions (row-major), and whether it is scored at all.
    """
    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n_pairs = ids.size(0) // 2
    rows = []
    for i in range(n_pairs):
        seqs, firsts = [], []
        for r in (i, n_pairs + i):
            length = int(attn[r].sum())
            seqs.append(ids[r, :length].tolist())
            firsts.append(int(completion[r, :length].nonzero()[0]) if completion[r, :length].any() else length)
        # Shared: tokens common to both rows, up to (not including) the token that predicts the first response token.
        shared = max(0, min(common_prefix_length(*seqs), firsts[0] - 1, firsts[1] - 1))
        rows.append((seqs, firsts, shared))

    width = max(len(c) + len(r) - shared for (c, r), _, shared in rows)
    out_len = ids.size(1) - 1
    packed = torch.full((n_pairs, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((n_pairs, width), dtype=torch.long)
    segments = torch.full((n_pairs, width), PAD, dtype=torch.long)
    labels = torch.full((n_pairs, width), -100, dtype=torch.long)
    index = torch.zeros((2 * n_pairs, out_len), dtype=torch.long)
    valid = torch.zeros((2 * n_pairs, out_len), dtype=torch.bool)

    for i, (seqs, firsts, shared) in enumerate(rows):
        packed[i, :shared] = torch.tensor(seqs[0][:shared], dtype=torch.long)
        positions[i, :shared] = torch.arange(shared)
        segments[i, :shared] = SHARED
        start = shared
        for side, (seq, first, segment) in enumerate(zip(seqs, firsts, (CHOSEN, REJECTED))):
            n = len(seq) - shared
            span = slice(start, start + n)
            packed[i, span] = torch.tensor(seq[shared:], dtype=torch.long)
            positions[i, span] = torch.arange(shared, len(seq))
            segments[i, span] = segment
            # Position t scores token t+1: response tokens only, as TRL's labels do.
            nxt = torch.tensor(seq[shared + 1 :] + [-100], dtype=torch.long)
            scored = torch.arange(shared + 1, len(seq) + 1) >= first
            scored[-1] = False
            labels[i, span] = torch.where(scored, nxt, torch.full_like(nxt, -100))
            # TRL's log-prob position t (scoring token t+1) of this row is packed position start + t - shared.
            row = i + side * n_pairs
            t = torch.arange(shared, len(seq) - 1)
            index[row, t] = i * width + start + t - shared
            valid[row, t] = scored[: len(t)]
            start += n
    # The LM head runs on the scored positions only, in row-major order: point into that list.
    compact = torch.cumsum((labels != -100).flatten(), 0) - 1
    index = torch.where(valid, compact[index], 0)
    return {
        "input_ids": packed,
        "position_ids": positions,
        "segment_ids": segments,
        "shift_labels": labels,
        "index": index,
        "valid": valid,
    }


def block_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) mask: causal, shared tokens visible to all, chosen and rejected blind to each other.

    Padding positions attend to themselves only, so no softmax row is empty (no NaN).
    """
    width = segments.size(1)
    pos = torch.arange(width, device=segments.device)
    causal = pos[:, None] >= pos[None, :]
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (q != PAD) & ((k == SHARED) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def unsupported_reason(model) -> str | None:
    """Why the shared-prefix forward cannot run on this model, or None."""
    attn = model.config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        return f"attention '{attn}' takes no custom 4D mask (needs one of {', '.join(SUPPORTED_ATTENTION)})"
    text = model.config.get_text_config()
    for scaled in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, scaled, None) not in (None, 1.0):
            return f"the model scales its logits ({scaled})"
    if not hasattr(model, model.base_model_prefix) or model.get_output_embeddings() is None:
        return "the model has no backbone + LM head layout"
    return None


def patch_forward(model, outputs: tuple[str, ...]) -> None:
    """Let `model(..., shared_prefix=...)` run the shared-prefix layout and return TRL's fields.

    `model` is the causal LM TRL gave a fused LM head (inside PEFT: the base model, whose
    layers carry the adapters). The backbone runs on the packed rows; the LM head projects
    only the scored positions, through TRL's chunked log-prob kernel (no full-vocabulary
    logits). The result has TRL's 2B-row layout, zero where TRL's labels are -100. Without
    KEY, the forward is the one it was (generation is unchanged).
    """
    from trl.kernels import ChunkedLogProbFunction

    previous = model.forward
    attn = model.config._attn_implementation
    mask_dtype = model.get_input_embeddings().weight.dtype
    extras = tuple(name for name in outputs if name != "log_probs")

    @functools.wraps(previous)
    def forward(*args, shared_prefix=None, **kwargs):
        if shared_prefix is None:
            return previous(*args, **kwargs)
        packed = shared_prefix
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=packed["input_ids"],
            attention_mask=block_mask(packed["segment_ids"], attn, mask_dtype),
            position_ids=packed["position_ids"],
            use_cache=False,
        ).last_hidden_state
        labels = packed["shift_labels"]
        scored = labels != -100
        head = model.get_output_embeddings()
        fields = ChunkedLogProbFunction.apply(
            hidden[scored], head.weight, head.bias, labels[scored], 1.0, HEAD_CHUNK, None, 1.0, extras
        )
        index, valid = packed["index"], packed["valid"]

        def to_trl_layout(x):
            if x is None:
                return None
            gathered = x[index]
            return gathered & valid if x.dtype == torch.bool else gathered * valid

        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (to_trl_layout(x) for x in fields)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / valid.sum().clamp(min=1),
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=valid,
        )

    model.forward = forward
