"""Reference-free preference losses (align/preference/losses.py): the papers' formulas on hand-picked
log-probs, then agreement with TRL's experimental CPO/ORPO trainers (the only place TRL's
`trl.experimental` is imported): their loss functions on random log-probs, and their whole batch
loss on the tiny model against our trainer on the same tokens (1e-5).
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from align.preference.losses import chosen_nll, cpo_loss, orpo_loss, sequence_logps, simpo_loss

T = torch.tensor


def nls(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def test_sequence_logps_and_nll_count_only_scored_tokens():
    per_token = T([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    mask = T([[0, 1, 1, 0], [1, 1, 0, 0]])
    total, mean = sequence_logps(per_token, mask)
    assert total.tolist() == [-5.0, -1.0] and mean.tolist() == [-2.5, -0.5]
    # NLL: the mean over all 4 scored tokens (token-weighted, as a cross-entropy), not the mean of row means.
    assert chosen_nll(per_token, mask).item() == pytest.approx(6.0 / 4)


def test_cpo_sigmoid_hinge_ipo_by_hand():
    chosen, rejected = T([-2.0, -5.0]), T([-4.0, -3.0])  # margins +2 and -2
    out = cpo_loss(chosen, rejected, beta=0.5, nll=T(2.0), nll_weight=1.0)
    # beta * margin = +1, -1: -log sigmoid(1) = 0.31326, -log sigmoid(-1) = 1.31326
    assert out.per_pair.tolist() == pytest.approx([nls(1.0), nls(-1.0)])
    assert out.loss.item() == pytest.approx((nls(1.0) + nls(-1.0)) / 2 + 2.0)
    assert out.chosen_rewards.tolist() == [-1.0, -2.5] and out.rejected_rewards.tolist() == [-2.0, -1.5]
    assert out.extras["nll_loss"].item() == 2.0
    smoothed = cpo_loss(chosen, rejected, beta=0.5, label_smoothing=0.1)
    assert smoothed.per_pair[0].item() == pytest.approx(0.9 * nls(1.0) + 0.1 * nls(-1.0))
    assert smoothed.loss.item() == pytest.approx(smoothed.per_pair.mean().item()), "no NLL term without nll"
    hinge = cpo_loss(chosen, rejected, beta=0.5, loss_type="hinge")
    assert hinge.per_pair.tolist() == [0.0, 2.0]  # relu(1 - 1), relu(1 + 1)
    ipo = cpo_loss(chosen, rejected, beta=0.5, loss_type="ipo")
    assert ipo.per_pair.tolist() == [1.0, 9.0]  # (2 - 1/(2*0.5))^2, (-2 - 1)^2
    with pytest.raises(ValueError, match="unknown CPO loss type"):
        cpo_loss(chosen, rejected, beta=0.5, loss_type="dpo")


def test_simpo_and_alphapo_by_hand():
    chosen, rejected = T([-1.0]), T([-1.5])  # per-token mean log-probs
    out = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    # beta * (-1 + 1.5) - gamma = 1 - 0.5 = 0.5
    assert out.loss.item() == pytest.approx(nls(0.5))
    assert out.chosen_rewards.item() == -2.0 and out.rejected_rewards.item() == -3.0
    # AlphaPO, alpha = 0.5: r = (1 - p^-0.5) / 0.5 with p = exp(mean log-prob)
    r_c, r_l = (1 - math.exp(0.5)) / 0.5, (1 - math.exp(0.75)) / 0.5
    alpha = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, alpha=0.5)
    assert alpha.loss.item() == pytest.approx(nls(2.0 * (r_c - r_l) - 0.5), rel=1e-6)
    assert alpha.chosen_rewards.item() == pytest.approx(2.0 * r_c, rel=1e-6)
    cpo_simpo = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, nll=T(1.25), nll_weight=0.4)
    assert cpo_simpo.loss.item() == pytest.approx(nls(0.5) + 0.4 * 1.25)


def test_orpo_by_hand():
    chosen, rejected = T([-0.5]), T([-1.0])  # per-token mean log-probs: p = 0.6065, 0.3679
    log_odds_c = -0.5 - math.log(1 - math.exp(-0.5))  # log(p / (1 - p)) = 0.43275
    log_odds_l = -1.0 - math.log(1 - math.exp(-1.0))  # -0.54132
    ratio = log_odds_c - log_odds_l
    out = orpo_loss(chosen, rejected, beta=0.2, nll=T(3.0))
    assert out.per_pair.item() == pytest.approx(nls(ratio), rel=1e-6)
    assert out.loss.item() == pytest.approx(3.0 + 0.2 * nls(ratio), rel=1e-6)
    assert out.extras["log_odds_chosen"].item() == pytest.approx(ratio, rel=1e-6)
    assert out.extras["log_odds_ratio"].item() == pytest.approx(-nls(ratio), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-0.1)
    # Near p = 1 the log(1 - p) term must stay finite (log1mexp's other branch).
    near_one = orpo_loss(T([-1e-4]), T([-2.0]), beta=0.1, nll=T(0.0))
    assert torch.isfinite(near_one.loss)


# --------------------------------------------------------------------------- against TRL experimental


@pytest.fixture(scope="module")
def trl_experimental():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return SimpleNamespace(CPOConfig=CPOConfig, CPOTrainer=CPOTrainer, ORPOConfig=ORPOConfig, ORPOTrainer=ORPOTrainer)


def random_logps(n: int, seed: int, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 3.0 if mean else 40.0  # per-token means or sums
    return -torch.rand(n, generator=g) * scale - 0.01, -torch.rand(n, generator=g) * scale - 0.01


@pytest.mark.parametrize(
    "loss_type, alpha, smoothing",
    [("sigmoid", 0.0, 0.0), ("sigmoid", 0.0, 0.2), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0), ("simpo", 0.0, 0.1),
     ("simpo", 0.25, 0.0), ("sigmoid", -0.3, 0.0)],
)
def test_cpo_family_matches_trl_experimental_loss(trl_experimental, loss_type, alpha, smoothing):
    chosen, rejected = random_logps(16, seed=sum(map(ord, loss_type)) + int(alpha * 100), mean=loss_type in ("ipo", "simpo"))
    stub = SimpleNamespace(alpha=alpha, beta=0.7, loss_type=loss_type, label_smoothing=smoothing, simpo_gamma=0.4,
                           accelerator=SimpleNamespace(device="cpu"))
    want, want_c, want_r = trl_experimental.CPOTrainer.cpo_loss(stub, chosen, rejected)
    got = cpo_loss(chosen, rejected, beta=0.7, loss_type=loss_type, label_smoothing=smoothing, simpo_gamma=0.4, alpha=alpha)
    torch.testing.assert_close(got.per_pair, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.chosen_rewards, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.rejected_rewards, want_r, atol=1e-5, rtol=1e-5)


def test_orpo_matches_trl_experimental_loss(trl_experimental):
    chosen, rejected = random_logps(16, seed=7, mean=True)
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    want, want_c, want_r, want_ratio, want_log_odds = trl_experimental.ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    nll = T(1.7)
    got = orpo_loss(chosen, rejected, beta=0.25, nll=nll)
    # TRL returns beta * log sigmoid(log odds) and its trainer forms nll - mean(...)
    torch.testing.assert_close(-0.25 * got.per_pair, want, atol=1e-5, rtol=1e-5)
    assert got.loss.item() == pytest.approx((nll - want.mean()).item(), rel=1e-5)
    torch.testing.assert_close(got.chosen_rewards, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.rejected_rewards, want_r, atol=1e-5, rtol=1e-5)
    assert got.extras["log_odds_ratio"].item() == pytest.approx(want_ratio.item(), rel=1e-5)
    assert got.extras["log_odds_chosen"].item() == pytest.approx(want_log_odds.item(), rel=1e-5)


def _ours(base, tokenizer, rows, objective, share: bool, tmp_path):
    from datasets import Dataset

    from align.preference.objective_trainer import ObjectiveArguments, ObjectiveTrainer

    args = ObjectiveArguments(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=4, report_to=[],
                              use_cpu=True, max_length=60)
    return ObjectiveTrainer(copy.deepcopy(base), args, objective, Dataset.from_list(rows), processing_class=tokenizer,
                            shared_prefix_forward=share)


def _trl_batch(batch: dict) -> dict:
    """Our collated [chosen; rejected] batch in TRL's experimental trainers' per-side layout."""
    n = batch["input_ids"].size(0) // 2
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = {}
    for side, rows in (("chosen", slice(None, n)), ("rejected", slice(n, None))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = labels[rows]
    return out


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the random init, so the two responses differ clearly
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    "method, share",
    [("simpo", True), ("simpo", False), ("cpo", True), ("cpo-ipo", True), ("orpo", False)],
    ids=["simpo-shared", "simpo-two-rows", "cpo-shared", "cpo-ipo-shared", "orpo-nll-on-prompt"],
)
def test_batch_loss_matches_trl_experimental_trainer(trl_experimental, perturbed, tmp_path, method, share):
    """The whole batch loss (log-probs, NLL, preference term) against TRL's experimental trainer on the same tokens."""
    from datasets import Dataset
    from test_dpo_fast import variable_rows

    from align.preference.objectives import CPO, ORPO, SimPO

    base, tokenizer = perturbed
    rows = variable_rows(8)
    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=60)
    if method == "orpo":
        objective = ORPO(beta=0.3, nll_on_prompt=True)
        args = trl_experimental.ORPOConfig(beta=0.3, **common)
        reference = trl_experimental.ORPOTrainer
    else:
        loss_type = {"simpo": "simpo", "cpo": "sigmoid", "cpo-ipo": "ipo"}[method]
        nll_weight = 0.0 if method == "simpo" else 1.0
        objective = SimPO(beta=2.0, gamma=0.6) if method == "simpo" else CPO(beta=0.1, loss_type=loss_type, nll_weight=nll_weight)
        args = trl_experimental.CPOConfig(beta=objective.beta, loss_type=loss_type, simpo_gamma=0.6, cpo_alpha=nll_weight, **common)
        reference = trl_experimental.CPOTrainer
    ours = _ours(base, tokenizer, rows, objective, share, tmp_path)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    assert batch["input_ids"].shape[1] == 60, "some rows are truncated at max_length"
    assert ("shared_prefix" in batch) == share
    theirs = reference(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    with torch.no_grad():
        loss = ours.compute_loss(ours.model, batch)
        want, metrics = theirs.get_batch_loss_metrics(theirs.model, _trl_batch(batch))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    mine = {k: v[-1] for k, v in ours._metrics["eval"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"):
        if key == "nll_loss" and method == "simpo":
            continue
        assert mine[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
    assert mine["rewards/accuracies"] == metrics["rewards/accuracies"]


@pytest.mark.parametrize("method, share", [("lora", True), ("lora", False), ("full", True)])
def test_an_objective_that_needs_the_reference_gets_it(perturbed, tmp_path, method, share):
    """The objective trainer runs a reference pass only for an objective that asks for one: the policy with its
    adapter disabled, or (full fine-tuning) a frozen copy of the starting weights. At the start the policy is the
    reference, so a DPO-style sigmoid on the log-ratio margin is ln 2; once the trained weights move, it is not."""
    import torch.nn.functional as F
    from dataclasses import dataclass
    from datasets import Dataset
    from peft import LoraConfig
    from test_dpo_fast import variable_rows

    from align.preference.losses import PreferenceLoss
    from align.preference.objective_trainer import ObjectiveArguments, ObjectiveTrainer
    from align.preference.objectives import Objective

    @dataclass(frozen=True)
    class AgainstReference(Objective):
        beta: float
        needs_reference = True

        def __call__(self, logps):
            chosen = self.beta * (logps.chosen - logps.ref_chosen)
            rejected = self.beta * (logps.rejected - logps.ref_rejected)
            per_pair = -F.logsigmoid(chosen - rejected)
            return PreferenceLoss(per_pair.mean(), per_pair, chosen.detach(), rejected.detach(), {})

    base, tokenizer = perturbed
    args = ObjectiveArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, max_length=60)
    peft_config = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM") if method == "lora" else None
    trainer = ObjectiveTrainer(copy.deepcopy(base), args, AgainstReference(beta=0.5), Dataset.from_list(variable_rows(8)),
                               processing_class=tokenizer, peft_config=peft_config, shared_prefix_forward=share)
    assert (trainer.ref_model is None) == (method == "lora")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(math.log(2), abs=1e-6)
        g = torch.Generator().manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and (method == "full" or "lora_B" in name):
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        assert abs(trainer.compute_loss(trainer.model, batch).item() - math.log(2)) > 1e-3
