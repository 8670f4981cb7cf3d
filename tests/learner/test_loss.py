"""Losses and advantages against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ssp.learner.advantages import grpo_advantages, reinforce_advantages, zero_variance_groups
from ssp.learner.config import LossConfig
from ssp.learner.loss import aggregation_weights, k3_kl, policy_loss

CFG = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, kl_coef=0.0)


def _per_token(logp: list[float], old: list[float], adv: list[float], cfg: LossConfig = CFG) -> list[float]:
    """Each token's loss alone (weight 1 on that token only)."""
    out = []
    for i in range(len(logp)):
        w = torch.zeros(len(logp))
        w[i] = 1.0
        out.append(policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(adv), w, cfg).loss.item())
    return out


def test_ppo_clips_both_sides() -> None:
    # ratios exp(.) = 1.5, 0.5, 1.1 ; A = +1, -1, +2
    logp = [math.log(1.5), math.log(0.5), math.log(1.1)]
    losses = _per_token(logp, [0.0, 0.0, 0.0], [1.0, -1.0, 2.0])
    # A>0, r=1.5 > 1.28: max(-1.5, -1.28) = -1.28 (clipped high, no gain past the clip)
    # A<0, r=0.5 < 0.8: max(0.5, 0.8) = 0.8 (clipped low); below the dual bound 3
    # A>0, r=1.1 inside: -2.2
    assert losses == pytest.approx([-1.28, 0.8, -2.2], abs=1e-6)


def test_unclipped_side_keeps_the_gradient_direction() -> None:
    # A>0 and r < 1 - clip_low: the unclipped term is larger, so the loss is -A r (gradient flows)
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    parts = policy_loss(logp, torch.zeros(1), torch.ones(1), torch.ones(1), CFG)
    parts.loss.backward()
    assert parts.loss.item() == pytest.approx(-0.5)
    assert logp.grad is not None and logp.grad.item() == pytest.approx(-0.5)
    assert parts.clip_frac.item() == 0.0


def test_dual_clip_bounds_negative_advantages() -> None:
    # A = -2, r = 5: PPO gives max(10, 2.56) = 10; dual clip caps at -c A = 6
    logp = torch.tensor([math.log(5.0)], requires_grad=True)
    parts = policy_loss(logp, torch.zeros(1), torch.tensor([-2.0]), torch.ones(1), CFG)
    assert parts.loss.item() == pytest.approx(6.0)
    assert parts.dual_clip_frac.item() == 1.0
    parts.loss.backward()
    assert logp.grad is not None and logp.grad.item() == 0.0  # a constant: no gradient
    no_dual = LossConfig(dual_clip=None)
    assert _per_token([math.log(5.0)], [0.0], [-2.0], no_dual) == pytest.approx([10.0])


def test_log_ratio_is_clamped() -> None:
    cfg = LossConfig(log_ratio_clamp=1.0, clip_high=100.0, dual_clip=None)
    assert _per_token([50.0], [0.0], [1.0], cfg) == pytest.approx([-math.e])


def test_k3_kl_and_its_weight() -> None:
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    d = -0.5
    assert k3_kl(logp, ref, 10.0).tolist() == pytest.approx([math.exp(d) - d - 1, 0.0])
    cfg = LossConfig(kl_coef=0.1)
    w = torch.tensor([0.5, 0.5])
    parts = policy_loss(logp, logp.clone(), torch.zeros(2), w, cfg, ref_logprobs=ref)
    assert parts.kl.item() == pytest.approx(0.5 * (math.exp(d) - d - 1))
    assert parts.loss.item() == pytest.approx(0.1 * parts.kl.item())


def test_aggregation_weights_and_masks() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    tok = aggregation_weights(mask, "token_mean", total_tokens=6, total_seqs=2)
    assert torch.allclose(tok, torch.tensor([[1 / 6, 1 / 6, 0, 0], [1 / 6] * 4]))
    seq = aggregation_weights(mask, "seq_mean", total_tokens=6, total_seqs=2)
    assert torch.allclose(seq, torch.tensor([[0.25, 0.25, 0, 0], [0.125] * 4]))
    # masked tokens contribute nothing, whatever their values
    logp = torch.tensor([[0.0, 0.0, 9.0, -9.0], [0.0, 0.0, 0.0, 0.0]])
    parts = policy_loss(logp, torch.zeros(2, 4), torch.ones(2, 4), seq, CFG)
    assert parts.loss.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="aggregation = 'mean'"):
        aggregation_weights(mask, "mean", total_tokens=6, total_seqs=2)


def test_grpo_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = grpo_advantages(rewards, groups, normalize_std=True, eps=1e-6)
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std
    assert adv[:3].tolist() == pytest.approx([(1 - mean) / (std + 1e-6), -mean / (std + 1e-6), -mean / (std + 1e-6)])
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # all-equal group
    raw = grpo_advantages(rewards, groups, normalize_std=False)
    assert raw[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    assert zero_variance_groups(rewards, groups).tolist() == [False] * 3 + [True] * 3
    assert grpo_advantages(torch.tensor([0.7]), torch.tensor([5])).tolist() == [0.0]  # a singleton: no comparison


def test_reinforce_with_and_without_baseline() -> None:
    rewards = torch.tensor([1.0, 0.5, 0.0])
    assert reinforce_advantages(rewards, baseline="none").tolist() == [1.0, 0.5, 0.0]
    assert reinforce_advantages(rewards, baseline="batch_mean").tolist() == pytest.approx([0.5, 0.0, -0.5])
    with pytest.raises(ValueError, match="baseline = 'ema'"):
        reinforce_advantages(rewards, baseline="ema")  # type: ignore[arg-type]


def test_loss_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="dual_clip = 0.5"):
        LossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low = 1.5"):
        LossConfig(clip_low=1.5)
