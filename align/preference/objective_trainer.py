"""The trainer of an objective (align/preference/objectives.py): SimPO, CPO (and AlphaPO), ORPO, and any new one.

It computes what the objective asks for and nothing else: the policy's sequence log-probs of the
chosen and rejected responses (sums or per-token means), the chosen NLL when the objective has an
NLL term, and a reference forward only when the objective needs a reference (the policy with its
adapter disabled; full fine-tuning: a frozen copy of the starting weights). So this is a small
transformers Trainer, not TRL's DPOTrainer (which builds or implies a reference): for the
reference-free objectives, with full fine-tuning nothing but the trained model is in memory, and
with an adapter nothing runs with the adapter disabled.

Shared with DPO: the tokenization (TRL's: the prompt with the generation prompt, the response
where prompt+response diverges from it), TRL's collator (a batch is [chosen rows; rejected
rows]), TRL's fused LM head (log-probs without full-vocabulary logits) and, where it can run,
prefix sharing (align/preference/shared_prefix.py: each pair's prompt computed once). An NLL over
prompt + response (ORPO's `orpo.nll_on_prompt`) needs prompt-token log-probs, which the shared-prefix
forward does not compute: it runs on the two-row layout, and the log says why.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from accelerate.utils import is_peft_model
from transformers import Trainer, TrainingArguments
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from align.modeling.templates import chat_ids, common_prefix_length
from align.preference import losses, shared_prefix
from align.preference.dpo_trainer import Collator, FastPath, shared_prefix_blocker
from align.preference.objectives import Objective, PairLogps

log = logging.getLogger("align")

@dataclass
class ObjectiveArguments(TrainingArguments):
    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + response; longer rows are cut at the end."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model, as TRL's DPO does."})


def _with_adapter(model, peft_config, gradient_checkpointing: bool):
    """The model with a fresh adapter; QLoRA's adapter weights in bf16, as TRL does (the DoRA magnitude stays fp32)."""
    from peft import get_peft_model

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    model = get_peft_model(model, peft_config)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry a gradient
    if quantized:
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model


def tokenize_pair(example: dict, tokenizer) -> dict:
    """TRL's DPO tokenization of a conversational pair: prompt ids, then each response's ids after them."""
    prompt_ids = chat_ids(tokenizer, example["prompt"], add_generation_prompt=True)
    chosen = chat_ids(tokenizer, example["prompt"] + example["chosen"])
    rejected = chat_ids(tokenizer, example["prompt"] + example["rejected"])
    n = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}


def tokenize_pairs(dataset, tokenizer):
    if dataset is None:
        return None
    return dataset.map(tokenize_pair, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names)


