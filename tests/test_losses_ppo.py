"""PPO math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from align.rlhf.losses import (
    AdaptiveKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    last_token_index,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

T = torch.tensor


def test_gae_on_a_4_token_response():
    rewards = T([[0.0, 0.0, 0.0, 1.0]])
    values = T([[0.5, 0.6, 0.7, 0.8]])
    mask = T([[1.0, 1.0, 1.0, 1.0]])
    # gamma = lambda = 1: advantages are return - value, and the return is the final reward.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # gamma = 0.9, lambda = 0.95, by hand:
    # deltas: d3 = 1 - 0.8 = 0.2; d2 = 0.9*0.8 - 0.7 = 0.02; d1 = 0.9*0.7 - 0.6 = 0.03; d0 = 0.9*0.6 - 0.5 = 0.04
    # A3 = 0.2; A2 = 0.02 + 0.855*0.2 = 0.191; A1 = 0.03 + 0.855*0.191 = 0.193305; A0 = 0.04 + 0.855*0.193305
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.205275775, 0.193305, 0.191, 0.2])
    assert ret.tolist()[0] == pytest.approx([0.705275775, 0.793305, 0.891, 1.0])


def test_gae_ignores_padding_after_the_response():
    # The same response followed by two padding positions whose junk must not leak in.
    rewards = T([[0.0, 0.0, 0.0, 1.0, 5.0, 5.0]])
    values = T([[0.5, 0.6, 0.7, 0.8, 9.0, 9.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.205275775, 0.193305, 0.191, 0.2, 0.0, 0.0])
    assert ret.tolist()[0][4:] == [0.0, 0.0]


def test_token_rewards_pay_the_score_on_the_last_token():
    kl = T([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rewards = token_rewards(T([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.01, -0.02, -0.03 + 2.0, 0.0])
    assert rewards.tolist()[1] == pytest.approx([-0.05, -0.05 - 1.0, 0.0, 0.0])
    assert last_token_index(mask).tolist() == [2, 1]


def test_kl_estimators():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = (q/p - 1) - log(q/p) with q/p = 0.5: -0.5 + log 2
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    same = kl_per_token(T([-1.3, -0.2]), T([-1.3, -0.2]), "k3")
    assert same.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_per_token(logp, ref, "k2")


def test_policy_loss_clips_on_both_sides():
    old = T([[0.0, 0.0, 0.0, 0.0]])
    # ratios 1.5, 0.5, 1.5, 0.5 with clip 0.2
    new = torch.log(T([[1.5, 0.5, 1.5, 0.5]]))
    adv = T([[1.0, 1.0, -1.0, -1.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0]])
    loss, clip_frac = policy_loss(new, old, adv, mask, clip=0.2)
    # per token: max(-A r, -A clip(r)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2   (clipped: no reward for moving further)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5   (unclipped: the pessimistic bound)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5   (unclipped)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8   (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert clip_frac.item() == pytest.approx(0.5)


def test_losses_ignore_masked_prompt_and_padding_tokens():
    old = torch.zeros(1, 4)
    new = torch.log(T([[9.0, 1.5, 0.5, 9.0]]))  # positions 0 and 3 are prompt/padding junk
    adv = T([[100.0, 1.0, 1.0, -100.0]])
    mask = T([[0.0, 1.0, 1.0, 0.0]])
    loss, _ = policy_loss(new, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    values, old_values, returns = T([[7.0, 1.0, 0.0, 7.0]]), T([[0.0, 0.5, 0.0, 0.0]]), T([[0.0, 0.0, 1.0, 0.0]])
    vloss, vclip = value_loss(values, old_values, returns, mask, clip=0.2)
    # token 1: V=1.0, clipped V = 0.5+0.2 = 0.7, R=0 -> max(1.0, 0.49) = 1.0; token 2: V=0, R=1 -> 1.0
    assert vloss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert vclip.item() == pytest.approx(0.0)


def test_value_loss_clipping():
    values, old_values, returns = T([[2.0]]), T([[0.0]]), T([[3.0]])
    mask = T([[1.0]])
    # unclipped (2-3)^2 = 1; clipped V = 0.2 -> (0.2-3)^2 = 7.84; the max is taken
    loss, frac = value_loss(values, old_values, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 7.84)
    assert frac.item() == 1.0


def test_whitening_and_means_respect_the_mask():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    w = masked_whiten(x, mask)
    assert w[0, 3].item() == 0.0
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    # unbiased variance of (1, 2, 3) is 1, so whitening just centres
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)


def test_entropy_and_explained_variance():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    returns = T([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    assert ctl.update(observed_kl=12.0, n_samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped error +0.2
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    assert ctl.update(observed_kl=5.4, n_samples=10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    fixed = AdaptiveKLController(value=0.1, target=None)
    assert fixed.update(observed_kl=50.0, n_samples=10) == 0.1
