"""Keep the adapter of the best held-out evaluation within a KL budget (`keep_best_within_kl`).

The online stages evaluate the policy on held-out prompts before the first step, every
`train.eval_steps` and at the end: a held-out reward and the KL to the reference. With a budget
set, each evaluation is a candidate; the kept adapter is the candidate with the highest held-out
reward whose KL is at most the budget (ties: the earlier one). It becomes the run's `adapter/`;
the last adapter stays in the checkpoint of the last step. The best so far is written into every
checkpoint (`best.safetensors`, `best.json`), so a resumed run keeps it. The evaluation before
the first step is a candidate too (its KL is 0): a run that only got worse keeps its start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from align.core.files import atomic_write_json

if TYPE_CHECKING:
    import torch

WEIGHTS, META = "best.safetensors", "best.json"  # in a checkpoint folder


def adapter_weights(model, adapter: str) -> dict[str, "torch.Tensor"]:
    """A CPU copy of one adapter's weights, as PEFT saves them."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


class KeepBest:
    """The best evaluation so far within `budget` (None: inactive), and its adapter weights."""

    def __init__(self, budget: float | None, reward_key: str, kl_key: str = "eval/kl", unit: str = "step"):
        self.budget, self.reward_key, self.kl_key, self.unit = budget, reward_key, kl_key, unit
        self.step: int | None = None
        self.reward = self.kl = math.nan
        self.weights: dict[str, "torch.Tensor"] | None = None
        self.last_checkpoint: Path | None = None  # where the last adapter is, once training ended

    @property
    def active(self) -> bool:
        return self.budget is not None

    def offer(self, step: int, metrics: dict, weights: Callable[[], dict[str, "torch.Tensor"]]) -> bool:
        """Keep this evaluation's adapter (`weights()` copies it) if it is the best within the budget so far."""
        if not self.active or self.reward_key not in metrics or self.kl_key not in metrics:
            return False
        reward, kl = float(metrics[self.reward_key]), float(metrics[self.kl_key])
        if not (math.isfinite(reward) and math.isfinite(kl)) or kl > self.budget:
            return False
        if self.step is not None and reward <= self.reward:
            return False
        self.step, self.reward, self.kl, self.weights = step, reward, kl, weights()
        return True

    def restore(self, model, adapter: str) -> None:
        """Load the kept weights into `adapter` of `model` (nothing kept: the model stays as it is)."""
        from peft.utils import set_peft_model_state_dict

        if self.weights is not None:
            set_peft_model_state_dict(model, self.weights, adapter_name=adapter)

    def save(self, folder: Path) -> None:
        """Into a checkpoint being written: the kept weights and what they scored."""
        from safetensors.torch import save_file

        if self.weights is None:
            return
        save_file({k: v.contiguous() for k, v in self.weights.items()}, str(folder / WEIGHTS))
        atomic_write_json(folder / META, {"step": self.step, "reward": self.reward, "kl": self.kl})

    def load(self, folder: Path) -> None:
        """The best so far from a checkpoint (one written before the key was set holds none)."""
        from safetensors.torch import load_file

        if not self.active or not (folder / META).is_file():
            return
        meta = json.loads((folder / META).read_text())
        self.step, self.reward, self.kl = int(meta["step"]), float(meta["reward"]), float(meta["kl"])
        self.weights = load_file(str(folder / WEIGHTS))

    def summary(self) -> dict:
        if not self.active:
            return {}
        return {"kept": {"budget": self.budget, "unit": self.unit, "step": self.step, "reward": self.reward, "kl": self.kl,
                         "last_adapter": str(self.last_checkpoint) if self.last_checkpoint else None}}


def keep_last_then_restore(keep: KeepBest, last: Path, save_last: Callable[[], Path], model, adapter: str) -> None:
    """With a budget: the last adapter is checkpointed in `last` (unless the last step's checkpoint is there
    already; `save_last()` writes it), then the kept adapter is loaded into the model, for adapter/ and
    the end-of-run samples. Every rank calls this."""
    from align.core.checkpoints import COMPLETE
    from align.rlhf.distributed import world

    if not keep.active:
        return
    folder = last
    if not world().broadcast((folder / COMPLETE).is_file()):
        folder = save_last()
    keep.last_checkpoint = folder
    keep.restore(model, adapter)


def kept_line(summary: dict) -> list[str]:
    """The summary line of a run that kept its best adapter."""
    kept = summary.get("kept")
    if not kept:
        return []
    return [f"  adapter/ kept from {kept['unit']} {kept['step']}: held-out reward {kept['reward']:.4g}, KL {kept['kl']:.4g} "
            f"(budget {kept['budget']:g}); the last adapter is in {kept['last_adapter']}"]
