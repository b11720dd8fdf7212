"""Batched generation from chat prompts: sample tables, on-policy pairs, judges, evaluation, RL rollouts.

One decoding loop (`decode`) serves every caller. Online methods spend most of their time
here, so it does less work than `model.generate` for the same draws:

- each prompt's prefill runs once, and its KV cache is repeated for the k samples
  (`generate(num_return_sequences=k)` runs the prompt k times);
- a response that has ended (EOS) leaves the batch: later steps compute only the rows
  still running (generate keeps computing finished rows until the longest one ends);
- prompts are left-padded with real position ids, and when several batches are needed they
  are formed from prompts of similar length (less padding), results put back in order;
- per step: one forward of the live rows, temperature and top-p on float32 logits, a draw.

Tokens are drawn like `generate` does (float32 logits, temperature, then top-p keeping at
least one token, softmax, `torch.multinomial`, greedy = argmax), so greedy output is the
same, and seeded samples are the same as long as no row ends early (after that, the batch
the random draws are spread over differs). `recipes/bench_generation.py` measures both.

Per-row seeds (`row_seeds`, the online stages): each response row draws from its own generator
(an exponential race, i.e. Gumbel-max over the same temperature / top-p scores), so a response
depends on its seed and its prompt only, not on which other rows share the batch, the process or
when they end. That is what makes a rollout split over N processes equal to one process's.

Prompt- and prefix-tuned PEFT models put virtual tokens in front of the input, which a
plain forward with a cache does not handle: they go through `model.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from align.modeling.templates import prompt_text

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn. The default is greedy decoding."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any end-of-turn token the model's generation config names."""
    eos = model.generation_config.eos_token_id
    extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted({tokenizer.eos_token_id, *extra} - {None})


def position_ids(attention_mask):
    """Positions that count real tokens only (left padding), as generate() uses them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _uses_virtual_tokens(model) -> bool:
    """A PEFT model whose active adapter is prompt or prefix tuning (and is not disabled)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return False
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    # Inside `disable_adapter()` PEFT routes the forward to the plain model: the fast loop applies.
    return bool(config is not None and getattr(config, "is_prompt_learning", False) and not getattr(model, "_adapters_disabled", False))


