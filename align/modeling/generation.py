"""Batched generation from chat prompts (sample tables, on-policy pairs, judges, evaluation)."""

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
    k of prompt i at positions i*k .. i*k+k-1.
    """
    import torch

    sampling = sampling or Sampling()
    if max_new_tokens is not None:
        sampling = Sampling(**{**sampling.__dict__, "max_new_tokens": max_new_tokens})
    if not prompts:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        num_return_sequences=sampling.num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
    )
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, **kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            responses.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return responses


@dataclass
class Sampled:
    """Responses drawn from a model, kept as token ids so they can be scored exactly."""

    prompts: list[list[dict]]
    responses: list[str]
    seq: "torch.Tensor"  # [B, P + R]: left-padded prompt, then the right-padded response
    attn: "torch.Tensor"
    mask: "torch.Tensor"  # [B, R] float: 1 on generated tokens up to and including the first EOS
    has_eos: "torch.Tensor"  # [B] bool
    n_resp: int


def sample_tokens(model, tokenizer, prompts: list[list[dict]], sampling: Sampling) -> Sampled:
    """One batch of responses (no grad), with the token ids and masks scoring needs."""
    import torch

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([prompt_text(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    enc = enc.to(device)
    eos = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    try:
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
    finally:
        model.train(was_training)
    response = out[:, enc["input_ids"].shape[1] :]
    n_resp = response.shape[1]
    is_eos = torch.isin(response, torch.tensor(eos, device=device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, n_resp, dtype=torch.long))
    lengths = torch.where(has_eos, first_eos + 1, first_eos)
    mask = (torch.arange(n_resp, device=device)[None] < lengths[:, None]).long()
    seq = torch.cat([enc["input_ids"], torch.where(mask.bool(), response, tokenizer.pad_token_id)], dim=1)
    attn = torch.cat([enc["attention_mask"], mask], dim=1)
    texts = [tokenizer.decode(r[: int(n)], skip_special_tokens=True).strip() for r, n in zip(response, lengths)]
    return Sampled(prompts, texts, seq, attn, mask.float(), has_eos, n_resp)


def position_ids(attention_mask):
    """Positions that count real tokens only (left padding), as generate() uses them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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
