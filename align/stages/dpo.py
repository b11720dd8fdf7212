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

Losses: every loss option of TRL 1.16's DPOConfig (the 15 loss types, weighted mixtures, RPO,
WPO, LD-DPO, f-divergences); align/dpo/options.py checks their ranges and combinations and maps
them to TRL's arguments. The step-0 rewards are 0 for all of them; the step-0 loss is each
formula's value at zero log-ratios (ln 2 for sigmoid).

Speed (align/dpo/trainer.py): each pair's prompt is computed once for both responses, and
reference log-probs are cached on disk and reused across epochs, runs and sweeps. Both are
on by default and switch themselves off, with a log line, where they cannot run. Every loss
option runs on them (the shared-prefix forward returns TRL's per-token layout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.core.config import ChildStageConfig, opt
from align.dpo import options
from align.modeling.methods import resolve_method
from align.stages.registry import Stage, fmt, prepare_config, register, training_checks

log = logging.getLogger("align")

DPO_LOSS_TYPES = options.DPO_LOSS_TYPES
LossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]


@dataclass
class DPOOptions:
    beta: float = opt(0.1, "Strength of the pull towards the reference (the SFT model), > 0. For ipo it is IPO's tau.")
    loss_type: LossType | list[LossType] = opt(  # type: ignore[valid-type]
        "sigmoid",
        "DPO loss, or a list of them summed with loss_weights (e.g. MPO: [sigmoid, bco_pair, sft]): sigmoid (DPO), "
        "hinge (SLiC), ipo, exo_pair, nca_pair, robust (rDPO), bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
        "apo_down, discopop, sft (NLL of chosen), sigmoid_norm (length-normalized DPO). Each name once.",
    )
    loss_weights: list[float] | None = opt(
        None, "One weight per loss_type, each >= 0 and one > 0; null = 1 each."
    )
    rpo_alpha: float | None = opt(
        None, "RPO: add rpo_alpha * NLL of the chosen response (TRL's 'sft' loss) to the preference loss, > 0; "
        "null = off. Not with 'sft' in loss_type (the same term).",
    )
    label_smoothing: float = opt(
        0.0, "Assumed share of flipped labels, in [0, 0.5): robust (rDPO), exo_pair (epsilon, needs > 0), aot, "
        "aot_unpaired; the other losses ignore it, so a value > 0 with them is refused.",
    )
    use_weighting: bool = opt(
        False, "WPO: weight each pair by the policy's length-normalized probability of both responses. Not with aot/aot_unpaired."
    )
    ld_alpha: float | None = opt(
        None, "LD-DPO, in [0, 1]: response tokens past the shorter response's length count with this weight "
        "(1 = plain DPO, 0 = only the shared length); null = off.",
    )
    f_divergence_type: Literal[options.F_DIVERGENCES] = opt(  # type: ignore[valid-type]
        "reverse_kl", "f-DPO regularizer: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence; a non-default "
        "value only with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.",
    )
    f_alpha_divergence_coef: float = opt(
        options.DEFAULT_F_ALPHA, "alpha of f_divergence_type alpha_divergence, in (0, 1] (1 = reverse KL); only with it."
    )
    discopop_tau: float = opt(
        options.DEFAULT_DISCOPOP_TAU, "Temperature of the discopop loss's log-ratio modulation, > 0; only with discopop."
    )
    shared_prefix: bool = opt(
        True,
        "Compute each pair's prompt once for chosen and rejected (block attention mask); off, or where it "
        "cannot run (prompt/prefix tuning, flash attention), the batch is TRL's two rows per pair.",
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

    dpo: DPOOptions = opt(DPOOptions, "DPO-specific options: the loss (every TRL 1.16 DPO loss option) and the fast path.")

    stage = "dpo"

    def validate(self) -> None:
        super().validate()
        options.check(self.dpo)


def prepare(splits, tokenizer, max_length: int):
    from align.stages.common import preference_datasets

    return preference_datasets(splits, tokenizer, max_length, "dpo")


def reference_cache(cfg: DPOConfig, model, device: str):
    """The reference cache for this base model, quantization and precision."""
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
    }
    if cfg.dpo.ld_alpha is not None:  # LD-DPO weights the reference's tail tokens: other values
        key["ld_alpha"] = cfg.dpo.ld_alpha
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
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None),
        **options.trl_loss_args(cfg.dpo),
        truncation_mode="keep_start",
        dataset_num_proc=None,
    )
    log.info("dpo loss: %s", options.describe_loss(cfg.dpo))
    peft_config = peft_config_for(cfg, base_location=model.name_or_path)
    fast = plan(cfg.dpo, cfg.peft.method, model)
    cache = reference_cache(cfg, model, device) if fast.ref_cache else None
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
    from align.core.data import load_splits
    from align.stages.common import train_and_finish

    cfg = prepare_config(cfg)
    splits = load_splits(cfg.data, "preference", cfg.train.seed)
    return train_and_finish(
        cfg, splits, prepare=prepare, build_trainer=build_trainer, eval_keys=_EVAL_KEYS, before_label="reference",
        extra_summary=lambda trainer: {"dpo_loss": options.describe_loss(cfg.dpo), **fast_path_summary(trainer)},
        force=force, callbacks=callbacks,
    )


def summary_lines(s: dict) -> list[str]:
    loss = [f"  loss: {s['dpo_loss']}"] if s.get("dpo_loss") and s["dpo_loss"] != "1 sigmoid" else []
    return loss + [
        "  held-out DPO reward accuracy: "
        f"{fmt(s.get('eval_rewards/accuracies_before'))} (step 0) -> {fmt(s.get('eval_rewards/accuracies_after'))}; "
        f"margin {fmt(s.get('eval_rewards/margins_before'))} -> {fmt(s.get('eval_rewards/margins_after'))}"
    ]


register(Stage("dpo", DPOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method))
