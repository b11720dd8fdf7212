"""GRPO / RLOO advantage and loss math against values worked out by hand (align/rlhf/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from align.rlhf import losses as P


def test_group_advantages_worked_example():
    # Two groups of 4. Group 1: rewards 1, 0, 0, 1 -> mean 0.5, centred +-0.5; unbiased std =
    # sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.86603. Group 2: all 2 -> no signal, advantage 0.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(P.group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    scaled = P.group_advantages(r, 4, "group", eps=0.0)
    torch.testing.assert_close(scaled[:4], torch.tensor([1, -1, -1, 1]) * 0.5 / math.sqrt(1 / 3))
    assert scaled[4:].abs().sum() == 0  # a flat group divides 0 by eps: still 0
    # batch: the std of all 8 rewards: mean 1.25, squares of deviations 0.0625*2 + 1.5625*2 + 0.5625*4 = 5.5,
    # unbiased var 5.5 / 7 -> std 0.886405.
    torch.testing.assert_close(P.group_advantages(r, 4, "batch", eps=0.0)[:2], torch.tensor([0.5, -0.5]) / math.sqrt(5.5 / 7))


def test_group_advantages_leave_out_invalid_responses():
    # Group 3, 1, NaN (unscored): the mean is over the two valid rewards (2), std sqrt(2); the NaN row gets 0.
    r = torch.tensor([3.0, 1.0, math.nan])
    torch.testing.assert_close(P.group_advantages(r, 3, "none"), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(P.group_advantages(r, 3, "group", eps=0.0), torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2))
    valid = torch.tensor([True, False, True])
    torch.testing.assert_close(P.group_advantages(torch.tensor([3.0, 1.0, 5.0]), 3, "none", valid=valid), torch.tensor([-1.0, 0.0, 1.0]))


def test_leave_one_out_worked_example():
    # Rewards 4, 2, 0: baselines (2+0)/2 = 1, (4+0)/2 = 2, (4+2)/2 = 3 -> advantages 3, 0, -3
    # (= n/(n-1) * (r - mean) = 1.5 * (2, 0, -2)). Second group: 1, 1, 1 -> 0.
    r = torch.tensor([4.0, 2.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(P.leave_one_out_advantages(r, 3), torch.tensor([3.0, 0.0, -3.0, 0.0, 0.0, 0.0]))
    # Group std of 4, 2, 0 is 2: scaled advantages 1.5, 0, -1.5.
    torch.testing.assert_close(P.leave_one_out_advantages(r, 3, "group", eps=0.0)[:3], torch.tensor([1.5, 0.0, -1.5]))
    # With one reward missing the baseline is the other valid one; a lone valid reward has no baseline.
    torch.testing.assert_close(
        P.leave_one_out_advantages(torch.tensor([4.0, math.nan, 0.0, 7.0, math.nan, math.nan]), 3),
        torch.tensor([4.0, 0.0, -4.0, 0.0, 0.0, 0.0]),
    )


def test_group_shapes_are_checked():
    with pytest.raises(ValueError, match="groups of 4"):
        P.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        P.leave_one_out_advantages(torch.zeros(4), 2, "std")


def test_clipped_policy_terms_both_sides():
    # ratio e^0.5 = 1.6487 > 1 + 0.2 with A = +1: the clipped term -1.2 is larger -> loss -1.2, clipped.
    # ratio e^-0.5 = 0.6065 < 1 - 0.2 with A = -1: clipped term 0.8 > unclipped 0.6065 -> 0.8, clipped.
    # ratio 1.1 inside [0.8, 1.3] (clip_high 0.3): the unclipped -1.1 * 2.
    logp = torch.tensor([[0.5, -0.5, math.log(1.1)]])
    old = torch.zeros(1, 3)
    loss, clipped = P.clipped_policy_terms(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    torch.testing.assert_close(loss[0, 0], torch.tensor(-1.2))
    assert clipped[0, 0].item() == 1.0
    loss, clipped = P.clipped_policy_terms(logp[:, 1:2], old[:, :1], torch.tensor([-1.0]), 0.2, 0.2)
    torch.testing.assert_close(loss[0, 0], torch.tensor(0.8))
    assert clipped.item() == 1.0
    loss, clipped = P.clipped_policy_terms(logp[:, 2:], old[:, :1], torch.tensor([2.0]), 0.2, 0.3)
    torch.testing.assert_close(loss[0, 0], torch.tensor(-2.2))
    assert clipped.item() == 0.0


def test_loss_aggregations_and_their_split_over_micro_batches():
    # Two responses of 1 and 3 tokens with per-token losses [2] and [1, 1, 4]; max length 4.
    per_token = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 4.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    agg = lambda rows, mode: P.aggregate_loss(per_token[rows], mask[rows], mode, 2, 4.0, 4)  # noqa: E731
    every = [0, 1]
    assert agg(every, "sequence_mean").item() == pytest.approx((2 + 2) / 2)  # means 2 and 2
    assert agg(every, "token_mean").item() == pytest.approx(8 / 4)
    assert agg(every, "fixed_length").item() == pytest.approx(8 / (2 * 4))
    for mode in ("sequence_mean", "token_mean", "fixed_length"):  # one response per micro-batch: the same loss
        assert (agg([0], mode) + agg([1], mode)).item() == pytest.approx(agg(every, mode).item())
    # token_mean and sequence_mean differ as soon as lengths differ: 4-token [1,1,1,1] vs 1-token [5].
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert P.aggregate_loss(t, m, "sequence_mean", 2, 5.0, 4).item() == pytest.approx(3.0)
    assert P.aggregate_loss(t, m, "token_mean", 2, 5.0, 4).item() == pytest.approx(9 / 5)


def test_kl_penalty_gradient_with_and_without_bias_correction():
    # On the sampling policy (old = logp, ratio 1) the value is the estimator's either way; the gradient
    # with the ratio is log p - log q (the reverse KL's score-function gradient); without it, k3's own
    # gradient 1 - q/p. Tokens: log p - log q = 1.0 and -0.5.
    ref = torch.tensor([[-2.0, -1.0]])
    for correct, expected in ((True, [1.0, -0.5]), (False, [1 - math.exp(-1.0), 1 - math.exp(0.5)])):
        logp = torch.tensor([[-1.0, -1.5]], requires_grad=True)
        kl = P.kl_penalty_terms(logp, logp.detach(), ref, "k3", bias_correction=correct)
        torch.testing.assert_close(kl.detach(), P.kl_per_token(logp.detach(), ref, "k3"))
        kl.sum().backward()
        torch.testing.assert_close(logp.grad, torch.tensor([expected]))
    # k1 without the correction has gradient 1 everywhere (0 in expectation); with it, 1 + log p - log q.
    logp = torch.tensor([[-1.0, -1.5]], requires_grad=True)
    P.kl_penalty_terms(logp, logp.detach(), ref, "k1").sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[2.0, 0.5]]))
