"""Prefix sharing for DPO: the prompt is computed once for the chosen and the rejected response.

TRL's collator lays a batch of B pairs out as 2B rows, [prompt + chosen] then [prompt + rejected],
each padded to the longest; the prompt runs through the model twice. Here each pair becomes
one segment of tokens,

    [shared prompt tokens | last prompt token, chosen | last prompt token, rejected]

with a block attention mask: the chosen part sees the shared tokens and itself, the rejected
part the shared tokens and itself, never each other; both restart their position ids where
the prompt ends. The last prompt token is repeated in each part because its hidden state
predicts the first response token, which differs between the two. Every token then sees
exactly the context (and position) it has in TRL's layout, so the log-probs are the same up
to float rounding.

Rows: one pair per row (padded to the widest pair), or padding-free, every pair of the batch
one after the other in a single row; the mask then also keeps pairs apart, and positions
restart at 0 for each pair. The mask is dense (B, 1, L, L) for eager/sdpa attention, or a
FlexAttention BlockMask built from the same rule (segment and pair id per token), which skips
the masked blocks instead of computing them: padding-free only pays with the latter, since a
dense mask over one packed row costs the square of its length.

The rows are built from TRL's own collated batch (same tokens, same truncation; the trainer's
collator adds them under KEY), and the per-token outputs are gathered back into TRL's 2B-row
layout, so TRL's loss code, all its loss types and metrics, run unchanged on them.
"""

from __future__ import annotations

import functools

import torch
from trl.trainer.utils import FusedCausalLMOutput

from align.modeling.packing import PAD, SHARED, block_mask, flex_block_mask, unsupported_reason  # noqa: F401 (re-exported)
from align.modeling.templates import common_prefix_length

CHOSEN, REJECTED = 1, 2  # the two segments after the shared one (PAD, SHARED: align.modeling.packing)
KEY = "shared_prefix"  # the batch entry the patched forward looks for
HEAD_CHUNK = 32768  # vocabulary tile of the log-prob kernel (TRL's own choice)

FLEX = "flex_attention"
DENSE_ATTENTION = ("eager", "sdpa")  # attention implementations that take a dense 4D mask


