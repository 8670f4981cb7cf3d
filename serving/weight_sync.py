"""Server side of SGLang's weight updates: the custom process group, receiving broadcasts, loading by HF name.

The group is built the way SGLang's `init_custom_process_group` builds it, so a trainer written against SGLang works
unchanged against this server (gloo on CPU, NCCL on GPU): TCP rendezvous at `tcp://master_address:master_port`
(the trainer, rank 0, hosts the store) -> `PrefixStore(group_name, store)` -> a new process group named `group_name`
(separate from any default group; this server process has none). Rank = rank_offset (we have one TP rank).

NOTE: like SGLang, this uses torch's `_new_process_group_helper`: the public `new_group` needs a default group,
which an inference server joining a trainer's group does not have.

Receiving, fastest first: a flattened bucket whose tensors are distinct parameters of exactly their dtype and shape
lands with no copy (`FlatLandings`: the received buffer becomes their storage); per-tensor broadcasts that fit land
straight in the parameters (`receive_into`); anything else (dtype casts, tied duplicates, unknown names: refused
without changing a weight) is received into fresh buffers and copied (`receive` + `load_named`).

Each joined group receives on a thread of its own (`JoinedGroup`), so a receive stuck on a group its trainer
abandoned does not hold the next group's receives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

T = TypeVar("T")

GROUP_TIMEOUT = timedelta(minutes=30)
"""SGLang's default process-group timeout."""


class WeightLoadError(RuntimeError):
    """Received tensors do not fit the model (unknown name, wrong shape, unaligned bucket)."""


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta = GROUP_TIMEOUT) -> dist.ProcessGroup:
    """Join (or, as rank 0, host) a process group separate from the default one. Blocks until all ranks joined."""
    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefixed = dist.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend), prefixed,
                                               group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


