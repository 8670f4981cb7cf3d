"""Advantage estimators per role, as pure tensor functions (rewards in, one advantage per trajectory out).

Shapes: N = trajectories of one role in the batch. `group_ids` is an int tensor (N,) naming each trajectory's
group (for the solver: the G rollouts of one question). The trainer broadcasts each advantage over the
trajectory's loss tokens.

- Solver: GRPO. A_i = (r_i - mean_g) / (std_g + eps) with torch's unbiased std (as SSP's reference), or
  A_i = r_i - mean_g without std normalisation. All-equal groups give exactly 0 (and are dropped by default
  before training, see `zero_variance_groups`).
- Proposer: REINFORCE. A_i = r_i - b with b = the batch mean of proposer rewards (our default), or b = 0
  (the reference script's accidental choice: verl's GRPO over singleton groups).
"""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["batch_mean", "none"]


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-trajectory group mean, unbiased group std (0 for singletons) and group size, each (N,)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    r = rewards.to(torch.float64)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r)
    means = sums / counts
    sq = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, (r - means[inverse]) ** 2)
    var = torch.where(counts > 1, sq / (counts - 1).clamp(min=1), torch.zeros_like(sq))
    return means[inverse], var.sqrt()[inverse], counts[inverse]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (N,), float32. Groups of one trajectory get 0: they carry no comparison."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    mean, std, count = _group_stats(rewards, group_ids)
    adv = rewards.to(torch.float64) - mean
    if normalize_std:
        adv = adv / (std + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(torch.float32)


def reinforce_advantages(rewards: torch.Tensor, *, baseline: Baseline = "batch_mean") -> torch.Tensor:
    """REINFORCE advantages (N,): the reward minus the batch-mean baseline, or the raw reward."""
    if baseline == "none":
        return rewards.to(torch.float32).clone()
    if baseline == "batch_mean":
        r = rewards.to(torch.float64)
        return (r - r.mean()).to(torch.float32) if len(r) else r.to(torch.float32)
    raise ValueError(f"baseline = {baseline!r}: must be 'batch_mean' or 'none'")


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool (N,): true where the trajectory's group has all-equal rewards (its GRPO advantage is 0)."""
    _, std, _ = _group_stats(rewards, group_ids)
    return std == 0
