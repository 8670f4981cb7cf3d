"""Each CPU stand-in of learner/megatron_cpu.py does what megatron's CUDA original does, and the [learner] config
rejects bad values with the key, the rule and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssp.learner.config import LearnerConfig


def test_rng_tracker_forks_and_restores_the_cpu_generator(par1: Any) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from ssp.learner.megatron_cpu import CpuRNGStatesTracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, CpuRNGStatesTracker)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream did not move
    assert not torch.equal(inside, outside)  # the model-parallel stream is its own
    with pytest.raises(ValueError, match="never added"):
        with tracker.fork("nope"):
            pass


def test_global_memory_buffer_is_on_cpu_and_reused(par1: Any) -> None:
    from megatron.core import parallel_state

    buf = parallel_state.get_global_memory_buffer()
    a = buf.get_tensor((4, 5), torch.float32, "mpu")
    b = buf.get_tensor((2, 3), torch.float32, "mpu")
    assert a.device.type == "cpu" and a.shape == (4, 5) and b.data_ptr() == a.data_ptr()


def test_rope_table_matches_the_hf_formula(par1: Any) -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from ssp.learner.megatron_cpu import install_cpu_rope

    holder = torch.nn.Module()
    holder.rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=500, use_cpu_initialization=True)
    install_cpu_rope(holder)
    emb = holder.rope(6)  # (S, 1, 1, D)
    inv_freq = 1.0 / (500 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    freqs = torch.outer(torch.arange(6, dtype=torch.float32), inv_freq)
    assert torch.allclose(emb[:, 0, 0], torch.cat([freqs, freqs], dim=-1))


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2)])
def test_sdpa_attention_matches_megatrons_local_attention(par1: Any, heads: int, groups: int) -> None:
    """The stand-in, causal by itself (no mask) and with megatron's explicit mask, gives megatron's own output and
    input gradients, with and without grouped-query attention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ssp.learner.megatron_cpu import CpuSdpaAttention, install_cpu_attention

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=heads, num_query_groups=groups,
                               attention_dropout=0.0, use_cpu_initialization=True, cuda_graph_scope=[])
    holder = torch.nn.Module()
    holder.core = DotProductAttention(config, layer_number=2, attn_mask_type=AttnMaskType.causal,
                                      attention_type="self")
    s, b, d = 7, 2, 32 // heads
    torch.manual_seed(0)
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    hidden = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True = masked out

    def run(mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = holder.core(*inputs, mask)
        out.pow(2).sum().backward()
        return (out.detach(), *(t.grad for t in inputs))

    megatrons = run(hidden)  # megatron's CPU path needs the explicit mask
    install_cpu_attention(holder)
    assert type(holder.core) is CpuSdpaAttention
    for mask in (None, hidden):
        for ours, theirs in zip(run(mask), megatrons):
            assert torch.allclose(ours, theirs, atol=1e-5), (mask is None, (ours - theirs).abs().max())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel": 0}, "tensor_parallel = 0: must be >= 1"),
    ({"train_roles": ("verifier",)}, "train_roles = \\['verifier'\\]"),
    ({"role_loss_weights": {"judge": 1.0}}, "unknown roles \\['judge'\\]"),
    ({"lr": -1e-5}, "lr = -1e-05.*need lr >= 0"),
])
def test_learner_config_errors_name_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LearnerConfig(**kwargs)


def test_pipeline_parallel_is_refused_with_the_fix() -> None:
    from ssp.learner.model import ModelConfigError, init_parallel

    with pytest.raises(ModelConfigError, match="set learner.pipeline_parallel = 1"):
        init_parallel(tp=1, pp=2)
