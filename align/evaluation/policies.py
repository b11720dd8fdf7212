"""The policies an evaluation compares, as adapters of one shared base in memory.

All policies of a pipeline share one base (the merged SFT model): the SFT policy is the
base itself, DPO and PPO are adapters on it, and so is the reward model. So one base is
loaded and each policy is an adapter switched on in turn; the reference for KL is the
base with adapters off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.core.artifacts import RunDir
from align.core.errors import ConfigError


def policy_source(name: str, run: RunDir) -> tuple[str, Path | None]:
    """(base model location, adapter folder or None) of a run's policy."""
    m = run.manifest() or {}
    if (run.merged_dir / "config.json").is_file():
        return str(run.merged_dir.resolve()), None
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"runs.{name}: {run.path} has neither merged/ nor adapter/")
    return str(Path(m["base_model"]["location"]).resolve()), run.adapter_dir


def shared_base(runs: dict[str, RunDir], reward: RunDir | None) -> str:
    """The one base every policy (and the reward model) is an adapter of; a ConfigError naming them otherwise."""
    bases = {base for base, _ in (policy_source(name, run) for name, run in runs.items())}
    if reward is not None:
        bases.add(str(Path((reward.manifest() or {})["base_model"]["location"]).resolve()))
    if len(bases) != 1:
        raise ConfigError(f"runs: the policies must share one base (the merged SFT model); found {sorted(bases)}")
    return bases.pop()


@dataclass
class Policies:
    """One base carrying every policy's adapter (and the reward adapter), with switches between them."""

    model: Any  # a PeftModel, or the plain base when no policy has an adapter and there is no reward model
    tokenizer: Any
    adapters: dict[str, str | None]  # policy name -> its adapter's name in the model (None: the base itself)
    score_head: Any | None  # the reward model's head; its adapter is named "reward"

    def policy(self, name: str):
        """A context in which `name`'s policy is active: its adapter on, or every adapter off for the base."""
        if self.adapters[name] is None:
            return self.reference()
        self.model.set_adapter(self.adapters[name])
        return contextlib.nullcontext()

    def reference(self):
        """A context in which the base runs alone (the KL reference)."""
        return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()

    def reward_scores(self, conversations: list[list[dict]], batch_size: int) -> list[float] | None:
        """Reward-model scores (None without a reward model)."""
        if self.score_head is None:
            return None
        from align.modeling.scoring import score_conversations

        self.model.set_adapter("reward")
        base = self.model.get_base_model()
        backbone = getattr(base, base.base_model_prefix)
        return score_conversations(backbone, self.score_head, self.tokenizer, conversations, batch_size).tolist()


def check_adapter_types(runs: dict[str, RunDir], reward: RunDir | None) -> None:
    """The policies' adapters (and the reward model's) are of one PEFT type: one base holds them all.
    Reads adapter_config.json only, so an evaluation checks it before it writes anything."""
    from align.modeling.adapters import peft_type

    sources = {name: policy_source(name, run) for name, run in runs.items()}
    kinds = {name: peft_type(path) for name, (_, path) in sources.items() if path is not None}
    if reward is not None:
        kinds["reward_run"] = peft_type(reward.adapter_dir)
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
        raise ConfigError(f"runs: {listing}: one shared base holds adapters of a single PEFT type; evaluate each type separately")


def load_policies(runs: dict[str, RunDir], reward: RunDir | None, model_cfg) -> Policies:
    """One base with every policy (and the reward model) as a named adapter."""
    from peft import PeftModel

    from align.modeling import models
    from align.modeling.adapters import load_frozen_adapter

    sources = {name: policy_source(name, run) for name, run in runs.items()}
    location = shared_base(runs, reward)
    base_ref = models.ModelRef(location, location, True)
    tokenizer = models.load_tokenizer(base_ref, model_cfg)
    model = models.load_model(base_ref, model_cfg)
    adapters = {name: path for name, (_, path) in sources.items() if path is not None}
    # Adapter names of their own: PEFT refuses dots in them, and a policy may be called "reward" or
    # "beta=0.1_lr=0.0003" (a sweep run).
    adapter_names = {name: f"policy_{i}" for i, name in enumerate(adapters)}
    check_adapter_types(runs, reward)
    for name, path in adapters.items():
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_names[name])
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_names[name])
    head = None
    if reward is not None:
        model, head = load_frozen_adapter(model, reward.adapter_dir, "reward")
        head = head.to(next(model.parameters()).device)
    model.eval()
    return Policies(model, tokenizer, {name: adapter_names.get(name) for name in sources}, head)


def run_beta(run: RunDir, key: str | None) -> float | None:
    """The beta a run trained with, for its implicit reward: the dotted `key` of its resolved config (its stage
    record's beta_key: dpo.beta for DPO and online DPO, kto.beta for KTO); None without one."""
    if key is None:
        return None
    value = run.config()
    try:
        for part in key.split("."):
            value = value[part]
        return float(value)
    except (KeyError, TypeError, ValueError):
        return None
