"""TRL's DPOTrainer with our fast path: prefix sharing and a reference log-prob cache.

TRL stays in charge of the data preparation, the losses, the metrics, checkpointing and
distribution. Two things change:
- the batch also carries the shared-prefix rows (align/preference/shared_prefix.py), and the model
  forward runs them: each pair's prompt is computed once, and the LM head projects only
  response positions. On CUDA the rows run under FlexAttention (a block-sparse mask, all
  pairs of a micro-batch in one unpadded row): train/evaluate/predict switch the model to the
  planned attention and back, so generation keeps the attention the model was loaded with;
- the reference log-probs come from an on-disk cache (align/preference/ref_cache.py), computed for a
  batch the first time one of its pairs is missing. TRL then reads them from the batch, as
  it does with its own `precompute_ref_log_probs`.
Each part is used where it applies; `plan` says which (and under which attention: FlexAttention
on CUDA, a dense mask elsewhere) and, for what is off, why.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import DPOTrainer

from align.preference import ref_cache, shared_prefix
from align.modeling.packing import sliding_window_reason

log = logging.getLogger("align")

ROW_KEYS = "ref_cache_digests"  # batch entry with each pair's cache digest (not a model input)

# PEFT methods whose adapters rewrite the model inputs (virtual tokens), not the layers.
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")


@dataclass
class FastPath:
    shared_prefix: bool
    ref_cache: bool
    why_not: dict[str, str]  # part -> reason it is off
    attention: str | None = None  # of the shared-prefix rows; None = the model's own
    padding_free: bool = False  # all pairs of a micro-batch in one row

    def describe(self) -> str:
        on = []
        if self.shared_prefix:
            how = [self.attention or "model attention"] + (["padding-free"] if self.padding_free else [])
            on.append(f"shared_prefix ({', '.join(how)})")
        if self.ref_cache:
            on.append("ref_cache")
        off = [f"{p} off: {why}" for p, why in self.why_not.items()]
        return "; ".join([f"DPO fast path: {', '.join(on) or 'none'}", *off])


def plan(options, method: str, model, max_length: int | None = None) -> FastPath:
    """Which fast-path parts run for this config and model, and why the others do not.

    Prefix sharing needs an adapter that works inside the layers and a model whose logits are the
    plain LM head (shared_prefix_blocker); its rows then run under FlexAttention where it can
    (CUDA, a model with flex support: a BlockMask, no dense mask), else under the model's own
    eager/sdpa attention with a dense mask. Padding-free rows only with FlexAttention.
    `max_length` is the longest sequence a batch can hold (train.max_length): prefix sharing is
    exact on sliding-window attention only while no sequence outgrows the window.
    """
    why_not = {}
    attention, padding_free = None, False
    blocker = shared_prefix_blocker(options.shared_prefix, method, model, max_length)
    if blocker is None:
        attention, flex_why = shared_prefix.choose_attention(model, options.flex_attention)
        if attention is None:
            blocker = flex_why
        elif flex_why and options.flex_attention:
            why_not["flex_attention"] = flex_why
    if blocker is not None:
        why_not["shared_prefix"] = blocker
    elif options.padding_free and attention == shared_prefix.FLEX:
        padding_free = True
    elif options.padding_free:
        why_not["padding_free"] = "needs flex_attention (a dense mask over one packed row costs its length squared)"
    cache = options.ref_cache
    if not cache:
        why_not["ref_cache"] = "dpo.ref_cache is false"
    return FastPath(blocker is None, cache, why_not, attention, padding_free)


def shared_prefix_blocker(wanted: bool, method: str, model, max_length: int | None = None, section: str = "dpo") -> str | None:
    """Why prefix sharing cannot run for this config and model (the first reason found), or None.

    `wanted`: the stage's <section>.shared_prefix (DPO, and the reference-free SimPO/CPO/ORPO).
    """
    if not wanted:
        return f"{section}.shared_prefix is false"
    if method in PROMPT_LEARNING:
        return f"{method} prepends virtual tokens to every row"
    return shared_prefix.unsupported_reason(model) or sliding_window_reason(model, max_length)


class Collator:
    """TRL's collator, plus the shared-prefix rows and the cache digests where used."""

    def __init__(self, trl_collator, pad_token_id: int, fast: FastPath, digests: bool):
        self.trl_collator, self.pad_token_id, self.fast, self.digests = trl_collator, pad_token_id, fast, digests

    def __call__(self, examples):
        batch = self.trl_collator(examples)
        if self.digests:
            batch[ROW_KEYS] = ref_cache.pair_digests(batch)
        if self.fast.shared_prefix:
            batch[shared_prefix.KEY] = shared_prefix.pack_pairs(batch, self.pad_token_id, self.fast.padding_free)
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
            shared_prefix.patch_forward(self._policy(), outputs)
            if self.ref_model is not None:
                shared_prefix.patch_forward(self.ref_model, ("log_probs",))
        self.data_collator = Collator(
            self.data_collator,
            getattr(self.data_collator, "pad_token_id", None) or 0,
            fast_path,
            self.ref_cache is not None,
        )
        if self.ref_cache is not None:
            self.precompute_ref_logps = True  # TRL reads ref_chosen_logps/ref_rejected_logps from the batch
            self.add_callback(_FlushCache(self.ref_cache))
        log.info(fast_path.describe())

    def _policy(self):
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    @contextlib.contextmanager
    def _fast_path_attention(self):
        """Run the shared-prefix rows under the planned attention, and only while training or evaluating.

        Outside (generation by the stage, saving), the model keeps the attention it was loaded with.
        """
        wanted = self.fast_path.attention if self.fast_path.shared_prefix else None
        models = [m for m in (self._policy(), self.ref_model) if m is not None]
        before = [m.config._attn_implementation for m in models]
        if wanted is None or all(b == wanted for b in before):
            yield
            return
        for m in models:
            m.set_attn_implementation(wanted)
        try:
            yield
        finally:
            for m, b in zip(models, before):
                m.set_attn_implementation(b)

    def train(self, *args, **kwargs):
        with self._fast_path_attention():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._fast_path_attention():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._fast_path_attention():
            return super().predict(*args, **kwargs)

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
