"""Batched generation from chat prompts (sample tables, on-policy pairs, judges, evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

from align.templates import prompt_text


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
