"""DPO's loss options: which TRL 1.16 loss settings combine, and how `dpo:` keys become DPOConfig fields.

Pure data and checks (no torch, no TRL import): the stage validates a config with `check` before
anything heavy loads, and `trl_loss_args` turns the validated keys into TRL's arguments. Every
loss option of TRL's DPOConfig is here; `sync_ref_model` (TR-DPO) is not a loss option and TRL
refuses it with a PEFT adapter, our default reference, so it is left out.
"""

from __future__ import annotations

from typing import Any

from align.core.errors import ConfigError

# TRL 1.16 DPOConfig.loss_type values (tests/test_dpo_losses.py checks this list against TRL's).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Losses built on the chosen-rejected reward difference: the only ones with an f-divergence generalization.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
LABEL_SMOOTHING_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")  # sort pairs within the batch: per-pair WPO weights would misalign

DEFAULT_DISCOPOP_TAU = 0.05
DEFAULT_F_ALPHA = 0.5


def loss_types(options) -> list[str]:
    """`dpo.loss_type` as a list (one name or several)."""
    return [options.loss_type] if isinstance(options.loss_type, str) else list(options.loss_type)


def check(options, section: str = "dpo") -> None:
    """Ranges and combinations of the loss keys; each error names its key."""
    k = f"{section}."
    types = loss_types(options)
    if options.beta <= 0:
        raise ConfigError(f"{k}beta: must be positive, got {options.beta}")
    if not types:
        raise ConfigError(f"{k}loss_type: at least one loss type is required")
    twice = sorted({t for t in types if types.count(t) > 1})
    if twice:
        raise ConfigError(f"{k}loss_type: {', '.join(twice)} listed twice; give one entry a larger loss_weights value instead")
    if options.loss_weights is not None:
        if len(options.loss_weights) != len(types):
            raise ConfigError(
                f"{k}loss_weights: {len(options.loss_weights)} weights for {len(types)} loss types "
                f"({', '.join(types)}); give one weight per loss type"
            )
        if any(w < 0 for w in options.loss_weights) or not any(w > 0 for w in options.loss_weights):
            raise ConfigError(f"{k}loss_weights: every weight must be >= 0 and one > 0, got {options.loss_weights}")
    if options.rpo_alpha is not None:
        if options.rpo_alpha <= 0:
            raise ConfigError(f"{k}rpo_alpha: must be positive (or null to turn RPO off), got {options.rpo_alpha}")
        if "sft" in types:
            raise ConfigError(
                f"{k}rpo_alpha: the loss types already include 'sft' (the same NLL term); "
                f"set its weight in {k}loss_weights or drop rpo_alpha"
            )
    if not 0 <= options.label_smoothing < 0.5:
        raise ConfigError(f"{k}label_smoothing: must be in [0, 0.5), got {options.label_smoothing}")
    if options.label_smoothing > 0 and not set(types) & set(LABEL_SMOOTHING_LOSS_TYPES):
        raise ConfigError(
            f"{k}label_smoothing: {options.label_smoothing} has no effect on {', '.join(types)}; "
            f"only {', '.join(LABEL_SMOOTHING_LOSS_TYPES)} use it"
        )
    if "exo_pair" in types and options.label_smoothing == 0:
        raise ConfigError(f"{k}label_smoothing: exo_pair needs a label smoothing epsilon > 0 (its paper suggests 1e-3)")
    if options.ld_alpha is not None and not 0 <= options.ld_alpha <= 1:
        raise ConfigError(f"{k}ld_alpha: must be in [0, 1] (1 = plain DPO, 0 = only the shared length counts), got {options.ld_alpha}")
    if options.use_weighting and set(types) & set(SORTING_LOSS_TYPES):
        raise ConfigError(
            f"{k}use_weighting: WPO weights are per pair, and {', '.join(sorted(set(types) & set(SORTING_LOSS_TYPES)))} "
            "sort the pairs of a batch; choose another loss type or turn use_weighting off"
        )
    if options.use_weighting and ("sft" in types or options.rpo_alpha is not None):
        # TRL 1.16 expands the scalar 'sft' loss to a per-pair view and then scales it in place: a RuntimeError.
        raise ConfigError(
            f"{k}use_weighting: TRL 1.16 cannot apply WPO weights to the 'sft' (RPO) term; "
            "drop rpo_alpha / 'sft' or turn use_weighting off"
        )
    if options.f_divergence_type != "reverse_kl":
        outside = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if outside:
            raise ConfigError(
                f"{k}f_divergence_type: {options.f_divergence_type} works only with the loss types built on the reward "
                f"difference ({', '.join(F_DIVERGENCE_LOSS_TYPES)}); {', '.join(outside)} is not one"
            )
    if not 0 < options.f_alpha_divergence_coef <= 1:
        raise ConfigError(f"{k}f_alpha_divergence_coef: must be in (0, 1], got {options.f_alpha_divergence_coef}")
    if options.f_alpha_divergence_coef != DEFAULT_F_ALPHA and options.f_divergence_type != "alpha_divergence":
        raise ConfigError(
            f"{k}f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence "
            f"(got {options.f_divergence_type})"
        )
    if options.discopop_tau <= 0:
        raise ConfigError(f"{k}discopop_tau: must be positive, got {options.discopop_tau}")
    if options.discopop_tau != DEFAULT_DISCOPOP_TAU and "discopop" not in types:
        raise ConfigError(f"{k}discopop_tau: used only by loss_type discopop (got {', '.join(types)})")


def trl_loss_args(options) -> dict[str, Any]:
    """TRL DPOConfig arguments for the loss; RPO is TRL's 'sft' loss added with weight rpo_alpha."""
    types = loss_types(options)
    weights = list(options.loss_weights) if options.loss_weights is not None else [1.0] * len(types)
    if options.rpo_alpha is not None:
        types, weights = types + ["sft"], weights + [options.rpo_alpha]
    return dict(
        beta=options.beta,
        loss_type=types,
        loss_weights=weights,
        label_smoothing=options.label_smoothing,
        use_weighting=options.use_weighting,
        ld_alpha=options.ld_alpha,
        f_divergence_type=options.f_divergence_type,
        f_alpha_divergence_coef=options.f_alpha_divergence_coef,
        discopop_tau=options.discopop_tau,
    )


def describe_loss(options) -> str:
    """One line naming the loss as trained, e.g. `0.8 sigmoid + 0.2 bco_pair + 1 sft, WPO weights`."""
    args = trl_loss_args(options)
    parts = [f"{w:g} {t}" for t, w in zip(args["loss_type"], args["loss_weights"])]
    notes = []
    if options.use_weighting:
        notes.append("WPO weights")
    if options.ld_alpha is not None:
        notes.append(f"LD-DPO ld_alpha={options.ld_alpha:g}")
    if options.f_divergence_type != "reverse_kl":
        notes.append(options.f_divergence_type)
    return " + ".join(parts) + (", " + ", ".join(notes) if notes else "")