def _cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 on, `past_key_values` before."""
    import inspect

    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"


def _next_tokens(logits: "torch.Tensor", sampling: Sampling, noise: "torch.Tensor | None" = None) -> "torch.Tensor":
    """One token per row from float32 logits: argmax, or temperature + top-p + a draw: a multinomial one
    from the global generator, or with `noise` (Exp(1) draws, one per row and token) the exponential
    race argmax(log p - log E), which samples the same distribution."""
    import torch

    if not sampling.do_sample:
        return logits.argmax(-1)
    scores = logits / sampling.temperature if sampling.temperature != 1.0 else logits
    if sampling.top_p < 1.0:
        # Drop the least likely tokens whose probabilities sum to at most 1 - top_p; the most likely always stays.
        ordered, order = torch.sort(scores, descending=False)
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        tail[:, -1] = False
        scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    if noise is not None:  # log p differs from the scores by a per-row constant, which leaves the argmax alone
        # A draw of exactly 0 (float rounding) would turn a cut token's -inf into NaN: the smallest positive float instead.
        return (scores - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()).argmax(-1)
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


class RowNoise:
    """Exp(1) noise per response row and step, from one generator per row seeded by `row_seeds`."""

    def __init__(self, row_seeds: list[int], device):
        import torch

        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]

    def draw(self, rows: "torch.Tensor", vocab: int) -> "torch.Tensor":
        """[len(rows), vocab]: the next draws of the generators of output rows `rows`."""
        import torch

        return torch.stack([torch.empty(vocab, device=self.device).exponential_(generator=self.generators[r]) for r in rows.tolist()])


def decode(model, input_ids, attention_mask, sampling: Sampling, eos_ids: list[int], pad_id: int,
           row_seeds: list[int] | None = None) -> "torch.Tensor":
    """New tokens for left-padded prompts: [B * k, max_new_tokens], k = num_return_sequences.

    Rows i*k .. i*k+k-1 answer prompt i. A row holds its tokens up to and including its first
    EOS, then `pad_id`. No gradients; the caller sets eval mode and the seed, or gives one seed
    per output row (`row_seeds`; sampling only).
    """
    import torch

    k, steps = sampling.num_return_sequences, sampling.max_new_tokens
    noise = RowNoise(row_seeds, input_ids.device) if row_seeds is not None and sampling.do_sample else None
    if noise is not None and len(row_seeds) != input_ids.shape[0] * k:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {input_ids.shape[0] * k} response rows")
    if _uses_virtual_tokens(model):
        if noise is not None:
            raise ValueError("row_seeds: prompt- and prefix-tuned models sample through model.generate, which has no per-row seeds")
        kwargs = dict(max_new_tokens=steps, do_sample=sampling.do_sample, num_return_sequences=k, pad_token_id=pad_id, eos_token_id=eos_ids)
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new = out[:, input_ids.shape[1] :]
        return torch.nn.functional.pad(new, (0, steps - new.shape[1]), value=pad_id)

    device = input_ids.device
    cache_keyword = _cache_keyword(model)
    positions = position_ids(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = getattr(out, cache_keyword), out.logits[:, -1].float()
    next_position = positions[:, -1] + 1
    if k > 1:  # the prompt ran once; its cache and next-token logits serve all k samples
        cache.batch_repeat_interleave(k)
        logits, attention_mask, next_position = (t.repeat_interleave(k, dim=0) for t in (logits, attention_mask, next_position))
    del out
    rows = input_ids.shape[0] * k
    tokens = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # which output row each batch row is
    eos = torch.tensor(eos_ids, device=device)
    for step in range(steps):
        chosen = _next_tokens(logits, sampling, noise.draw(live, logits.shape[-1]) if noise is not None else None)
        tokens[live, step] = chosen
        if step == steps - 1:
            break
        ended = torch.isin(chosen, eos)
        if ended.any():  # finished rows leave the batch, and the cache with them
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, chosen, attention_mask, next_position = live[keep], chosen[keep], attention_mask[keep], next_position[keep]
            cache.batch_select_indices(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
            use_cache=True, **{cache_keyword: cache},
        )
        logits = out.logits[:, -1].float()
        next_position = next_position + 1
        del out
    return tokens


def _encode(tokenizer, prompts: list[list[dict]], device):
    """Left-padded token ids of the rendered prompts (the tokenizer's padding side is restored)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    try:
        enc = tokenizer([prompt_text(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _run(model, fn):
    """`fn()` in eval mode without gradients; the model's mode is restored."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.train(was_training)


def _response_lengths(tokens: "torch.Tensor", eos_ids: list[int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(length up to and including the first EOS, or all tokens without one; has_eos) per row."""
    import torch

    n = tokens.shape[1]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, n, dtype=torch.long))
    return torch.where(has_eos, first + 1, first), has_eos


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    sampling: Sampling | None = None,
) -> list[str]:
    """Responses to chat prompts, decoded without special tokens.

    With `sampling.num_return_sequences = k` the result holds k responses per prompt, the
    k of prompt i at positions i*k .. i*k+k-1. `batch_size` counts prompts per forward (each
    with its k samples); with more prompts than that, batches group prompts of similar length.
    """
    import torch

    sampling = sampling or Sampling()
    if max_new_tokens is not None:
        sampling = Sampling(**{**sampling.__dict__, "max_new_tokens": max_new_tokens})
    if not prompts:
        return []
    device = next(model.parameters()).device
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    eos = eos_token_ids(model, tokenizer)
    k = sampling.num_return_sequences
    order = list(range(len(prompts)))
    if len(prompts) > batch_size:  # only then does grouping by length save padding
        lengths = [len(tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts]
        order.sort(key=lambda i: lengths[i])
    texts: list[list[str]] = [[] for _ in prompts]

    def work():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, attn = _encode(tokenizer, [prompts[i] for i in batch], device)
            tokens = decode(model, ids, attn, sampling, eos, tokenizer.pad_token_id)
            lengths, _ = _response_lengths(tokens, eos)
            decoded = tokenizer.batch_decode([t[: int(n)] for t, n in zip(tokens, lengths)], skip_special_tokens=True)
            for j, i in enumerate(batch):
                texts[i] = [t.strip() for t in decoded[j * k : (j + 1) * k]]

    _run(model, work)
    return [t for group in texts for t in group]


@dataclass
class Sampled:
    """Responses drawn from a model, kept as token ids so they can be scored exactly.

    With k samples per prompt, `prompts` repeats each prompt k times (row i*k + j is sample j
    of prompt i), so every field has one entry per response.
    """

    prompts: list[list[dict]]
    responses: list[str]
    seq: "torch.Tensor"  # [B, P + R]: left-padded prompt, then the right-padded response
    attn: "torch.Tensor"
    mask: "torch.Tensor"  # [B, R] float: 1 on generated tokens up to and including the first EOS
    has_eos: "torch.Tensor"  # [B] bool
    n_resp: int


def sample_tokens(model, tokenizer, prompts: list[list[dict]], sampling: Sampling, row_seeds: list[int] | None = None) -> Sampled:
    """One batch of responses (no grad), with the token ids and masks scoring needs.

    `row_seeds`: one seed per response row (prompt i, sample j at i*k + j); see `decode`."""
    import torch

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    ids, attn = _encode(tokenizer, prompts, device)
    eos = eos_token_ids(model, tokenizer)
    response = _run(model, lambda: decode(model, ids, attn, sampling, eos, tokenizer.pad_token_id, row_seeds))
    k = sampling.num_return_sequences
    if k > 1:
        ids, attn = ids.repeat_interleave(k, dim=0), attn.repeat_interleave(k, dim=0)
    # Trim trailing columns no row reached (every row ended early).
    lengths, has_eos = _response_lengths(response, eos)
    n_resp = max(int(lengths.max().item()), 1)
    response = response[:, :n_resp]
    mask = (torch.arange(n_resp, device=device)[None] < lengths[:, None]).long()
    seq = torch.cat([ids, torch.where(mask.bool(), response, tokenizer.pad_token_id)], dim=1)
    attn = torch.cat([attn, mask], dim=1)
    texts = tokenizer.batch_decode([r[: int(n)] for r, n in zip(response, lengths)], skip_special_tokens=True)
    repeated = [p for p in prompts for _ in range(k)]
    return Sampled(repeated, [t.strip() for t in texts], seq, attn, mask.float(), has_eos, n_resp)


def response_logprobs(model, seq, attn, n_resp: int, with_entropy: bool = False):
    """Per-token log-probs of the last n_resp tokens of `seq` (and optionally the entropies)."""
    import torch

    out = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False, logits_to_keep=n_resp + 1)
    logits = out.logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, seq[:, -n_resp:, None]).squeeze(-1)
    if not with_entropy:
        return token_logp
    return token_logp, -(logp.exp() * logp).sum(-1)