@dataclass(slots=True)
class JoinedGroup:
    """A weight-update group this server joined, and the one thread that receives its broadcasts (in order).

    One thread per group, not per server: when a member dies mid-broadcast the trainer abandons the group, but a
    receive already waiting on it stays stuck until the group's timeout (serving.weight_receive_timeout_s). Gloo
    notices neither the dead peer, nor the trainer closing its side, nor an abort() on our side (measured, torch 2.13).
    The stuck receive then holds only this thread, and the trainer's next group (a new name) receives on its own."""

    group: dist.ProcessGroup
    name: str
    receiver: concurrent.futures.ThreadPoolExecutor = field(init=False)
    receiving: int = 0
    """Receives submitted and not yet ended (counted on the event loop)."""

    def __post_init__(self) -> None:
        self.receiver = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                              thread_name_prefix=f"ssp-weight-receive-{self.name}")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` (a receive) on this group's thread, after every receive submitted before it."""
        self.receiving += 1
        try:
            return await asyncio.wrap_future(self.receiver.submit(fn))
        finally:
            self.receiving -= 1

    async def destroy(self) -> bool:
        """Destroy the group after its receives: True once done; False if a receive still waits on it, in which case
        this returns at once and the group is destroyed on its thread when that receive ends (destroying a group under
        a running collective is undefined, and waiting here would hold the caller until the group's timeout)."""
        destroyed = self.receiver.submit(dist.destroy_process_group, self.group)
        self.receiver.shutdown(wait=False)
        if self.receiving:
            return False
        await asyncio.wrap_future(destroyed)
        return True


def dtype_from_name(name: str) -> torch.dtype:
    """SGLang's wire dtype names are torch attribute names without the prefix ("bfloat16", "float32")."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightLoadError(f"unknown dtype {name!r}; use a torch dtype name such as 'float32' or 'bfloat16'")
    return dtype


def receive(group: dist.ProcessGroup, *, dtypes: list[str], shapes: list[list[int]], flattened: bool,
            device: torch.device) -> list[torch.Tensor]:
    """Receive the tensors rank 0 broadcasts for one update call, in `names` order (as SGLang does)."""
    torch_dtypes = [dtype_from_name(d) for d in dtypes]
    if not flattened:
        tensors = [torch.empty(shape, dtype=dt, device=device) for dt, shape in zip(torch_dtypes, shapes)]
        works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
        for w in works:
            w.wait()
        return tensors
    sizes = [torch.Size(shape).numel() * dt.itemsize for dt, shape in zip(torch_dtypes, shapes)]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0, group=group)
    tensors, offset = [], 0
    for dt, shape, size in zip(torch_dtypes, shapes, sizes):
        if offset % dt.itemsize:
            raise WeightLoadError(f"Unaligned received tensor at byte offset {offset} for dtype {dt}: each tensor in a "
                                  "flattened bucket must start at a multiple of its element size")
        tensors.append(buffer[offset:offset + size].view(dt).reshape(shape))
        offset += size
    return tensors


@dataclass(slots=True)
class _Landing:
    """One flattened-bucket layout whose parameters are views into `buffer`, at the offsets the layout gives."""

    buffer: torch.Tensor
    params: list[torch.nn.Parameter]
    data_ptrs: list[int]

    def intact(self) -> bool:
        """No parameter was re-homed since (by another layout); copies in place keep a landing intact."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.data_ptrs))


class FlatLandings:
    """Receives flattened buckets with no copy: the buffer a bucket is broadcast into becomes its parameters' storage.

    The first time a layout (names, dtypes, shapes) arrives, it is received into a new buffer and each parameter's
    `.data` becomes a view of its slice; a later push with the same layout is broadcast straight into that buffer,
    i.e. into the live parameters. Why: on CPU, receiving into a staging buffer and copying into the parameters cost
    more than the broadcast itself (a fresh buffer page-faults on every push, then a second memcpy), `ssp bench push`.
    A layout qualifies only if every name is a distinct parameter of exactly that dtype and shape on one device (so
    tied duplicates, dtype casts and unknown names take the copying path, `receive` + `load_named`).
    """

    def __init__(self) -> None:
        self._landings: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...]], _Landing] = {}

    @torch.no_grad()
    def receive(self, group: dist.ProcessGroup, model: torch.nn.Module, *, names: list[str], dtypes: list[str],
                shapes: list[list[int]]) -> bool:
        """Receive one flattened bucket into the parameters; False (nothing received) if the layout does not qualify.
        Runs where nothing reads the weights meanwhile (the server is paused or holds the writer lock)."""
        key = (tuple(names), tuple(dtypes), tuple(tuple(s) for s in shapes))
        landing = self._landings.get(key)
        if landing is not None and landing.intact():
            dist.broadcast(landing.buffer, src=0, group=group)
            return True
        params = _distinct_params(model, names, dtypes, shapes)
        if params is None:
            return False
        sizes = [p.numel() * p.element_size() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        if any(off % p.element_size() for off, p in zip(offsets, params)):
            return False  # the copying path reports the unaligned tensor
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=params[0].device)
        dist.broadcast(buffer, src=0, group=group)
        for p, off, size in zip(params, offsets, sizes):
            p.data = buffer[off:off + size].view(p.dtype).view(p.shape)
        self._landings = {k: v for k, v in self._landings.items() if v.intact()}
        self._landings[key] = _Landing(buffer, params, [p.data_ptr() for p in params])
        return True


def _distinct_params(model: torch.nn.Module, names: list[str], dtypes: list[str],
                     shapes: list[list[int]]) -> list[torch.nn.Parameter] | None:
    """The parameters named, if each is a distinct parameter of exactly that dtype and shape, all on one device."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    params = [by_name.get(n) for n in names]
    if any(p is None for p in params) or len({id(p) for p in params}) != len(params):
        return None
    found: list[torch.nn.Parameter] = params  # type: ignore[assignment]
    if len({p.device for p in found}) != 1:
        return None
    if any(list(p.shape) != list(s) or str(p.dtype).removeprefix("torch.") != d
           for p, s, d in zip(found, shapes, dtypes)):
        return None
    return found


def fits_in_place(params: dict[str, torch.Tensor], names: list[str], dtypes: list[str],
                  shapes: list[list[int]]) -> bool:
    """Every tensor of an update call is a contiguous parameter of exactly its shape and dtype (so a broadcast can
    land in it directly)."""
    return all(name in params and list(params[name].shape) == list(shape) and params[name].is_contiguous()
               and str(params[name].dtype).removeprefix("torch.") == dtype
               for name, dtype, shape in zip(names, dtypes, shapes))


@torch.no_grad()
def receive_into(group: dist.ProcessGroup, targets: list[torch.Tensor]) -> None:
    """Receive one update call's per-tensor broadcasts straight into `targets` (the parameters), in order."""
    works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in targets]
    for w in works:
        w.wait()


def check_fits(params: dict[str, torch.Tensor], names: list[str], shapes: list[list[int]]) -> None:
    """Every name must be a model parameter of exactly that shape; checked before anything is copied."""
    for name, shape in zip(names, shapes):
        if name not in params:
            raise WeightLoadError(f"unknown parameter {name!r} (names are Hugging Face checkpoint names such as "
                                  "'model.layers.0.self_attn.q_proj.weight')")
        if list(params[name].shape) != list(shape):
            raise WeightLoadError(f"parameter {name!r} has shape {list(params[name].shape)}, received {list(shape)}")


@torch.no_grad()
def load_named(params: dict[str, torch.Tensor], named: list[tuple[str, torch.Tensor]]) -> None:
    """Copy tensors into the model's parameters in place (dtype converted; tied weights share storage)."""
    check_fits(params, [n for n, _ in named], [list(t.shape) for _, t in named])
    for name, tensor in named:
        params[name].copy_(tensor)
