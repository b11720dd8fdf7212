"""DPO stage: TRL's DPOTrainer on a frozen base with a fresh adapter (LoRA by default).

The reference model is the policy with its adapter disabled: TRL wraps the base
with our `peft_config` and, given no `ref_model`, runs the reference forward under
`disable_adapter()`. No second copy of the base exists. With `parent_run`, the base
is the SFT stage's merged model, so the reference *is* the SFT model: at step 0
the loss is ln 2 and both rewards are 0.

Per method (align/modeling/methods.py): lora, qlora, dora, vera and ia3 start with no effect, so
the same holds. prompt_tuning and prefix_tuning disable to the base too, but their
virtual tokens change the policy from step 0 (the step-0 loss is not ln 2). `full` has
no adapter: the reference is a frozen copy of the starting weights, one more copy of
the model in memory (no gradients or optimizer state for it). A full run writes the
trained model to merged/ instead of adapter/.

Speed (align/dpo/trainer.py): each pair's prompt is computed once for both responses (under
FlexAttention on CUDA, all pairs of a micro-batch in one unpadded row), and reference log-probs
are cached on disk and reused across epochs, runs and sweeps. All are on by default and switch
themselves off, with a log line, where they cannot run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.core.config import ChildStageConfig, opt
from align.modeling.methods import resolve_method
from align.stages.registry import Stage, fmt, prepare_config, register, training_checks

log = logging.getLogger("align")

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down")


@dataclass
class DPOOptions:
    beta: float = opt(0.1, "Strength of the pull towards the reference (the SFT model).", gt=0)
    loss_type: Literal[DPO_LOSS_TYPES] = opt("sigmoid", "DPO loss: sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO), ...")  # type: ignore[valid-type]
    label_smoothing: float = opt(0.0, "Assumed share of flipped labels (conservative/robust DPO).", min=0, lt=0.5)
    shared_prefix: bool = opt(
        True,
        "Compute each pair's prompt once for chosen and rejected (block attention mask); off, or where it "
        "cannot run (prompt/prefix tuning, logit-scaling models), the batch is TRL's two rows per pair.",
    )
    flex_attention: bool = opt(
        True,
        "On CUDA, run the shared-prefix rows under FlexAttention (a block-sparse mask, whatever attention the "
        "model was loaded with); false, or on the CPU, a dense 4D mask under eager/sdpa attention.",
    )
    padding_free: bool = opt(
        True,
        "With FlexAttention, put all pairs of a micro-batch into one row (no padding; positions restart per "
        "pair, pairs masked from each other); false = one row per pair, padded to the widest.",
    )
    ref_cache: bool = opt(
        True,
        "Keep reference log-probs on disk, keyed by base model, precision and each pair's tokens; "
        "later epochs, runs and sweeps skip the reference forward.",
    )
    ref_cache_dir: str | None = opt(
        None, "Where the reference cache lives; null = $ALIGN_REF_CACHE_DIR or ~/.cache/align/ref-logps."
    )


@dataclass
class DPOConfig(ChildStageConfig):
    """Direct preference optimization on chosen/rejected pairs; the reference is the base with the adapter disabled."""

    dpo: DPOOptions = opt(DPOOptions, "DPO-specific options.")

    stage = "dpo"




def prepare(splits, tokenizer, max_length: int):
    """Preference rows as datasets, dropping (and counting) rows whose prompt alone fills max_length.

    TRL would drop those silently; rows longer than max_length are kept and truncated
    (responses cut at the end), and counted too.
    """
    from align.modeling.templates import chat_ids
    from align.stages.common import to_datasets

    def convert(row):
        if len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)) >= max_length:
            return None, False
        longest = max(len(chat_ids(tokenizer, row["prompt"] + row["chosen"])), len(chat_ids(tokenizer, row["prompt"] + row["rejected"])))
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, longest > max_length

    return to_datasets(splits, convert, "dpo", max_length, "prompt alone fills max_length")


def reference_cache(cfg: DPOConfig, model, device: str, attention: str | None = None):
    """The reference cache for this base model, quantization, precision and attention kernel.

    `attention`: the kernel the reference runs under (the fast path's; default the model's own).
    Kernels round differently, and the step-0 invariant (reference = policy) is exact only when the
    cached reference ran under the policy's kernel.
    """
    from align.core.tracking import process_rank
    from align.dpo.ref_cache import RefLogpCache
    from align.dpo.ref_cache import default_dir as default_cache_dir
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
    directory = Path(cfg.dpo.ref_cache_dir) if cfg.dpo.ref_cache_dir else default_cache_dir()
    return RefLogpCache(directory, key, rank=process_rank())


def build_trainer(cfg: DPOConfig, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
    import copy

    from trl import DPOConfig as TRLDPOConfig

    from align.dpo.trainer import AlignDPOTrainer, plan
    from align.modeling.adapters import peft_config_for
    from align.stages.common import trainer_kwargs

    device = str(next(model.parameters()).device)
    args = TRLDPOConfig(
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        label_smoothing=cfg.dpo.label_smoothing,
        truncation_mode="keep_start",
        dataset_num_proc=None,
    )
    peft_config = peft_config_for(cfg, base_location=model.name_or_path)
    fast = plan(cfg.dpo, cfg.peft.method, model, max_length=cfg.train.max_length)
    cache = reference_cache(cfg, model, device, fast.attention) if fast.ref_cache else None
    ref_model = None  # the reference is this model with the adapter disabled
    if peft_config is None:  # full fine-tuning: a frozen copy of the starting weights
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    return AlignDPOTrainer(
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


def fast_path_summary(trainer) -> dict:
    """What the fast path did: which parts ran, and how often the reference came from the cache."""
    out = {"dpo_fast_path": trainer.fast_path.describe()}
    if trainer.ref_cache is not None:
        out.update(ref_cache_hits=trainer.ref_cache.hits, ref_cache_misses=trainer.ref_cache.misses)
    return out


_EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def run(cfg: DPOConfig, *, force: bool = False, callbacks=()):
    from align.stages.common import held_out_summary, open_stage, train_adapter

    cfg = prepare_config(cfg)
    stage = open_stage(cfg, "preference", force)
    if stage.skipped:
        return stage.run_dir
    with stage:
        trained = train_adapter(stage, prepare=prepare, build_trainer=build_trainer, before_label="reference", callbacks=callbacks)
        summary = {**held_out_summary(trained, _EVAL_KEYS), **trained.summary, **fast_path_summary(trained.trainer)}
        saved = {"merged": "merged"} if cfg.peft.method == "full" else {"adapter": "adapter"}
        stage.finish(summary=summary, outputs={**saved, "samples": "samples.jsonl"})
    return stage.run_dir


def summary_lines(s: dict) -> list[str]:
    return [
        "  held-out DPO reward accuracy: "
        f"{fmt(s.get('eval_rewards/accuracies_before'))} (step 0) -> {fmt(s.get('eval_rewards/accuracies_after'))}; "
        f"margin {fmt(s.get('eval_rewards/margins_before'))} -> {fmt(s.get('eval_rewards/margins_after'))}"
    ]


register(Stage("dpo", DPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method))
