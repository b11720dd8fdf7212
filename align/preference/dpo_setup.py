"""Building the DPO trainer from a stage config: shared by the DPO stage and the online DPO stage.

`cfg` is a stage config with a `dpo:` section (align.preference.dpo_options.DPOOptions), `peft:` and `model:`.
The HF/TRL arguments every stage shares (batch, schedule, logging, ...) come in as `base_args`
(align.modeling.train_setup.trainer_kwargs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.core.data import Splits

log = logging.getLogger("align")


def pair_converter(tokenizer, max_length: int):
    """`convert(row) -> (example or None, truncated)` for preference rows (align.core.examples.to_datasets).

    Rows whose prompt alone fills max_length are dropped (TRL would drop them silently); rows
    longer than max_length are kept and truncated (responses cut at the end); both are counted.
    """
    from align.modeling.templates import chat_ids

    def convert(row):
        if len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)) >= max_length:
            return None, False
        longest = max(len(chat_ids(tokenizer, row["prompt"] + row["chosen"])), len(chat_ids(tokenizer, row["prompt"] + row["rejected"])))
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, longest > max_length

    return convert


DROP_REASON = "prompt alone fills max_length"


def reference_cache(cfg, model, device: str, attention: str | None = None):
    """The reference cache for this base model, quantization, precision and attention kernel.

    `attention`: the kernel the reference runs under (the fast path's; default the model's own).
    Kernels round differently, and the step-0 invariant (reference = policy) is exact only when the
    cached reference ran under the policy's kernel.
    """
    from align.core.tracking import process_rank
    from align.preference.ref_cache import RefLogpCache
    from align.preference.ref_cache import default_dir as default_cache_dir
    from align.modeling.lora_init import reference_start_key
    from align.modeling.models import ModelRef, content_hash, resolve_dtype

    location = model.name_or_path
    base = ModelRef(location, location, Path(location).is_dir(), cfg.model.revision)
    key = {
        "base": content_hash(base),
        "quantization": cfg.model.quantization,
        "dtype": str(resolve_dtype(cfg.model.dtype, device)),
        "device": device.split(":")[0],
        "attention": attention or model.config._attn_implementation,
    }
    if cfg.dpo.ld_alpha is not None:  # LD-DPO weights the reference's tail tokens: other values
        key["ld_alpha"] = cfg.dpo.ld_alpha
    key.update(reference_start_key(cfg))  # LoftQ: the reference is the 4-bit base plus the adapter's start
    directory = Path(cfg.dpo.ref_cache_dir) if cfg.dpo.ref_cache_dir else default_cache_dir()
    return RefLogpCache(directory, key, rank=process_rank())


def dpo_trainer(cfg, model, tokenizer, train_ds, eval_ds, base_args: dict, callbacks=(), peft_config=None):
    """An AlignDPOTrainer for `model`.

    - a plain model with `peft_config`: TRL attaches a fresh adapter; the reference is the model
      with the adapter disabled;
    - a plain model without one (full fine-tuning): the reference is a frozen copy of the weights;
    - a PEFT model (online DPO, round after round): the adapter keeps training, and the reference
      stays the base with adapters disabled. TRL would copy the current adapter into a "ref"
      adapter and use that as the reference; that adapter is removed again here.
    """
    import copy

    from accelerate.utils import is_peft_model
    from trl import DPOConfig as TRLDPOConfig

    from align.preference.dpo_options import describe_loss, trl_loss_args
    from align.preference.dpo_trainer import AlignDPOTrainer, plan

    plain = model.get_base_model() if is_peft_model(model) else model
    device = str(next(model.parameters()).device)
    args = TRLDPOConfig(
        **base_args,
        **trl_loss_args(cfg.dpo),
        truncation_mode="keep_start",
        dataset_num_proc=None,
    )
    log.info("%s loss: %s", cfg.stage, describe_loss(cfg.dpo))
    fast = plan(cfg.dpo, cfg.peft.method, plain, max_length=cfg.train.max_length)
    cache = reference_cache(cfg, plain, device, fast.attention) if fast.ref_cache else None
    ref_model = None  # the reference is this model with the adapter disabled
    if peft_config is None and not is_peft_model(model):  # full fine-tuning: a frozen copy of the starting weights
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = AlignDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
        fast_path=fast,
        cache=cache,
    )
    if is_peft_model(model):
        if "ref" in trainer.model.peft_config:
            trainer.model.delete_adapter("ref")
        # Only the active adapter trains: other adapters of the model (a reward model's) stay frozen,
        # whatever adding and deleting adapters did to their flags. The optimizer is built in train().
        active = trainer.model.active_adapter
        for name, param in trainer.model.named_parameters():
            param.requires_grad_(f".{active}." in name)
    return trainer


def fast_path_summary(trainer) -> dict:
    """What the fast path did: which parts ran, and how often the reference came from the cache."""
    out = {"dpo_fast_path": trainer.fast_path.describe()}
    if trainer.ref_cache is not None:
        out.update(ref_cache_hits=trainer.ref_cache.hits, ref_cache_misses=trainer.ref_cache.misses)
    return out


def preference_datasets(splits: Splits, tokenizer, max_length: int, stage: str):
    """Preference rows as datasets; rows cut or dropped by max_length are counted."""
    from align.core.examples import to_datasets

    return to_datasets(splits, pair_converter(tokenizer, max_length), stage, max_length, DROP_REASON)