class ObjectiveTrainer(Trainer):
    """Trains an objective on the policy's log-probs (a reference forward only if the objective needs one).
    `shared_prefix_forward`: run the prefix-sharing forward."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; the Trainer divides by GA steps

    def __init__(
        self, model, args: ObjectiveArguments, objective: Objective, train_dataset, eval_dataset=None,
        processing_class=None, peft_config=None, callbacks=(), shared_prefix_forward: bool = False,
    ):
        tokenizer = processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        # Full fine-tuning has no adapter to switch off: the reference is a frozen copy of the starting weights.
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if objective.needs_reference and peft_config is None else None
        if peft_config is not None:
            model = _with_adapter(model, peft_config, args.gradient_checkpointing)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        for lm in filter(None, (model.get_base_model() if is_peft_model(model) else model, self.ref_model)):
            add_fused_lm_head(lm, outputs=("log_probs",))
            if shared_prefix_forward:
                shared_prefix.patch_forward(lm, ("log_probs",))
        args.remove_unused_columns = False  # the tokenized datasets hold only the id columns
        # The shared-prefix rows run under the model's own attention with a dense block mask (one row per pair).
        layout = FastPath(shared_prefix=shared_prefix_forward, ref_cache=False, why_not={})
        collator = Collator(
            DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length),
            tokenizer.pad_token_id, layout, digests=False,
        )
        super().__init__(
            model=model, args=args, data_collator=collator, train_dataset=tokenize_pairs(train_dataset, tokenizer),
            eval_dataset=tokenize_pairs(eval_dataset, tokenizer), processing_class=tokenizer, callbacks=list(callbacks),
        )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self.objective = objective
        self.tokens_seen = 0  # prompt + response tokens of the two-row layout, as TRL's DPO counts them
        self.shared_prefix_forward = shared_prefix_forward
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def sequence_logps(self, model, inputs, with_nll: bool = True) -> PairLogps:
        """Per-pair chosen/rejected log-probs (sums or per-token means, as the objective needs) and the chosen NLL."""
        completion = inputs["completion_mask"]
        scope = inputs["attention_mask"] if self.objective.nll_on_prompt else completion
        model_inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        labels = inputs["input_ids"].masked_fill(scope == 0, -100)
        per_token = model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        per_token = per_token[:, -(completion.size(1) - 1):]  # prompt-learning methods prepend virtual tokens
        total, mean = losses.sequence_logps(per_token, completion[:, 1:])
        chosen, rejected = (mean if self.objective.length_normalized else total).chunk(2)
        nll = None
        if with_nll and self.objective.needs_nll:
            n_pairs = chosen.size(0)
            nll = losses.chosen_nll(per_token[:n_pairs], scope[:n_pairs, 1:])
        return PairLogps(chosen, rejected, nll)

    def reference_logps(self, model, inputs, logps: PairLogps) -> PairLogps:
        """`logps` with the reference's chosen/rejected log-probs added: the adapter disabled, or the frozen copy."""
        if self.ref_model is not None:
            model, switched_off = self.ref_model, contextlib.nullcontext()
        else:
            switched_off = self.accelerator.unwrap_model(model).disable_adapter()
        with torch.no_grad(), switched_off:
            ref = self.sequence_logps(model, inputs, with_nll=False)
        return replace(logps, ref_chosen=ref.chosen, ref_rejected=ref.rejected)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps = self.sequence_logps(model, inputs)
        if self.objective.needs_reference:
            logps = self.reference_logps(model, inputs, logps)
        result = self.objective(logps)
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        if mode == "train":
            self.tokens_seen += int(gather(inputs["attention_mask"].sum().reshape(1)).sum().item())
        chosen_r, rejected_r = gather(result.chosen_rewards), gather(result.rejected_rewards)
        metrics["rewards/chosen"].append(chosen_r.mean().item())
        metrics["rewards/rejected"].append(rejected_r.mean().item())
        metrics["rewards/accuracies"].append((chosen_r > rejected_r).float().mean().item())
        metrics["rewards/margins"].append((chosen_r - rejected_r).mean().item())
        metrics["logps/chosen"].append(gather(logps.chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(logps.rejected.detach()).mean().item())
        for name, value in result.extras.items():
            metrics[name].append(gather(value).mean().item())
        return (result.loss, result) if return_outputs else result.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        else:
            metrics["num_tokens"] = self.tokens_seen  # a running count, as TRL logs it
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()


def build_objective_trainer(
    cfg, objective: Objective, model, tokenizer, train_ds, eval_ds, base_args: dict, callbacks=(), *,
    shared_prefix_wanted: bool, peft_config=None,
) -> ObjectiveTrainer:
    """An ObjectiveTrainer for a stage config: the prefix-sharing forward where it can run (else the two-row
    layout, and the log says why). `base_args`: align.modeling.train_setup.trainer_kwargs."""
    if objective.nll_on_prompt and shared_prefix_wanted:
        why_not = f"{cfg.stage}.nll_on_prompt needs prompt-token log-probs, which the shared-prefix forward does not compute"
    else:
        why_not = shared_prefix_blocker(shared_prefix_wanted, cfg.peft.method, model, cfg.train.max_length, section=cfg.stage)
    trainer = ObjectiveTrainer(
        model, ObjectiveArguments(**base_args), objective, train_ds, eval_ds, processing_class=tokenizer,
        peft_config=peft_config, callbacks=callbacks, shared_prefix_forward=why_not is None,
    )
    trainer.layout = "shared prefix" if why_not is None else f"two rows per pair ({why_not})"
    reference = "the policy with its adapter disabled" if peft_config is not None else "a frozen copy of the starting weights"
    log.info("%s: %s; batch layout: %s", cfg.stage, f"reference: {reference}" if objective.needs_reference else "no reference model",
             trainer.layout)
    return trainer
