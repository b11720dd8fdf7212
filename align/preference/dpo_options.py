"""The DPO options section (shared by the DPO and online DPO stages) and its loss settings.

Every loss option of TRL 1.16's DPOConfig is here: which of them combine, checked by `check` when
the config loads, and how `dpo:` keys become DPOConfig fields (`trl_loss_args`). `sync_ref_model`
(TR-DPO) is not a loss option and TRL refuses it with a PEFT adapter, our default reference, so it
is left out. Pure config (no torch, no TRL import): stage modules import it at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from align.core.config import opt
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

LossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]


@dataclass
class DPOOptions:
    beta: float = opt(0.1, "Strength of the pull towards the reference (the SFT model). For ipo it is IPO's tau.", gt=0)
    loss_type: LossType | list[LossType] = opt(  # type: ignore[valid-type]
        "sigmoid",
        "DPO loss, or a list of them summed with loss_weights (e.g. MPO: [sigmoid, bco_pair, sft]): sigmoid (DPO), "
        "hinge (SLiC), ipo, exo_pair, nca_pair, robust (rDPO), bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
        "apo_down, discopop, sft (NLL of chosen), sigmoid_norm (length-normalized DPO). Each name once.",
        nonempty=True,
    )
    loss_weights: list[float] | None = opt(
        None, "One weight per loss_type, each >= 0 and one > 0; null = 1 each.",
        any_value="checked against loss_type (one weight each, >= 0, one > 0)",
    )
    rpo_alpha: float | None = opt(
        None, "RPO: add rpo_alpha * NLL of the chosen response (TRL's 'sft' loss) to the preference loss; "
        "null = off. Not with 'sft' in loss_type (the same term).",
        gt=0,
    )
    label_smoothing: float = opt(
        0.0, "Assumed share of flipped labels: robust (rDPO), exo_pair (epsilon, needs > 0), aot, "
        "aot_unpaired; the other losses ignore it, so a value > 0 with them is refused.",
        min=0, lt=0.5,
    )
    use_weighting: bool = opt(
        False, "WPO: weight each pair by the policy's length-normalized probability of both responses. Not with aot/aot_unpaired."
    )
    ld_alpha: float | None = opt(
        None, "LD-DPO: response tokens past the shorter response's length count with this weight "
        "(1 = plain DPO, 0 = only the shared length); null = off.",
        min=0, max=1,
    )
    f_divergence_type: Literal[F_DIVERGENCES] = opt(  # type: ignore[valid-type]
        "reverse_kl", "f-DPO regularizer: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence; a non-default "
        "value only with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.",
    )
    f_alpha_divergence_coef: float = opt(
        DEFAULT_F_ALPHA, "alpha of f_divergence_type alpha_divergence (1 = reverse KL); only with it.", gt=0, max=1
    )
    discopop_tau: float = opt(DEFAULT_DISCOPOP_TAU, "Temperature of the discopop loss's log-ratio modulation; only with discopop.", gt=0)
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


def loss_types(options) -> list[str]:
    """`dpo.loss_type` as a list (one name or several)."""
    return [options.loss_type] if isinstance(options.loss_type, str) else list(options.loss_type)


def check(options, section: str = "dpo") -> None:
    """Combinations of the loss keys (their ranges are the schema's, checked before); each error names its key."""
    k = f"{section}."
    types = loss_types(options)
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
        if "sft" in types:
            raise ConfigError(
                f"{k}rpo_alpha: the loss types already include 'sft' (the same NLL term); "
                f"set its weight in {k}loss_weights or drop rpo_alpha"
            )
    if options.label_smoothing > 0 and not set(types) & set(LABEL_SMOOTHING_LOSS_TYPES):
        raise ConfigError(
            f"{k}label_smoothing: {options.label_smoothing} has no effect on {', '.join(types)}; "
            f"only {', '.join(LABEL_SMOOTHING_LOSS_TYPES)} use it"
        )
    if "exo_pair" in types and options.label_smoothing == 0:
        raise ConfigError(f"{k}label_smoothing: exo_pair needs a label smoothing epsilon > 0 (its paper suggests 1e-3)")
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
    if options.f_alpha_divergence_coef != DEFAULT_F_ALPHA and options.f_divergence_type != "alpha_divergence":
        raise ConfigError(
            f"{k}f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence "
            f"(got {options.f_divergence_type})"
        )
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
