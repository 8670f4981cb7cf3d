"""The one sanctioned compatibility shim: CPU stand-ins for megatron-core 0.16.1's CUDA-only spots.

megatron-core assumes a CUDA device in four places that the local (non transformer-engine) layers hit on CPU:

1. `parallel_state`'s global memory buffer allocates on `torch.cuda.current_device()` (used by TP all-gathers and
   the local attention's matmul input). Stand-in: the same buffer allocating on CPU.
2. The CUDA RNG tracker (`tensor_parallel.random`) forks `torch.cuda` RNG state around dropout and TP-sharded
   initialisation. Stand-in: a tracker with the same interface that forks the CPU generator.
3. `RotaryEmbedding.get_emb` moves `inv_freq` to the current CUDA device on first use. Stand-in: a subclass that
   computes the same table where `inv_freq` lives (`install_cpu_rope` swaps it in on a built model).
4. The local attention (`DotProductAttention`) builds its default causal mask on CUDA when no mask is passed.
   Stand-in: `CpuSdpaAttention`, the same attention through torch's `scaled_dot_product_attention`, causal by
   itself when no mask is passed (an explicit megatron mask, True = masked out, is still honoured). It is also
   the faster one on CPU: megatron's version repeats K and V for every query head, writes the full S x S scores,
   masks and softmaxes them in separate passes and keeps them for backward, where SDPA's fused CPU kernel skips
   the masked half and never stores the scores (`install_cpu_attention` swaps it in on a built model).

Nothing here edits megatron's files. `install()` sets the two module-level objects megatron reads (1 and 2) after
`initialize_model_parallel`; `install_cpu_rope()` and `install_cpu_attention()` retype a built model's modules
(3, 4). They are called by `ssp.learner.model` only when the device is CPU, so the GPU path runs megatron untouched.
Remove an item here once megatron-core runs that spot on CPU by itself (tests/learner/test_megatron_cpu.py checks
each stand-in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import GlobalMemoryBuffer


class CpuGlobalMemoryBuffer(GlobalMemoryBuffer):
    """megatron's reusable scratch buffer, allocated on CPU instead of the current CUDA device."""

    def get_tensor(self, tensor_shape: Any, dtype: torch.dtype, name: str, mem_alloc_context: Any = None) -> torch.Tensor:
        numel = 1
        for dim in tensor_shape:
            numel *= int(dim)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype, device="cpu")
        return buf[:numel].view(*tensor_shape)


class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
    """The model-parallel RNG tracker over the CPU generator: named states, forked around dropout."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} is already tracked; every named state needs its own seed")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} is already tracked")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"rng state {name!r} was never added to the tracker")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class CpuRotaryEmbedding(RotaryEmbedding):
    """RoPE whose frequency table is computed on `inv_freq`'s own device (megatron moves it to CUDA first)."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # (S, D/2)
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
        return emb[:, None, None, :]


class CpuSdpaAttention(DotProductAttention):
    """megatron's local core attention computed by `F.scaled_dot_product_attention` (see item 4): same inputs
    (query (S, B, Nq, D), key and value (S, B, Ng, D)), same output (S, B, Nq * D), same scale and dropout."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("the CPU attention stand-in takes neither attention_bias nor packed sequences")
        if self.config.softmax_type != "vanilla" or self.config.window_size is not None:
            raise NotImplementedError(f"the CPU attention stand-in computes plain softmax attention, not "
                                      f"softmax_type = {self.config.softmax_type!r} / window_size = "
                                      f"{self.config.window_size!r}")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron's mask marks what is hidden, SDPA's boolean mask what is seen.
        allowed = None if attention_mask is None else ~attention_mask
        # megatron divides its scale by the layer number under query-key layer scaling and multiplies it back
        # inside the softmax: the scores are scaled by the plain 1/sqrt(D) (or the configured scale) either way.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (B, N, S, D) views
        dropout = self.attention_dropout.p if self.training else 0.0
        with tp_random.get_cuda_rng_tracker().fork():  # dropout draws from the model-parallel stream, as megatron's
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                     is_causal=causal, scale=scale,
                                                     enable_gqa=q.shape[1] != k.shape[1])
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def install(seed: int) -> None:
    """Put the CPU buffer and RNG tracker where megatron looks for them; call after initialize_model_parallel."""
    parallel_state._GLOBAL_MEMORY_BUFFER = CpuGlobalMemoryBuffer()
    tracker = CpuRNGStatesTracker()
    # Same seeding rule as megatron's model_parallel_cuda_manual_seed: TP ranks get distinct dropout streams.
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
    tp_random._CUDA_RNG_STATE_TRACKER = tracker
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def install_cpu_rope(model: torch.nn.Module) -> None:
    """Retype every RotaryEmbedding in a built model to the CPU stand-in (same state, same maths)."""
    for module in model.modules():
        if type(module) is RotaryEmbedding:
            module.__class__ = CpuRotaryEmbedding


def install_cpu_attention(model: torch.nn.Module) -> None:
    """Retype every megatron local core attention in a built model to the SDPA stand-in (it holds no weights)."""
    for module in model.modules():
        if type(module) is DotProductAttention:
            module.__class__ = CpuSdpaAttention
