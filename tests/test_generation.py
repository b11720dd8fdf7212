"""Generation from chat prompts: greedy is deterministic, sampling returns k responses per prompt."""

from __future__ import annotations

import pytest

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
