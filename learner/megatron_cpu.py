"""The one sanctioned compatibility shim: CPU stand-ins for megatron-core 0.16.1's CUDA-only spots.

megatron-core assumes a CUDA device in four places that the local (non transformer-engine) layers hit on CPU:

1. `parallel_state`'s global memory buffer allocates on `torch.cuda.current_device()` (used by TP all-gathers and
   the local attention's matmul input). Stand-in: the same buffer allocating on CPU.
2. The CUDA RNG tracker (`tensor_parallel.random`) forks `torch.cuda` RNG state around dropout and TP-sharded
   initialisation. Stand-in: a tracker with the same interface that forks the CPU generator.
3. `RotaryEmbedding.get_emb` moves `inv_freq` to the current CUDA device on first use. Stand-in: a subclass that
   computes the same table where `inv_freq` lives (`install_cpu_rope` swaps it in on a built model).
4. The local attention builds its default causal mask on CUDA when no mask is passed. Not patched: on CPU the
   learner always passes an explicit mask (`causal_mask`).

Nothing here edits megatron's files. `install()` sets the two module-level objects megatron reads (1 and 2) after
`initialize_model_parallel`; `install_cpu_rope()` retypes a built model's rotary embedding (3). Both are called by
`learner.model` only when the device is CPU, so the GPU path runs megatron untouched.
Remove an item here once megatron-core runs that spot on CPU by itself (tests/learner/test_megatron_cpu.py checks
each stand-in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import random as tp_random
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


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """megatron's boolean attention mask (True = masked out) for causal self-attention, shape (1, 1, S, S)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
