"""The DPO options section, shared by the DPO stage and the online DPO stage.

Pure config (no torch): stage modules import it at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.core.config import opt

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
