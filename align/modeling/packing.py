"""Rows that share a prompt: several responses packed after one copy of their prompt, with a block mask.

A DPO pair (align/preference/shared_prefix.py) or a GRPO/RLOO group (align/rlhf/group_rows.py) becomes
one segment of tokens, [shared prompt tokens | response 1 | response 2 | ...]; each response
sees the shared tokens and itself, never another response, and its position ids continue from
the prompt. `segments` says per token which part it is (PAD, SHARED, or response 1, 2, ...),
`seq_ids` which pair or group (several may share a row). The mask is dense (R, 1, L, L) for
eager/sdpa attention or a FlexAttention BlockMask of the same rule.
"""

from __future__ import annotations

import torch

PAD, SHARED = -1, 0  # segment ids; responses are 1, 2, ...


def allowed(segments, seq_ids, q, k):
    """The mask rule, for query/key index tensors that broadcast: causal, within one sequence group
    (`seq_ids`: a DPO pair, a GRPO group), the shared tokens visible to every response, responses
    blind to each other; every token sees itself (so a padding row's softmax is never empty)."""
    sq, sk = segments[..., q], segments[..., k]
    same_group = seq_ids[..., q] == seq_ids[..., k]
    return ((k <= q) & same_group & (sq != PAD) & ((sk == SHARED) | (sk == sq))) | (q == k)


def block_mask(segments: torch.Tensor, seq_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Dense (R, 1, L, L) mask for eager (additive, `dtype`) or sdpa (bool) attention."""
    pos = torch.arange(segments.size(1), device=segments.device)
    ok = allowed(segments, seq_ids, pos[:, None], pos[None, :])[:, None]
    if attn_implementation == "sdpa":
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=segments.device).masked_fill(~ok, torch.finfo(dtype).min)


def flex_block_mask(segments: torch.Tensor, seq_ids: torch.Tensor):
    """FlexAttention BlockMask of the same rule, built from the per-token segment and group ids.

    Fully masked tiles (the other group, the other response, above the diagonal) are skipped by the
    kernel. On CUDA the mask construction is compiled (as transformers does for its own flex
    masks), which evaluates the rule tile by tile instead of materializing an L x L tensor.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return allowed(segments[b], seq_ids[b], q, kv)

    rows, width = segments.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=segments.device, _compile=segments.is_cuda)


def unsupported_reason(model) -> str | None:
    """Why the shared-prefix forward cannot run on this model at all (any attention), or None."""
    text = model.config.get_text_config()
    for scaled in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, scaled, None) not in (None, 1.0):
            return f"the model scales its logits ({scaled})"
    if not hasattr(model, model.base_model_prefix) or model.get_output_embeddings() is None:
        return "the model has no backbone + LM head layout"
    return None


def sliding_window_reason(model, max_length: int | None) -> str | None:
    """Why sliding-window layers make prefix sharing inexact for sequences up to max_length, or None.

    A sliding-window layer lets a token see only the last `window` positions. A shared-prefix
    forward passes one block mask to every layer, with no window in it: the same result as
    one row per sequence only while every sequence fits in the window (Gemma 2 and 3, Phi-3, Mistral v0.1).
    """
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if max_length is not None and max_length <= window:
        return None
    longest = f"max_length {max_length}" if max_length is not None else "no max_length"
    return f"sliding-window attention (window {window}) with {longest}: the shared-prefix block mask has no window"
