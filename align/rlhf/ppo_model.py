"""PPO's model side: one base in memory with three adapters, and the forward passes PPO needs.

  policy  trainable LoRA: samples responses, is optimized (attached as every online policy is, align/rlhf/policy.py)
  value   trainable LoRA + a scalar value head on its hidden states
  reward  frozen LoRA + score head, loaded from the reward RunDir
and the reference is the base with adapters disabled. No second copy of the model.
`cfg` below is the PPO stage's config (its `ppo` and `train` sections).
"""

from __future__ import annotations

import torch

from align.core.artifacts import RunDir
from align.core.errors import DataError
from align.modeling.adapters import attach_adapter, load_frozen_adapter
from align.modeling.generation import Sampled, Sampling, eos_token_ids, position_ids, response_logprobs
from align.modeling.scoring import score_conversations
from align.rlhf.policy import attach_policy
from align.rlhf.rollout import LocalRollout

VALUE = "value"  # RunDir folder of the value adapter and head


class ValueHead(torch.nn.Module):
    """hidden state -> scalar value estimate."""

    def __init__(self, hidden_size: int, init_std: float):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=init_std) if init_std > 0 else torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


class PolicyValueReward:
    """The base with its three adapters, and the forward passes PPO needs."""

    def __init__(self, cfg, base, reward_run: RunDir, tokenizer):
        self.tokenizer = tokenizer
        self.model = attach_policy(cfg, base, "policy")
        attach_adapter(self.model, cfg, "value", reference=False)
        _, head = load_frozen_adapter(self.model, reward_run.adapter_dir, "reward")
        if head is None:
            raise DataError(f"reward_run: {reward_run.path}/adapter has no score head; is it a reward run?")
        device = next(self.model.parameters()).device
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        compute_dtype = torch.float32 if dtype == torch.uint8 else dtype
        self.score_head = head.to(device=device, dtype=compute_dtype)
        plain = self.model.get_base_model()
        self.value_head = ValueHead(plain.config.hidden_size, cfg.ppo.value_head_init_std).to(device=device, dtype=compute_dtype)
        self.backbone = getattr(plain, plain.base_model_prefix)
        self.eos_ids = eos_token_ids(self.model, tokenizer)
        self.use("policy")
        self.engine = LocalRollout(self.model, tokenizer, lambda: self.use("policy"))

    # -- adapters --------------------------------------------------------------

    def use(self, adapter: str) -> None:
        """Activate one adapter; PEFT freezes the others on a switch, so re-enable the trainable ones."""
        self.model.set_adapter(adapter)
        self.model.base_model.set_requires_grad(["policy", "value"], True)
        self.model.base_model.set_requires_grad("reward", False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        adapters = [p for n, p in self.model.named_parameters() if ".policy." in n or ".value." in n]
        return adapters + list(self.value_head.parameters())

    # -- forward passes --------------------------------------------------------

    def logprobs(self, seq: torch.Tensor, attn: torch.Tensor, n_resp: int, with_entropy: bool = False):
        """Log-probs of the response tokens (last n_resp positions) under the active adapter (or none)."""
        return response_logprobs(self.model, seq, attn, n_resp, with_entropy)

    def values(self, seq: torch.Tensor, attn: torch.Tensor, n_resp: int) -> torch.Tensor:
        """V(s_t) for each response token t: the value head on the hidden state before it."""
        hidden = self.backbone(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).last_hidden_state
        return self.value_head(hidden[:, -n_resp - 1 : -1]).float()

    @torch.no_grad()
    def scores(self, conversations: list[list[dict]]) -> torch.Tensor:
        """Reward-model scores of whole conversations, rendered exactly as the reward stage trained on them."""
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout while scoring
        self.use("reward")
        try:
            return score_conversations(self.backbone, self.score_head, self.tokenizer, conversations)
        finally:
            self.use("policy")
            self.model.train(was_training)


def sample(pvr: PolicyValueReward, prompts: list[list[dict]], cfg, seeds: list[int]) -> Sampled:
    """One response per prompt from the policy adapter, response i drawn with seed `seeds[i]`."""
    p = cfg.ppo
    sampling = Sampling(max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.temperature, top_p=p.top_p)
    return pvr.engine.sample(prompts, sampling, seeds)
