"""TRL's DPOTrainer with our fast path: prefix sharing and a reference log-prob cache.

TRL stays in charge of the data preparation, the losses, the metrics, checkpointing and
distribution. Two things change:
- the batch also carries the shared-prefix layout (align/dpo/shared_prefix.py), and the model
  forward runs it: each pair's prompt is computed once, and the LM head projects only
  response positions;
- the reference log-probs come from an on-disk cache (align/dpo/ref_cache.py), computed for a
  batch the first time one of its pairs is missing. TRL then reads them from the batch, as
  it does with its own `precompute_ref_log_probs`.
Each part is used where it applies; `plan` says which and, for what is off, why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import DPOTrainer

from align.dpo import ref_cache, shared_prefix

log = logging.getLogger("align")

ROW_KEYS = "ref_cache_digests"  # batch entry with each pair's cache digest (not a model input)

# PEFT methods whose adapters rewrite the model inputs (virtual tokens), not the layers.
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")


@dataclass
class FastPath:
    shared_prefix: bool
    ref_cache: bool
    why_not: dict[str, str]  # part -> reason it is off

    def describe(self) -> str:
        on = [p for p in ("shared_prefix", "ref_cache") if getattr(self, p)]
        off = [f"{p} off: {why}" for p, why in self.why_not.items()]
        return "; ".join([f"DPO fast path: {', '.join(on) or 'none'}", *off])


def sharing_off_reason(wanted: bool, method: str, model, section: str = "dpo") -> str | None:
    """Why prefix sharing does not run for this config and model, or None when it does."""
    if not wanted:
        return f"{section}.shared_prefix is false"
    if method in PROMPT_LEARNING:
        return f"{method} prepends virtual tokens to every row"
    return shared_prefix.unsupported_reason(model)


def plan(options, method: str, model) -> FastPath:
    """Which fast-path parts run for this config and model, and why the others do not."""
    why_not = {}
    if (reason := sharing_off_reason(options.shared_prefix, method, model)) is not None:
        why_not["shared_prefix"] = reason
    cache = options.ref_cache
    if not cache:
        why_not["ref_cache"] = "dpo.ref_cache is false"
    return FastPath(shared_prefix=reason is None, ref_cache=cache, why_not=why_not)


class Collator:
    """TRL's collator, plus the shared-prefix layout and the cache digests where used."""

    def __init__(self, trl_collator, pad_token_id: int, share: bool, digests: bool):
        self.trl_collator, self.pad_token_id, self.share, self.digests = trl_collator, pad_token_id, share, digests

    def __call__(self, examples):
        batch = self.trl_collator(examples)
        if self.digests:
            batch[ROW_KEYS] = ref_cache.pair_digests(batch)
        if self.share:
            batch[shared_prefix.KEY] = shared_prefix.pack_pairs(batch, self.pad_token_id)
        return batch


class _FlushCache(TrainerCallback):
    def __init__(self, cache: ref_cache.RefLogpCache):
        self.cache = cache

    def on_save(self, args, state, control, **kwargs):
        self.cache.flush()

    def on_evaluate(self, args, state, control, **kwargs):
        self.cache.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.cache.flush()


class AlignDPOTrainer(DPOTrainer):
    def __init__(self, *args, fast_path: FastPath, cache: ref_cache.RefLogpCache | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast_path = fast_path
        self.ref_cache = cache if fast_path.ref_cache else None
        if fast_path.shared_prefix:
            outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
                ("log_sum_sq_probs",) if self.use_weighting else ()
            )
            policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
            shared_prefix.patch_forward(policy, outputs)
            if self.ref_model is not None:
                shared_prefix.patch_forward(self.ref_model, ("log_probs",))
        self.data_collator = Collator(
            self.data_collator,
            getattr(self.data_collator, "pad_token_id", None) or 0,
            fast_path.shared_prefix,
            self.ref_cache is not None,
        )
        if self.ref_cache is not None:
            self.precompute_ref_logps = True  # TRL reads ref_chosen_logps/ref_rejected_logps from the batch
            self.add_callback(_FlushCache(self.ref_cache))
        log.info(fast_path.describe())

    def _compute_loss(self, model, inputs, return_outputs):
        digests = inputs.pop(ROW_KEYS, None)
        if self.ref_cache is not None:
            inputs = {**inputs, **self._reference_logps(inputs, digests)}
        return super()._compute_loss(model, inputs, return_outputs)

    def _reference_logps(self, inputs, digests) -> dict[str, torch.Tensor]:
        cached = self.ref_cache.lookup(digests)
        if cached is None:
            reference = self.ref_model if self.ref_model is not None else self.model
            chosen, rejected = self.compute_ref_log_probs(reference, inputs)
            self.ref_cache.add(digests, chosen.detach().float().cpu(), rejected.detach().float().cpu())
        else:
            device = inputs["input_ids"].device
            chosen, rejected = (t.to(device) for t in cached)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
