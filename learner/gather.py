"""Gather a TP-sharded GPTModel into full HF-named tensors, one parameter at a time (bounded memory).

Every TP rank of the group must iterate together (each parameter is one all-gather over the TP group); only the
ranks whose `keep` is true receive tensors, the others get an empty iterator after participating.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from ssp.learner.convert import canonical_params, is_tp_sharded, megatron_to_hf
from ssp.learner.model import ModelShape


@torch.no_grad()
def iter_hf_weights(model: torch.nn.Module, shape: ModelShape, *, tp_group: dist.ProcessGroup | None,
                    keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight, in module order; tied models yield no lm_head."""
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    for name, param in canonical_params(model):
        if tp > 1 and is_tp_sharded(name):
            shards = [torch.empty_like(param) for _ in range(tp)]
            dist.all_gather(shards, param.detach().contiguous(), group=tp_group)
        else:
            shards = [param.detach()]
        if keep:
            yield from megatron_to_hf(name, shards, shape)
