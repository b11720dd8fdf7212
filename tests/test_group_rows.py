"""GRPO/RLOO log-probs with each group's prompt computed once equal the plain rows' (align/rlhf/group_rows.py).

A tiny model with a LoRA adapter moved off zero, prompts of different lengths (left padding),
responses of different lengths (some cut by EOS, one at the limit): the packed pass must give
the plain pass's per-token log-probs and, through a weighted sum, the same adapter gradients;
for whole groups and for a micro-batch holding parts of groups, under eager and sdpa attention.
"""

from __future__ import annotations

import pytest
import torch

from align.modeling.generation import Sampling, response_logprobs, sample_tokens
from align.rlhf import group_rows

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "List three colours of the rainbow and say which one you like best, in one line."}],
    [{"role": "user", "content": "What is 2 plus 2?"}],
]
GROUP = 3
MAX_TOKENS = 9


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def policy(request, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    roll = sample_tokens(model, tok, PROMPTS, Sampling(max_new_tokens=MAX_TOKENS, do_sample=True, num_return_sequences=GROUP, seed=0))
    # Varied lengths ending in EOS (a random model rarely ends by itself), one row at the limit.
    lengths = [1, 4, 9, 2, 9, 5, 7, 3, 6]
    n_prompt = roll.seq.size(1) - roll.n_resp
    seq, attn = roll.seq.clone(), roll.attn.clone()
    for b, n in enumerate(lengths):
        if n < MAX_TOKENS:
            seq[b, n_prompt + n - 1] = tok.eos_token_id
        seq[b, n_prompt + n :] = tok.pad_token_id
        attn[b, n_prompt + n :] = 0
    assert len(set(attn[:, :n_prompt].sum(1).tolist())) == len(PROMPTS), "prompts of different lengths: left padding"
    return model, tok, seq, attn, roll.n_resp


def _adapter_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("rows", [list(range(9)), [0, 2, 3, 4, 8]], ids=["whole-groups", "parts-of-groups"])
def test_packed_logprobs_and_gradients_equal_the_plain_rows(policy, rows):
    model, tok, seq, attn, n_resp = policy
    rows = torch.tensor(rows)
    seq, attn = seq[rows], attn[rows]
    mask = attn[:, -n_resp:].float()
    assert group_rows.packing_blocker(model, seq.size(1)) is None
    model.train()
    plain, plain_entropy = response_logprobs(model, seq, attn, n_resp, with_entropy=True)
    weights = torch.linspace(-1.0, 2.0, mask.numel()).view_as(mask)
    (plain * mask * weights).sum().backward()
    want = _adapter_grads(model)
    packed_rows = group_rows.pack_groups(seq, attn, n_resp, rows // GROUP, tok.pad_token_id)
    assert packed_rows.input_ids.size(0) == len(set((rows // GROUP).tolist()))
    assert packed_rows.input_ids.numel() < seq.numel(), "fewer tokens than the plain rows"
    packed, packed_entropy = group_rows.packed_logprobs(model, packed_rows, with_entropy=True)
    torch.testing.assert_close(packed * mask, plain * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_entropy * mask, (plain_entropy * mask).detach(), rtol=1e-5, atol=1e-5)
    assert not packed_entropy.requires_grad
    (packed * mask * weights).sum().backward()
    got = _adapter_grads(model)
    assert set(got) == set(want) and len(got) > 0
    for name, g in want.items():
        assert (got[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name
    with model.disable_adapter():  # the reference pass, the same way
        torch.testing.assert_close(group_rows.logprobs(model, seq, attn, n_resp, rows // GROUP, tok.pad_token_id) * mask,
                                   response_logprobs(model, seq, attn, n_resp) * mask, rtol=1e-5, atol=1e-5)


def test_models_packing_cannot_stand_for_run_the_plain_rows(policy):
    model, tok, seq, attn, n_resp = policy
    plain = model.get_base_model()
    saved = plain.config._attn_implementation
    plain.config._attn_implementation = "flash_attention_2"
    try:
        assert "takes no dense 4D mask" in group_rows.packing_blocker(model, seq.size(1))
    finally:
        plain.config._attn_implementation = saved
    plain.config.sliding_window = 4
    try:
        assert "sliding-window" in group_rows.packing_blocker(model, seq.size(1))
    finally:
        plain.config.sliding_window = None
    plain.config.final_logit_softcapping = 30.0
    try:
        assert "scales its logits" in group_rows.packing_blocker(model, seq.size(1))
        with torch.no_grad():  # and the log-probs are then the plain rows' exactly
            torch.testing.assert_close(group_rows.logprobs(model, seq, attn, n_resp, torch.arange(9) // GROUP, tok.pad_token_id),
                                       response_logprobs(model, seq, attn, n_resp), rtol=0, atol=0)
    finally:
        plain.config.final_logit_softcapping = None
