"""The policy loss as pure tensor functions: PPO clipped ratio against the rollout logprobs, dual clip, optional
k3 KL to a frozen reference, entropy bonus, and the weights that turn token losses into a batch mean.

Shapes: every per-token tensor is (B, S) or (T,) alike; `weights` already holds mask x role weight x aggregation
normaliser (see `aggregation_weights`), so the batch loss is sum(token_loss * weights) and micro-batches simply add
up: one optimizer step sees exactly the mean the config asks for, whatever the micro-batch split.

Per token, with r = exp(clamp(logp - old_logp, +-log_ratio_clamp)) and advantage A:
    pg     = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))     (PPO, pessimistic)
    pg     = min(pg, -c A)  where A < 0                               (dual clip, c = dual_clip)
    kl     = clamp(exp(ref - logp) - (ref - logp) - 1, +-kl_clamp)    (k3, "low_var_kl")
    loss   = pg + kl_coef * kl - entropy_coef * entropy
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssp.learner.config import LossConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class LossParts:
    """The batch loss and its parts, each already aggregated with the same weights (scalars)."""

    loss: torch.Tensor
    """What backward() is called on."""
    pg_loss: torch.Tensor
    """The clipped policy-gradient part."""
    kl: torch.Tensor
    """Weighted mean k3 KL to the reference (0 when there is no reference)."""
    entropy: torch.Tensor
    """Weighted mean token entropy (0 when not given)."""
    clip_frac: torch.Tensor
    """Weighted fraction of tokens where the ratio clip was active."""
    dual_clip_frac: torch.Tensor
    """Weighted fraction of tokens where the dual clip was active (negative advantages only)."""


def aggregation_weights(loss_mask: torch.Tensor, mode: str, *, total_tokens: int, total_seqs: int) -> torch.Tensor:
    """Per-token weights (B, S) for rows that are one sequence each, normalised over the whole batch.

    token_mean: mask / total_tokens (every loss token of the batch counts the same);
    seq_mean:   mask / (tokens of this row) / total_seqs (every sequence counts the same).
    `total_*` are batch-wide counts (all micro-batches, all data-parallel ranks).
    """
    mask = loss_mask.to(torch.float32)
    if mode == "token_mean":
        return mask / max(total_tokens, 1)
    if mode == "seq_mean":
        per_row = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        return mask / per_row / max(total_seqs, 1)
    raise ValueError(f"aggregation = {mode!r}: must be 'token_mean' or 'seq_mean'")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref), clamped to [-clamp, clamp]; >= 0 before clamping."""
    delta = ref_logprobs - logprobs
    return (torch.exp(delta) - delta - 1.0).clamp(-clamp, clamp)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                weights: torch.Tensor, cfg: LossConfig, *, ref_logprobs: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None) -> LossParts:
    """The weighted PPO loss of one micro-batch (or a whole batch); gradients flow through `logprobs` only."""
    log_ratio = (logprobs - old_logprobs).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(unclipped, clipped)
    clip_active = (clipped > unclipped).to(weights.dtype)
    dual_active = torch.zeros_like(weights)
    if cfg.dual_clip is not None:
        bound = -advantages * cfg.dual_clip
        dual = (advantages < 0) & (pg > bound)
        pg = torch.where(dual, bound, pg)
        dual_active = dual.to(weights.dtype)
    token_loss = pg
    zero = weights.new_zeros(())
    kl_mean = zero
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs, cfg.kl_clamp)
        token_loss = token_loss + cfg.kl_coef * kl
        kl_mean = (kl * weights).sum()
    ent_mean = zero
    if entropy is not None:
        ent_mean = (entropy.detach() * weights).sum()
        if cfg.entropy_coef:
            token_loss = token_loss - cfg.entropy_coef * entropy
    return LossParts(
        loss=(token_loss * weights).sum(),
        pg_loss=(pg * weights).sum().detach(),
        kl=kl_mean.detach(),
        entropy=ent_mean,
        clip_frac=(clip_active * weights).sum(),
        dual_clip_frac=(dual_active * weights).sum(),
    )