def pack_pairs(batch: dict[str, torch.Tensor], pad_token_id: int, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Shared-prefix rows from TRL's collated [chosen rows; rejected rows] batch.

    One row per pair, or (padding_free) one row holding every pair. Returns input_ids,
    position_ids, segment_ids (PAD/SHARED/CHOSEN/REJECTED), pair_ids (-1 on padding) and
    shift_labels (R, L'), plus `index` and `valid` (2B, L-1): for each of TRL's per-token
    log-prob positions, where its value lives among the scored packed positions (row-major),
    and whether it is scored at all.
    """
    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n_pairs = ids.size(0) // 2
    pairs = []
    for i in range(n_pairs):
        seqs, firsts = [], []
        for r in (i, n_pairs + i):
            length = int(attn[r].sum())
            seqs.append(ids[r, :length].tolist())
            firsts.append(int(completion[r, :length].nonzero()[0]) if completion[r, :length].any() else length)
        # Shared: tokens common to both rows, up to (not including) the token that predicts the first response token.
        shared = max(0, min(common_prefix_length(*seqs), firsts[0] - 1, firsts[1] - 1))
        pairs.append((seqs, firsts, shared))
    sizes = [len(c) + len(r) - shared for (c, r), _, shared in pairs]
    rows = [list(range(n_pairs))] if padding_free else [[i] for i in range(n_pairs)]

    width = max(sum(sizes[i] for i in row) for row in rows)
    out_len = ids.size(1) - 1
    shape = (len(rows), width)
    packed = torch.full(shape, pad_token_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD, dtype=torch.long)
    pair_ids = torch.full(shape, -1, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    index = torch.zeros((2 * n_pairs, out_len), dtype=torch.long)
    valid = torch.zeros((2 * n_pairs, out_len), dtype=torch.bool)

    for row_i, row in enumerate(rows):
        start = 0
        for i in row:
            seqs, firsts, shared = pairs[i]
            pair_ids[row_i, start : start + sizes[i]] = i
            packed[row_i, start : start + shared] = torch.tensor(seqs[0][:shared], dtype=torch.long)
            positions[row_i, start : start + shared] = torch.arange(shared)
            segments[row_i, start : start + shared] = SHARED
            start += shared
            for side, (seq, first, segment) in enumerate(zip(seqs, firsts, (CHOSEN, REJECTED))):
                n = len(seq) - shared
                span = slice(start, start + n)
                packed[row_i, span] = torch.tensor(seq[shared:], dtype=torch.long)
                positions[row_i, span] = torch.arange(shared, len(seq))
                segments[row_i, span] = segment
                # Position t scores token t+1: response tokens only, as TRL's labels do.
                nxt = torch.tensor(seq[shared + 1 :] + [-100], dtype=torch.long)
                scored = torch.arange(shared + 1, len(seq) + 1) >= first
                scored[-1] = False
                labels[row_i, span] = torch.where(scored, nxt, torch.full_like(nxt, -100))
                # TRL's log-prob position t (scoring token t+1) of this sequence is packed column start + t - shared.
                trl_row = i + side * n_pairs
                t = torch.arange(shared, len(seq) - 1)
                index[trl_row, t] = row_i * width + start + t - shared
                valid[trl_row, t] = scored[: len(t)]
                start += n
    # The LM head runs on the scored positions only, in row-major order: point into that list.
    compact = torch.cumsum((labels != -100).flatten(), 0) - 1
    index = torch.where(valid, compact[index], 0)
    return {
        "input_ids": packed,
        "position_ids": positions,
        "segment_ids": segments,
        "pair_ids": pair_ids,
        "shift_labels": labels,
        "index": index,
        "valid": valid,
    }


def flex_unavailable(model) -> str | None:
    """Why FlexAttention cannot run the shared-prefix rows of this model in training, or None."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return f"the model is on {device.type}; FlexAttention has no backward pass there (CUDA only)"
    if not getattr(model, "_supports_flex_attn", False):
        return f"{type(model).__name__} has no flex_attention support in transformers"
    return None


def choose_attention(model, allow_flex: bool) -> tuple[str | None, str | None]:
    """(attention for the shared-prefix rows or None if none fits, why FlexAttention is not that attention).

    FlexAttention where it runs (a BlockMask, no dense mask); else the model's own attention if it
    takes a dense 4D mask (eager, sdpa). Flash attention takes neither.
    """
    flex_why = flex_unavailable(model) if allow_flex else "dpo.flex_attention is false"
    if flex_why is None:
        return FLEX, None
    current = model.config._attn_implementation
    if current in DENSE_ATTENTION:
        return current, flex_why
    return None, f"attention '{current}' takes no dense 4D mask, and FlexAttention is out ({flex_why})"


def patch_forward(model, outputs: tuple[str, ...]) -> None:
    """Let `model(..., shared_prefix=...)` run the shared-prefix layout and return TRL's fields.

    `model` is the causal LM TRL gave a fused LM head (inside PEFT: the base model, whose
    layers carry the adapters). The backbone runs on the packed rows under the mask its
    attention implementation takes at call time (BlockMask for flex_attention, dense for
    eager/sdpa); the LM head projects only the scored positions, through TRL's chunked log-prob
    kernel (no full-vocabulary logits). The result has TRL's 2B-row layout, zero where TRL's
    labels are -100. Without KEY, the forward is the one it was (generation is unchanged).
    """
    from trl.kernels import ChunkedLogProbFunction

    previous = model.forward
    extras = tuple(name for name in outputs if name != "log_probs")

    @functools.wraps(previous)
    def forward(*args, shared_prefix=None, **kwargs):
        if shared_prefix is None:
            return previous(*args, **kwargs)
        packed = shared_prefix
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=packed["input_ids"],
            attention_mask=_mask_for(model, packed),
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


def _mask_for(model, packed: dict):
    """The mask the model's current attention takes, built once per batch (policy and reference share it)."""
    attn = model.config._attn_implementation
    key = f"_mask_{attn}"
    if key not in packed:
        if attn == FLEX:
            packed[key] = flex_block_mask(packed["segment_ids"], packed["pair_ids"])
        elif attn in DENSE_ATTENTION:
            packed[key] = block_mask(packed["segment_ids"], packed["pair_ids"], attn, model.get_input_embeddings().weight.dtype)
        else:
            raise RuntimeError(f"shared-prefix rows need flex_attention, eager or sdpa attention; the model runs '{attn}'")
    return packed[key]
