"""Token logprobs and entropy from vocab-parallel logits (each TP rank holds V'/tp columns of the logits).

Shapes: B rows, S positions, Vl = this rank's vocab slice. Logits of padded vocab rows (ids >= the real vocab)
are masked out first, so probabilities match the HF model's exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def mask_padded_vocab(logits_bsv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocab ids (>= vocab_size) on this TP rank's slice to the dtype's minimum."""
    vl = logits_bsv.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * vl
    if start + vl <= vocab_size:
        return logits_bsv
    ids = torch.arange(start, start + vl, device=logits_bsv.device)
    return logits_bsv.masked_fill(ids >= vocab_size, torch.finfo(logits_bsv.dtype).min)


def token_logprobs(logits_bsv: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (B, S), differentiable, computed without gathering the vocab."""
    # megatron's kernel wants (S, B, Vl) and edits its input in place: give it its own float32 copy.
    logits_sbv = logits_bsv.transpose(0, 1).float().contiguous()
    nll_sb = tensor_parallel.vocab_parallel_cross_entropy(logits_sbv, targets_bs.transpose(0, 1).contiguous())
    return -nll_sb.transpose(0, 1)


def entropy(logits_bsv: torch.Tensor) -> torch.Tensor:
    """Entropy of the full-vocab softmax per position (B, S); differentiable, reduced over the TP group."""
    group = parallel_state.get_tensor_model_parallel_group()
    x = logits_bsv.float()
    with torch.no_grad():
        m = x.max(dim=-1, keepdim=True).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(x - m)
    sums = torch.stack([e.sum(-1), (e * x).sum(-1)])  # (2, B, S)
    sums = tensor_parallel.mappings.reduce_from_tensor_model_parallel_region(sums)
    z, ex = sums[0], sums[1]
    return torch.log(z) + m.squeeze(-1) - ex / z
