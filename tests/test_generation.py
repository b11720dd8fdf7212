"""Generation from chat prompts: greedy is deterministic, sampling returns k responses per prompt."""

from __future__ import annotations

import pytest
import torch

from align.modeling import models
from align.core.config import ModelConfig
from align.modeling.generation import Sampling, generate

PROMPTS = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three, please."}]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    ref = models.resolve(str(tiny_model_dir))
    return models.load_model(ref, ModelConfig(), device="cpu"), models.load_tokenizer(ref, ModelConfig())


def test_greedy_is_deterministic_and_batch_independent(tiny):
    model, tok = tiny
    both = generate(model, tok, PROMPTS, max_new_tokens=6)
    assert len(both) == 2
    assert generate(model, tok, PROMPTS[1:], max_new_tokens=6) == both[1:]  # left padding does not change results
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=1) == both
    assert tok.padding_side == "right", "the tokenizer's padding side is restored"


def test_sampling_returns_k_per_prompt_and_is_seeded(tiny):
    model, tok = tiny
    s = Sampling(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, num_return_sequences=3, seed=7)
    first = generate(model, tok, PROMPTS, sampling=s)
    assert len(first) == 6
    assert generate(model, tok, PROMPTS, sampling=s) == first
    assert len(set(first[:3])) > 1, "a random tiny model sampled at T=1 gives distinct responses"


def _hf(model, tok, prompts, **kwargs):
    """What the shared path replaced: transformers' generate on the same left-padded batch."""
    import torch

    from align.modeling.generation import _encode, eos_token_ids

    ids, attn = _encode(tok, prompts, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos_token_ids(model, tok), **kwargs)
    return ids, out[:, ids.shape[1]:]


def _ours(model, tok, prompts, sampling):
    import torch

    from align.modeling.generation import _encode, decode, eos_token_ids

    ids, attn = _encode(tok, prompts, "cpu")
    with torch.no_grad():
        return decode(model, ids, attn, sampling, eos_token_ids(model, tok), tok.pad_token_id)


def _same(ours, theirs, pad):
    """Equal token for token; generate stops at the longest row, ours pads to max_new_tokens."""
    import torch

    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == pad).all()


@pytest.fixture(scope="module")
def peaked(tiny):
    """A tiny random Llama with larger weights: its greedy answers vary by prompt and step
    (the conftest model's are one repeated token), so rows can be made to end at different steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2, attn_implementation="eager",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def test_greedy_equals_transformers_generate_with_rows_ending_early(peaked):
    model, tok = peaked
    prompts = PROMPTS + [[{"role": "user", "content": "Name a colour and a fruit."}]]
    _, plain = _hf(model, tok, prompts, max_new_tokens=10, do_sample=False)
    # End-of-turn tokens that row 0 says at step 3 and row 1 at step 6: rows end at different
    # steps and leave the batch while the others go on.
    stops = [int(plain[0, 2]), int(plain[1, 5])]
    model.generation_config.eos_token_id = [tok.eos_token_id, *stops]
    try:
        _check_greedy(model, tok, prompts, stops)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id


def _check_greedy(model, tok, prompts, stops):
    _, theirs = _hf(model, tok, prompts, max_new_tokens=10, do_sample=False)
    ends = [int(torch.isin(row, torch.tensor(stops)).int().argmax()) if torch.isin(row, torch.tensor(stops)).any() else None
            for row in theirs]
    assert ends[0] is not None and ends[1] is not None and ends[0] != ends[1] and ends[2] is None, ends
    ours = _ours(model, tok, prompts, Sampling(max_new_tokens=10))
    _same(ours, theirs, tok.pad_token_id)
    for k in (1, 3):  # k identical greedy answers per prompt
        texts = generate(model, tok, prompts, sampling=Sampling(max_new_tokens=10, num_return_sequences=k))
        assert texts == [t for t in generate(model, tok, prompts, max_new_tokens=10) for _ in range(k)]
    # Several batches (grouped by prompt length) give the same answers, in the prompts' order.
    assert generate(model, tok, prompts, max_new_tokens=10, batch_size=1) == generate(model, tok, prompts, max_new_tokens=10)


def test_seeded_samples_equal_transformers_generate_while_no_row_ends(peaked):
    """Prefill once + cache repeated k times draws what generate(num_return_sequences=k) draws."""
    model, tok = peaked
    s = Sampling(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(11)
    _, theirs = _hf(model, tok, PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=0,
                    num_return_sequences=3)
    assert theirs.shape == (6, 8) and not torch.isin(theirs, torch.tensor([tok.eos_token_id])).any()
    torch.manual_seed(11)
    ours = _ours(model, tok, PROMPTS, s)
    assert torch.equal(ours, theirs)


def test_sample_tokens_repeats_prompts_and_masks_after_eos(tiny):
    from align.modeling.generation import sample_tokens

    model, tok = tiny
    drawn = sample_tokens(model, tok, PROMPTS, Sampling(max_new_tokens=5, do_sample=True, num_return_sequences=2, seed=3))
    assert drawn.prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert drawn.seq.shape[0] == 4 and drawn.mask.shape == (4, drawn.n_resp) and len(drawn.responses) == 4
    assert drawn.attn[:, -drawn.n_resp:].float().equal(drawn.mask)


def test_row_seeded_samples_do_not_depend_on_the_batch_they_are_drawn_in(tiny):
    """A response drawn with its own seed is the same alone, in another batch, in another order and with
    rows ending early around it: what makes a rollout on N processes equal one process's."""
    from align.modeling.generation import sample_tokens

    model, tok = tiny
    prompts = PROMPTS + [[{"role": "user", "content": "Name a colour."}]]
    s = Sampling(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.9, num_return_sequences=2)
    seeds = [11, 12, 21, 22, 31, 32]
    together = sample_tokens(model, tok, prompts, s, row_seeds=seeds).responses
    assert len(set(together)) > 3
    assert sample_tokens(model, tok, prompts[1:2], s, row_seeds=seeds[2:4]).responses == together[2:4]
    assert sample_tokens(model, tok, prompts[::-1], s, row_seeds=seeds[4:] + seeds[2:4] + seeds[:2]).responses == \
        together[4:] + together[2:4] + together[:2]
    torch.manual_seed(123)  # the global generator plays no part
    assert sample_tokens(model, tok, prompts, s, row_seeds=seeds).responses == together
    assert sample_tokens(model, tok, prompts, s, row_seeds=[s + 100 for s in seeds]).responses != together
    with pytest.raises(ValueError, match="row_seeds: 2 seeds for 6 response rows"):
        sample_tokens(model, tok, prompts, s, row_seeds=seeds[:2])


def test_the_row_seeded_draw_samples_the_temperature_and_top_p_distribution():
    """The exponential race over the scores draws each token with its softmax probability, inside top-p only."""
    from align.modeling.generation import RowNoise, _next_tokens

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    s = Sampling(do_sample=True, temperature=0.7, top_p=0.9)
    noise = RowNoise(list(range(20000)), "cpu").draw(torch.arange(20000), 5)
    drawn = torch.bincount(_next_tokens(logits, s, noise), minlength=5).float() / 20000
    probs = (logits[0] / 0.7).softmax(-1)
    kept = probs.cumsum(0) - probs < 0.9  # the nucleus: tokens whose preceding mass is below top-p
    expected = torch.where(kept, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    assert drawn[~kept].sum() == 0
    assert torch.allclose(drawn, expected, atol=0.015), (drawn, expected)  # 20000 draws: std of a share <= 0.0035
