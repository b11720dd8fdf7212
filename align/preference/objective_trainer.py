"""Reference-free preference training: SimPO, CPO (and AlphaPO) and ORPO on the policy's own log-probs.

There is no reference model and no reference forward: the loss reads only the policy's sequence
log-probs of the chosen and rejected responses (align/preference/losses.py). So this is a small
transformers Trainer, not TRL's DPOTrainer (which builds or implies a reference): with full
fine-tuning nothing but the trained model is in memory, and with an adapter nothing runs with
the adapter disabled.

Shared with DPO: the tokenization (TRL's: the prompt with the generation prompt, the response
where prompt+response diverges from it), TRL's collator (a batch is [chosen rows; rejected
rows]), TRL's fused LM head (log-probs without full-vocabulary logits) and, where it can run,
prefix sharing (align/preference/shared_prefix.py: each pair's prompt computed once). ORPO's NLL over
prompt + response (`orpo.nll_on_prompt`) needs prompt-token log-probs, which the shared-prefix
forward does not compute: it runs on the two-row layout, and the stage logs why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from transformers import Trainer, TrainingArguments
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from align.preference import losses, shared_prefix
from align.preference.dpo_trainer import Collator, FastPath
from align.modeling.templates import chat_ids, common_prefix_length

log = logging.getLogger("align")

METHODS = ("simpo", "cpo", "orpo")


@dataclass(frozen=True)
class Objective:
    """Which reference-free loss, with its hyperparameters (validated by the stage config)."""

    method: str  # simpo | cpo | orpo
    beta: float
    loss_type: str = "sigmoid"  # cpo: sigmoid | hinge | ipo
    label_smoothing: float = 0.0
    gamma: float = 0.5  # simpo: target reward margin
    alpha: float = 0.0  # simpo/cpo: AlphaPO reward shape
    nll_weight: float = 0.0  # simpo/cpo: weight of the chosen NLL (CPO's BC term; ORPO's is always 1)
    nll_on_prompt: bool = False  # orpo: NLL over prompt + response instead of the response

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown reference-free method {self.method!r}")

    @property
    def length_normalized(self) -> bool:
        """SimPO, ORPO and CPO's ipo compare per-token mean log-probs; CPO's sigmoid/hinge compare sums."""
        return self.method in ("simpo", "orpo") or self.loss_type == "ipo"

    @property
    def needs_nll(self) -> bool:
        return self.method == "orpo" or self.nll_weight > 0

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, nll: torch.Tensor | None) -> losses.PreferenceLoss:
        if self.method == "orpo":
            return losses.orpo_loss(chosen, rejected, beta=self.beta, nll=nll)
        if self.method == "simpo":
            return losses.simpo_loss(
                chosen, rejected, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing,
                alpha=self.alpha, nll=nll, nll_weight=self.nll_weight,
            )
        return losses.cpo_loss(
            chosen, rejected, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            alpha=self.alpha, nll=nll, nll_weight=self.nll_weight,
        )


@dataclass
class ReferenceFreeArguments(TrainingArguments):
    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + response; longer rows are cut at the end."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model, as TRL's DPO does."})


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


class ReferenceFreeTrainer(Trainer):
    """Trains a preference objective on the policy alone. `shared_prefix`: run the prefix-sharing forward."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; the Trainer divides by GA steps

    def __init__(
        self, model, args: ReferenceFreeArguments, objective: Objective, train_dataset, eval_dataset=None,
        processing_class=None, peft_config=None, callbacks=(), shared_prefix_forward: bool = False,
    ):
        tokenizer = processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()  # the frozen embeddings' output must carry a gradient
            if quantized:  # QLoRA: adapter weights in bf16, as TRL does (the DoRA magnitude stays fp32)
                for name, param in model.named_parameters():
                    if param.requires_grad and "lora_magnitude_vector" not in name:
                        param.data = param.data.to(torch.bfloat16)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        causal_lm = model.get_base_model() if is_peft_model(model) else model
        add_fused_lm_head(causal_lm, outputs=("log_probs",))
        if shared_prefix_forward:
            shared_prefix.patch_forward(causal_lm, ("log_probs",))
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
        self.objective = objective
        self.tokens_seen = 0  # prompt + response tokens of the two-row layout, as TRL's DPO counts them
        self.shared_prefix_forward = shared_prefix_forward
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def policy_logps(self, model, inputs) -> dict[str, torch.Tensor]:
        """Per-pair chosen/rejected log-probs (sums or per-token means, as the objective needs) and the chosen NLL."""
        completion = inputs["completion_mask"]
        scope = inputs["attention_mask"] if self.objective.nll_on_prompt else completion
        model_inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        labels = inputs["input_ids"].masked_fill(scope == 0, -100)
        per_token = model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        per_token = per_token[:, -(completion.size(1) - 1):]  # prompt-learning methods prepend virtual tokens
        total, mean = losses.sequence_logps(per_token, completion[:, 1:])
        logps = mean if self.objective.length_normalized else total
        chosen, rejected = logps.chunk(2)
        nll = None
        if self.objective.needs_nll:
            n_pairs = chosen.size(0)
            nll = losses.chosen_nll(per_token[:n_pairs], scope[:n_pairs, 1:])
        return {"chosen": chosen, "rejected": rejected, "nll": nll}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps = self.policy_logps(model, inputs)
        result = self.objective(logps["chosen"], logps["rejected"], logps["nll"])
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        if mode == "train":
            self.tokens_seen += int(gather(inputs["attention_mask"].sum().reshape(1)).sum().item())
        chosen_r, rejected_r = gather(result.chosen_rewards), gather(result.rejected_rewards)
        metrics["rewards/chosen"].append(chosen_r.mean().item())
        metrics["rewards/rejected"].append(rejected_r.mean().item())
        metrics["rewards/accuracies"].append((chosen_r > rejected_r).float().mean().item())
        metrics["rewards/margins"].append((chosen_r - rejected_r).mean().item())
        metrics["logps/chosen"].append(gather(logps["chosen"].detach()).mean().item())
        metrics["logps/rejected"].append(gather(logps["rejected"].detach()).mean().item())
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
