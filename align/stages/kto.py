"""KTO stage: TRL's KTOTrainer on thumbs-up / thumbs-down data that has no pairs (Ethayarajh et al. 2024).

Each row is one response with a label: desirable or undesirable (align/core/data.py, kind
"unpaired": TRL's {"prompt", "completion", "label"} rows, preference pairs split into a
desirable chosen and an undesirable rejected row, or scored responses labelled by
kto.score_threshold). The reference is DPO's: the policy with its adapter disabled, which with
parent_run is the merged SFT model (full fine-tuning: a frozen copy). So at step 0 the policy is
the reference: every reward and the KL estimate are 0, and the loss is the weighted mean of
1 - sigmoid(0) = 0.5 over the rows (0.5 with the default weights).

The KL term is estimated per batch from mismatched (prompt, response) pairs: TRL pairs each row
with the previous row's response, in a fixed order. Training rows are therefore shuffled once
with train.seed here (rows from one pair would otherwise sit side by side and share a prompt),
and TRL then reads them sequentially. The DPO fast path does not apply (rows are not pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.core.config import ChildStageConfig, opt
from align.core.errors import ConfigError
from align.modeling.methods import resolve_method
from align.stages.registry import Curve, Stage, held_out_line, register, training_checks


@dataclass
class KTOOptions:
    beta: float = opt(0.1, "Strength of the pull towards the reference (the SFT model).", gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = opt(
        "kto", "kto (the paper's loss, with the batch KL estimate) or apo_zero_unpaired (APO-zero, no KL term)."
    )
    desirable_weight: float = opt(
        1.0, "Weight of the desirable rows' losses; with unequal counts the paper keeps "
        "desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].",
        gt=0,
    )
    undesirable_weight: float = opt(1.0, "Weight of the undesirable rows' losses.", gt=0)
    score_threshold: float | None = opt(
        None, "Label each response by score >= threshold: rows with 'score', or pairs with score_chosen / score_rejected "
        "(align-data builds from rated sources); null = labels as given and pairs by side (chosen desirable).",
        any_value="any score on the data's own scale",
    )


@dataclass
class KTOConfig(ChildStageConfig):
    """KTO: unpaired desirable/undesirable responses; the reference is the base with the adapter disabled."""

    kto: KTOOptions = opt(KTOOptions, "KTO options.")

    stage = "kto"

    def validate(self) -> None:
        super().validate()
        o = self.kto
        if o.loss_type == "kto" and self.train.batch_size < 2:
            raise ConfigError(
                f"train.batch_size: kto estimates its KL term from the other rows of a batch, so it needs at least 2, "
                f"got {self.train.batch_size} (or use kto.loss_type: apo_zero_unpaired)"
            )


def prepare(splits, tokenizer, max_length: int, seed: int = 0):
    """Unpaired rows as datasets (training rows shuffled once with the seed), dropping and counting
    rows whose prompt alone fills max_length; longer rows are cut at the end and counted."""
    import random

    from align.modeling.templates import chat_ids
    from align.core.examples import to_datasets

    def convert(row):
        if len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)) >= max_length:
            return None, False
        example = {"prompt": row["prompt"], "completion": row["completion"], "label": row["label"]}
        return example, len(chat_ids(tokenizer, row["prompt"] + row["completion"])) > max_length

    train = list(splits.train)
    random.Random(seed).shuffle(train)
    shuffled = type(splits)(splits.source, train, splits.eval, splits.notes)
    return to_datasets(shuffled, convert, "kto", max_length, "prompt alone fills max_length")


def build_trainer(cfg: KTOConfig, model, tokenizer, train_ds, eval_ds, run_dir, callbacks=()):
    import copy

    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs

    device = str(next(model.parameters()).device)
    args = TRLKTOConfig(
        # Each example row is paired with a mismatched completion for the KL estimate: two rows per example.
        **trainer_kwargs(cfg, run_dir, device, has_eval=eval_ds is not None, model=model, rows_per_example=2),
        beta=cfg.kto.beta,
        loss_type=cfg.kto.loss_type,
        desirable_weight=cfg.kto.desirable_weight,
        undesirable_weight=cfg.kto.undesirable_weight,
        dataset_num_proc=None,
    )
    peft_config = peft_config_for(cfg, base_location=model.name_or_path)
    ref_model = None  # the reference is this model with the adapter disabled
    if peft_config is None:  # full fine-tuning: a frozen copy of the starting weights
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    return KTOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks),
    )


_EVAL_KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def run(cfg: KTOConfig, *, force: bool = False, callbacks=()):
    from align.core.normalize import kto_balance_note
    from align.stages.hf_training import train_and_finish
    from align.stages.stage_run import open_stage

    stage = open_stage(cfg, "unpaired", force, score_threshold=cfg.kto.score_threshold)
    good = sum(row["label"] for row in stage.splits.train)
    note = kto_balance_note(good, len(stage.splits.train) - good, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    if note:  # logged with the data notes when the stage starts
        stage.splits.notes.append(note)
    return train_and_finish(
        stage, prepare=lambda s, tok, n: prepare(s, tok, n, cfg.train.seed), build_trainer=build_trainer,
        eval_keys=_EVAL_KEYS, before_label="reference", callbacks=callbacks,
    )


def summary_lines(s: dict) -> list[str]:
    return [held_out_line(s, ("held-out KTO reward margin (desirable - undesirable):", "rewards/margins"), ("KL", "kl"),
                          ("loss", "loss"))]


register(Stage(
    "kto", KTOConfig, run, summary_lines, checks=training_checks(), resolve=resolve_method, kl_knob="kto.beta", beta_key="kto.beta",
    curves=(Curve("train/loss", "train loss"), Curve("train/kl", "KL estimate")),
))
