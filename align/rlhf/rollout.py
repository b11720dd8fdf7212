"""The rollout seam of the online stages, and a step's rollout gathered from every rank.

Sampling goes through one interface, `RolloutEngine`: `sample(prompts, sampling, row_seeds)` returns
the responses as token ids (align.modeling.generation.Sampled), and `policy_updated()` is called
after every optimizer update. `LocalRollout` samples with the training model itself, through the
shared decoding loop, so its adapters are always current and `policy_updated` has nothing to do.
Another engine (vLLM serving the base, with only the policy adapter sent over after each update)
would implement the same two methods, and no stage would change; it is not built (README, "What is
not here yet").

`gather_rollout` joins the ranks' shares of a step into the step's batch, in prompt order, with
the prompt columns left-padded and the response columns right-padded to the widest share: the
same tensors one process sampling every prompt would hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from align.modeling.generation import Sampled, Sampling, sample_tokens

if TYPE_CHECKING:
    import torch

    from align.rlhf.distributed import World


class RolloutEngine(Protocol):
    def sample(self, prompts: list[list[dict]], sampling: Sampling, row_seeds: list[int]) -> Sampled:
        """k = sampling.num_return_sequences responses per prompt (row i*k + j: sample j of prompt i), each
        drawn with its own seed, so a response does not depend on the batch or process it was drawn in."""
        ...

    def policy_updated(self) -> None:
        """The policy's weights changed (an optimizer update): an engine holding its own copy refreshes it."""
        ...


class LocalRollout:
    """Samples with the training model (its policy adapter active) through the shared decoding loop."""

    def __init__(self, model, tokenizer, activate_policy: Callable[[], None]):
        self.model, self.tokenizer, self.activate_policy = model, tokenizer, activate_policy

    def sample(self, prompts: list[list[dict]], sampling: Sampling, row_seeds: list[int]) -> Sampled:
        self.activate_policy()
        return sample_tokens(self.model, self.tokenizer, prompts, sampling, row_seeds=row_seeds)

    def policy_updated(self) -> None:
        """Nothing to do: the engine samples with the very weights the optimizer updates."""


def gather_rollout(
    world: "World", roll: Sampled, per_row: dict[str, "torch.Tensor"], per_token: dict[str, "torch.Tensor"], pad_id: int
) -> tuple[Sampled, dict[str, "torch.Tensor"]]:
    """Every rank's rollout and tensors joined in rank order, on every rank, on the rollout's device.

    `per_row`: tensors with one entry (or row of entries) per response; `per_token`: [n, n_resp]
    tensors over the response tokens, padded with 0 like the mask. Returns the joined rollout and
    both dicts' tensors in one dict. One process gets its own back.
    """
    if world.size == 1:
        return roll, {**per_row, **per_token}
    import torch

    device = roll.seq.device
    parts = world.gather({"prompts": roll.prompts, "responses": roll.responses, "seq": roll.seq, "attn": roll.attn,
                          "mask": roll.mask, "has_eos": roll.has_eos, "n_resp": roll.n_resp, "rows": per_row, "tokens": per_token})
    width = max(p["seq"].shape[1] - p["n_resp"] for p in parts)  # the widest prompt
    n_resp = max(p["n_resp"] for p in parts)

    def padded(p, name, value):
        """Prompt columns padded on the left to `width`, response columns on the right to `n_resp`."""
        t = p[name]
        prompt, response = t[:, : t.shape[1] - p["n_resp"]], t[:, t.shape[1] - p["n_resp"] :]
        left = torch.full((t.shape[0], width - prompt.shape[1]), value, dtype=t.dtype)
        right = torch.full((t.shape[0], n_resp - response.shape[1]), value, dtype=t.dtype)
        return torch.cat([left, prompt, response, right], dim=1)

    def tokens(t):
        return torch.nn.functional.pad(t, (0, n_resp - t.shape[1]))

    joined = Sampled(
        prompts=[x for p in parts for x in p["prompts"]],
        responses=[x for p in parts for x in p["responses"]],
        seq=torch.cat([padded(p, "seq", pad_id) for p in parts]).to(device),
        attn=torch.cat([padded(p, "attn", 0) for p in parts]).to(device),
        mask=torch.cat([tokens(p["mask"]) for p in parts]).to(device),
        has_eos=torch.cat([p["has_eos"] for p in parts]).to(device),
        n_resp=n_resp,
    )
    out = {k: torch.cat([p["rows"][k] for p in parts]).to(device) for k in per_row}
    out.update({k: torch.cat([tokens(p["tokens"][k]) for p in parts]).to(device) for k in per_token})
    return joined, out
