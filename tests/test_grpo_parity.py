"""Our GRPO update equals TRL 1.16 GRPOTrainer's on the same batch (issue 18).

One tiny model, one rollout batch (prompts, sampled completions, rewards), one optimizer
update's gradients, computed twice:
- TRL: a real `GRPOTrainer` (PEFT LoRA it wraps itself, beta 0.04) whose `rollout_func` hands
  it our completions; its own `training_step` then scores them with the reward function,
  computes the group advantages, the reference log-probs (adapter disabled) and the loss, and
  back-propagates, once per gradient-accumulation micro-batch;
- ours: `align.rlhf.group` (fixed_logprobs, advantages, accumulate_update) on the same tokens.
Both adapters start from the same non-zero weights, so the policy differs from the reference and
the KL term has a gradient. Loss and every adapter gradient must agree within a relative
tolerance.

Aggregations: ours sequence_mean = TRL "grpo", token_mean = TRL "dapo" (and "bnpo" when an update
is one micro-batch: bnpo takes the token mean per micro-batch), fixed_length = TRL "dr_grpo".
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_overrides

from align.core.config_loader import load_config
from align.stages.grpo import GRPOConfig

PROMPTS = [[{"role": "user", "content": f"Name {i + 2} colours, briefly."}] for i in range(4)]
GROUP = 4
MAX_TOKENS = 12
BETA = 0.04
# Rewards per response (4 groups of 4): a spread group, one with a tie, a flat group (advantage 0), a two-level group.
REWARDS = [1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 0.0, 3.0, 0.7, 0.7, 0.7, 0.7, -1.0, 1.0, -1.0, 1.0]

CASES = [  # (our loss_aggregation, TRL loss_type, micro-batch, gradient accumulation steps, KL bias correction)
    ("sequence_mean", "grpo", 16, 1, True),
    ("sequence_mean", "grpo", 4, 4, True),
    ("sequence_mean", "grpo", 16, 1, False),
    ("token_mean", "dapo", 16, 1, True),
    ("token_mean", "dapo", 8, 2, True),
    ("token_mean", "bnpo", 16, 1, True),
    ("fixed_length", "dr_grpo", 16, 1, True),
    ("fixed_length", "dr_grpo", 4, 4, True),
]


def our_config(model_dir, data, out, aggregation, micro, accumulation, bias_correction=True):
    return load_config(GRPOConfig, None, tiny_overrides(
        model_dir, data, out, tracking="none", rewards=[{"judge": "length"}],
        **{"lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "lora.target_modules": "all-linear",
           "grpo.group_size": GROUP, "grpo.prompts_per_step": len(PROMPTS), "grpo.max_new_tokens": MAX_TOKENS,
           "grpo.kl_coef": BETA, "grpo.kl_estimator": "k3", "grpo.kl_in": "loss", "grpo.kl_bias_correction": bias_correction, "grpo.loss_aggregation": aggregation,
           "grpo.scale_advantages": "group", "train.batch_size": micro, "train.gradient_accumulation_steps": accumulation,
           "train.gradient_checkpointing": False},
    ))


@pytest.fixture(scope="module")
def ours(tiny_model_dir, tiny_data, tmp_path_factory):
    """Our GroupPolicy with a non-zero policy adapter, and one sampled rollout batch of it."""
    from align.modeling import models
    from align.rlhf import group as G

    cfg = our_config(tiny_model_dir, tiny_data["prefs"], tmp_path_factory.mktemp("parity") / "grpo", "sequence_mean", 16, 1)
    base = models.resolve(str(tiny_model_dir))
    gp = G.GroupPolicy(cfg, base, models.load_tokenizer(base, cfg.model), reward_runs={}, answers={})
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in gp.model.named_parameters():
            if ".policy." in name:  # lora_B starts at 0: move both factors so the policy differs from the reference
                p.copy_(torch.randn_like(p) * (0.3 if "lora_B" in name else p.std().item()))
    roll = fixed_lengths(gp, G.rollout(gp, PROMPTS, cfg))
    return gp, roll, tiny_model_dir, tiny_data


def fixed_lengths(gp, roll):
    """The sampled responses cut to lengths 2..12 ending in EOS (a random tiny model rarely ends by itself); one row runs to the limit."""
    from align.modeling.generation import Sampled

    n = roll.mask.size(0)
    lengths = [2 + (5 * i) % (MAX_TOKENS - 1) for i in range(n)]
    lengths[3] = MAX_TOKENS
    eos, pad = gp.tokenizer.eos_token_id, gp.tokenizer.pad_token_id
    response = roll.seq[:, -roll.n_resp :].clone()
    mask = torch.zeros(n, MAX_TOKENS)
    for i, length in enumerate(lengths):
        if i != 3:
            response[i, length - 1] = eos
        response[i, length:] = pad
        mask[i, :length] = 1
    prompt = roll.seq[:, : -roll.n_resp]
    seq = torch.cat([prompt, response], dim=1)
    attn = torch.cat([roll.attn[:, : -roll.n_resp], mask.long()], dim=1)
    has_eos = torch.tensor([i != 3 for i in range(n)])
    return Sampled(roll.prompts, roll.responses, seq, attn, mask, has_eos, MAX_TOKENS)


def our_update(gp, roll, cfg) -> tuple[float, dict[str, torch.Tensor]]:
    from align.rlhf import group as G
    from align.rlhf.estimators import GroupRelative

    n = roll.mask.size(0)
    old_logp, ref_logp = G.fixed_logprobs(gp, roll, cfg, updates=1)
    adv = GroupRelative()(torch.tensor(REWARDS), cfg.grpo.group_size, cfg.grpo.scale_advantages)
    gp.model.train()
    gp.model.zero_grad(set_to_none=True)
    logs = {k: [] for k in ("loss", "policy_loss", "clip_frac", "entropy", "kl_loss_term")}
    G.accumulate_update(gp, cfg, roll, torch.arange(n), adv, old_logp, ref_logp, logs, torch.zeros(n))
    grads = {n.replace(".policy.", "."): p.grad.clone() for n, p in gp.model.named_parameters() if ".policy." in n}
    return sum(logs["loss"]), grads


def trl_update(model_dir, gp, roll, loss_type, micro, accumulation, bias_correction, out) -> tuple[float, dict[str, torch.Tensor]]:
    """One update through TRL's GRPOTrainer.training_step, its rollout being our completions."""
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    from align.modeling.generation import _encode

    tok = gp.tokenizer
    prompt_ids, prompt_attn = _encode(tok, PROMPTS, "cpu")
    lengths = roll.mask.sum(1).long().tolist()
    completions = [roll.seq[i, -roll.n_resp :][: lengths[i]].tolist() for i in range(len(lengths))]

    def rollout_func(prompts, trainer):  # TRL's seam for an external generator: the prompts arrive in our order
        ids = [prompt_ids[i // GROUP][prompt_attn[i // GROUP].bool()].tolist() for i in range(len(prompts))]
        return {"prompt_ids": ids, "completion_ids": completions, "logprobs": None}

    def reward(prompts, completions, **kwargs):
        return list(REWARDS)

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        num_generations=GROUP, max_completion_length=MAX_TOKENS, beta=BETA, loss_type=loss_type, scale_rewards="group",
        use_bias_correction_kl=bias_correction,
        epsilon=0.2, learning_rate=1e-3, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager"), reward_funcs=reward, args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok, peft_config=lora, rollout_func=rollout_func,
    )
    model = trainer.model
    ours_weights = {n.replace(".policy.", ".default."): p for n, p in gp.model.named_parameters() if ".policy." in n}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.copy_(ours_weights[name])
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation  # set by Trainer's loop for each accumulation window
    batch = [{"prompt": p} for p in PROMPTS for _ in range(GROUP)]
    loss = sum(trainer.training_step(model, batch, None).item() for _ in range(accumulation))
    grads = {n.replace(".default.", "."): p.grad.clone() for n, p in model.named_parameters() if ".default." in n}
    return loss, grads


@pytest.mark.parametrize("aggregation, loss_type, micro, accumulation, bias_correction", CASES)
def test_one_update_equals_trl_grpo_trainer(ours, aggregation, loss_type, micro, accumulation, bias_correction, tmp_path):
    gp, roll, model_dir, data = ours
    cfg = our_config(model_dir, data["prefs"], tmp_path / "cfg", aggregation, micro, accumulation, bias_correction)
    our_loss, our_grads = our_update(gp, roll, cfg)
    trl_loss, trl_grads = trl_update(model_dir, gp, roll, loss_type, micro, accumulation, bias_correction, tmp_path / "trl")
    assert our_loss == pytest.approx(trl_loss, rel=1e-4)
    assert set(our_grads) == set(trl_grads) and len(our_grads) > 0
    for name, g in our_grads.items():
        ref = trl_grads[name]
        assert g.norm() > 0, name
        assert (g - ref).norm() <= 1e-4 * ref.norm(), (name, (g - ref).norm().item(), ref.norm().item())
