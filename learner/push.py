"""Push the learner's weights to inference servers with SGLang's distributed update (NCCL/gloo broadcast).

Lifecycle of a `WeightPusher` (run on learner rank 0 only; other TP ranks only help gather):

    pusher = WeightPusher(["http://127.0.0.1:30000"], backend="gloo")
    pusher.connect()        # reset what a dead pusher left (end_weight_update, destroy_weights_update_group of
                            # every group /server_info lists and of ours, continue_generation), then POST
                            # /init_weights_update_group to every server (as tasks) while rank 0 joins
    stats = pusher.push(iter_hf_weights(...), version="1")
                            # pause(in_place | retract) -> begin_weight_update (404: not needed) -> per bucket:
                            #   update_weights_from_distributed(flattened_bucket) while rank 0 broadcasts it
                            #   (the last bucket carries weight_version and, on retract, flush_cache)
                            #   -> end -> (in_place: flush_cache if the server holds no request) -> continue
    pusher.close()          # destroy the group on every server and here

A push that fails midway (a server died, refused a call, did not answer) abandons the group at once: our side aborts and
is freed on a daemon thread (freeing a gloo group waits for a broadcast stuck on a dead member), and every server that
answers destroys its side, ends its session and continues generating, holding a mix of old and new weights under its old
label until the next push, over a new group, replaces them (ssp.learner.push_recovery). Why not wait for gloo: it often
notices no dead peer mid-broadcast, and both our send and the survivors' receives then wait out the group's timeout
(learner.push_timeout_s). So each bucket waits for every server's acknowledgement first, and a connection refused or
reset there fails the push in milliseconds.

In-flight requests and the KV cache (`pause_mode`): most pushes pause "in_place": running requests keep their KV and
go on decoding with the new weights the moment the servers continue (PipelineRL's in-flight update), and the prefix
cache stays (SGLang cannot flush while requests hold KV). Every `kv_refresh_every`-th push pauses with "retract" and
flushes: every request then re-prefills its whole context on the new weights, so no cached KV is more than
`kv_refresh_every` versions old. Why not always retract: the re-prefill of every in-flight context and of every
flushed one cost 22% of the servers' time at 256 episodes per step, and async training reached 83% of its bound
instead of 99% (`ssp bench async-vs-sync`). Each token still records the version that sampled it, so the learner's
ratio against the rollout log-probs sees exactly what was sampled.

The HTTP calls block on the servers until the matching broadcast arrives, so they run on an asyncio loop in a
helper thread while the calling thread broadcasts. Backend "gloo" (CPU tensors) or "nccl" (GPU tensors): same code.

Every bucket goes as one `flattened_bucket` broadcast packed into one of two staging buffers that live as long as the
pusher: bucket k+1 is packed (one copy per tensor, straight from the source, non-contiguous views included) while
bucket k is on the wire, and bucket sizes ramp up (`plan_buckets`) so that little is packed before the first send.
Why (`ssp bench push`, gloo on 2 CPU cores): one broadcast per tensor ran at ~0.6x the bandwidth of the same bytes in
large buffers, and packing into a freshly allocated buffer per bucket (torch.cat) cost more than the broadcast itself
(first-touch page faults); reused buffers make packing a plain memcpy that overlaps the wire. The reference server
receives such buckets with no copy (serving/weight_sync.py, FlatLandings).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ssp.processes import free_port

log = logging.getLogger(__name__)
T = TypeVar("T")

ABANDON_TIMEOUT_S = 30.0
"""How long the calls that abandon a failed push's group may take on a server (each answers at once on a live one, a
dead one refuses at once); beyond it the server is left to its own session expiry."""

GROUPS_FIELD = "weight_update_groups"
"""The /server_info field where the reference server lists the weight-update groups it holds (serving/app.py)."""


class PushError(RuntimeError):
    """A server refused or failed a weight-update call; the message names the server and its reply."""


class PushState(enum.Enum):
    NEW = "new"              # constructed; connect() not called
    CONNECTED = "connected"  # the update group exists; push() allowed
    BROKEN = "broken"        # a push failed midway and its group was abandoned; only close() is allowed
    CLOSED = "closed"        # group destroyed; the object cannot be reused


@dataclass(frozen=True, kw_only=True, slots=True)
class PushStats:
    """One push: wall time, bytes broadcast, throughput, buckets, and where the time outside the wire went."""

    version: str
    pause_mode: str
    """"in_place" or "retract" (`pause_mode()`)."""
    seconds: float
    bytes: int
    buckets: int
    tensors: int
    control_s: float
    """Seconds in the calls around the buckets: pause, begin_weight_update, end_weight_update, (in place) flush_cache,
    continue."""
    first_pack_s: float
    """Seconds packing the first bucket, before anything is on the wire (later packs overlap the sends)."""
    pack_s: float
    """Seconds packing all buckets (first_pack_s included): CPU work that shares the cores with a gloo send."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


@dataclass(kw_only=True, slots=True)
class _Streamed:
    """What `_stream` sent, counted as it goes."""

    first_pack_s: float
    pack_s: float = 0.0
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0


RAMP = 8
"""The first bucket holds at most 1/RAMP of bytes_per_bucket; each next limit is 1.5x the one before, up to it."""


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]],
                 bytes_per_bucket: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into the buckets a push sends, in order.

    - Ramp: bucket limits grow from bytes_per_bucket / RAMP by 1.5x up to bytes_per_bucket, because nothing is on
      the wire while the first bucket is packed, and each later bucket is packed while the one before is sent: a
      memcpy on a busy 2-core machine runs at only ~1.5x the gloo wire, so doubling left the wire idle (measured).
    - Alignment: a tensor whose byte offset would not be a multiple of its element size starts a new bucket (the
      flattened_bucket format has no padding, and a server refuses an unaligned tensor; mixed dtypes can cause one).
    - A tensor larger than the limit gets a bucket of its own.
    """
    if bytes_per_bucket <= 0:
        raise ValueError(f"bytes_per_bucket = {bytes_per_bucket}: must be > 0")
    limit = max(bytes_per_bucket // RAMP, 1)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or size % t.element_size()):
            yield bucket
            bucket, size = [], 0
            limit = min(limit * 3 // 2, bytes_per_bucket)
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class Staging:
    """Two flat byte buffers, reused for every bucket of every push (they grow only for an oversized tensor)."""

    def __init__(self, bytes_per_bucket: int, device: torch.device) -> None:
        self.bytes_per_bucket = bytes_per_bucket
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None, None]

    def pack(self, slot: int, bucket: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The bucket's raw bytes, in order, without padding (SGLang's flattened_bucket layout) in buffer `slot`; a
        bucket of one contiguous tensor (the embedding, typically: larger than the first ramp step) is its own bytes,
        sent without a copy (the caller keeps it unchanged until push() returns)."""
        if len(bucket) == 1 and bucket[0][1].is_contiguous() and bucket[0][1].device == self.device:
            return bucket[0][1].detach().view(-1).view(torch.uint8)
        total = sum(t.numel() * t.element_size() for _, t in bucket)
        buf = self.buffers[slot]
        if buf is None or buf.numel() < total:
            buf = self.buffers[slot] = torch.empty(max(total, self.bytes_per_bucket), dtype=torch.uint8,
                                                   device=self.device)
        offset = 0
        with torch.no_grad():
            for _, t in bucket:
                size = t.numel() * t.element_size()
                buf[offset:offset + size].view(t.dtype).view(t.shape).copy_(t)
                offset += size
        return buf[:total]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pause_mode(push_number: int, kv_refresh_every: int) -> str:
    """How push `push_number` (1, 2, ...) pauses the servers: "retract" (and flush) every `kv_refresh_every`-th
    push, "in_place" otherwise (see the module docstring)."""
    if kv_refresh_every < 1:
        raise ValueError(f"kv_refresh_every = {kv_refresh_every}: must be >= 1 (1 = retract and flush on every push)")
    return "retract" if push_number % kv_refresh_every == 0 else "in_place"


def _release_in_background(held: list[dist.ProcessGroup]) -> None:
    """Free an abandoned group, whose only reference is in `held`, on a daemon thread. Freeing a gloo group joins its
    worker threads, and one stuck in a broadcast to a dead member (abort() does not end it, measured with torch 2.13)
    holds that join until the group's timeout: learner.push_timeout_s, ten minutes by default. On the caller's thread
    that stalled the push's failure, and the re-formed push, for as long."""
    threading.Thread(target=held.clear, name="ssp-abandoned-group", daemon=True).start()


class WeightPusher:
    """Owns the weight-update process group to a set of servers and the HTTP session that drives them."""

    def __init__(self, server_urls: list[str], *, backend: str, master_address: str = "127.0.0.1",
                 master_port: int = 0, group_name: str = "weight_update_group", bytes_per_bucket: int = 512 << 20,
                 timeout_s: float = 600.0, kv_refresh_every: int = 1, api_key: str | None = None) -> None:
        """`api_key`: the servers' admin key (learner.push_api_key_file), sent with every call: all of them are
        admin routes. `group_name` may be changed until connect() (RecoveringPusher names each group it forms)."""
        if not server_urls:
            raise ValueError("WeightPusher needs at least one server URL")
        self.urls = [u.rstrip("/") for u in server_urls]
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.bytes_per_bucket = bytes_per_bucket
        self.timeout_s = timeout_s
        self._api_key = api_key
        pause_mode(1, kv_refresh_every)  # validates it
        self.kv_refresh_every = kv_refresh_every
        self.pushes = 0
        """Pushes started so far (the count pause_mode() schedules by)."""
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._staging = Staging(bytes_per_bucket, self.device)
        self.state = PushState.NEW
        self._group: dist.ProcessGroup | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="weight-push-http", daemon=True)
        self._thread.start()
        self._session: Any = None
        self._clients: list[Any] = []
        self._posted: list[Future[Any]] = []
        """This push's update calls (cancelled when it fails, so no further bucket goes out)."""

    # ---------------------------------------------------------------- plumbing between the threads

    def _submit(self, coro: Coroutine[Any, Any, T]) -> "asyncio.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[return-value]

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return self._submit(coro).result(timeout=self.timeout_s if timeout_s is None else timeout_s)

    async def _open_clients(self) -> None:
        import aiohttp

        from ssp.engine.client import ServerClient

        self._session = aiohttp.ClientSession()
        self._clients = [ServerClient(u, self._session, admin_timeout_s=self.timeout_s, api_key=self._api_key)
                         for u in self.urls]

    async def _all(self, method: str, **kwargs: Any) -> list[Any]:
        return list(await asyncio.gather(*(getattr(c, method)(**kwargs) for c in self._clients)))

    async def _all_settled(self, method: str, **kwargs: Any) -> list[Any]:
        """`_all`, with a server's exception (e.g. it is unreachable) in its place instead of raised."""
        return list(await asyncio.gather(*(getattr(c, method)(**kwargs) for c in self._clients),
                                         return_exceptions=True))

    def _best_effort(self, method: str, doing: str, timeout_s: float | None = None, **kwargs: Any) -> None:
        """`method` on every server; a server that fails it (or cannot be reached) is logged, not raised: what
        cleans up after a failure must reach every server it can."""
        results = self._run(self._all_settled(method, **kwargs), timeout_s=timeout_s)
        for url, r in zip(self.urls, results):
            if isinstance(r, BaseException) or not r.success:
                log.warning("%s: %s on %s: %s", doing, method, url, r if isinstance(r, BaseException) else r.message)

    async def _destroy_on_each(self, names: list[list[str]]) -> list[list[Any]]:
        """destroy_weights_update_group on every server (concurrently) for each of its `names` (in turn)."""
        return list(await asyncio.gather(*(_destroy_each(c, n) for c, n in zip(self._clients, names))))

    def _check(self, results: list[Any], what: str) -> None:
        bad = [r for r in results if not r.success]
        if bad:
            raise PushError(f"{what} failed on {len(bad)} server(s): " +
                            "; ".join(f"{r.url}: {r.message}" for r in bad))

    # ---------------------------------------------------------------- lifecycle

    def connect(self) -> None:
        """Create the update group: every server's TP ranks join (rank_offset from /server_info) and we join as 0."""
        if self.state is not PushState.NEW:
            raise RuntimeError(f"connect() on a pusher in state {self.state.value}; create a new WeightPusher")
        self._run(self._open_clients())
        infos = self._run(self._all("server_info"))
        self._reset_servers(infos)
        tp_sizes = [int(info.get("tp_size", 1)) for info in infos]
        world_size = 1 + sum(tp_sizes)
        port = self.master_port or free_port(self.master_address)
        offsets = [1 + sum(tp_sizes[:k]) for k in range(len(tp_sizes))]
        joins = [self._submit(c.init_weights_update_group(
            master_address=self.master_address, master_port=port, rank_offset=off, world_size=world_size,
            group_name=self.group_name, backend=self.backend)) for c, off in zip(self._clients, offsets)]
        self._group = _init_custom_group(f"tcp://{self.master_address}:{port}", world_size, self.group_name,
                                         self.backend, timedelta(seconds=self.timeout_s))
        self._check([j.result(timeout=self.timeout_s) for j in joins], "init_weights_update_group")
        self.state = PushState.CONNECTED
        log.info("weight-update group %s up: %d server(s), world size %d", self.group_name, len(self.urls),
                 world_size)

    def _reset_servers(self, infos: list[dict[str, Any]]) -> None:
        """Undo what a pusher that died mid-push left on the servers: an open weight-update session, its groups, a
        pause. Without this a restarted learner could not push until the servers were restarted too ("already
        open", "already exists"). Plain SGLang calls, so a real SGLang server takes them; each one finding nothing
        to undo answers success false, which is expected here.

        The groups destroyed on a server are those its /server_info (`infos`, in server order) lists, plus our own
        name (`leftover_groups`): a dead RecoveringPusher may have re-formed to "<base>-<n>", a name this one never
        uses, whose sockets to the dead learner's store the server would otherwise keep until it restarts."""
        self._run(self._all("end_weight_update"))
        names = [leftover_groups(info, self.group_name) for info in infos]
        destroyed = self._run(self._destroy_on_each(names))
        for url, server_names, results in zip(self.urls, names, destroyed):
            for name, result in zip(server_names, results):
                if result.success:
                    log.warning("%s still held weight-update group %r from an earlier pusher; destroyed it", url,
                                name)
        self._check(self._run(self._all("continue_")), "continue_generation")

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> PushStats:
        """One full weight update, bracketed by pause/continue; any failure abandons the group (module docstring)
        and leaves the pusher BROKEN."""
        if self.state is not PushState.CONNECTED:
            raise RuntimeError(f"push() on a pusher in state {self.state.value}; connect() first "
                               "(a BROKEN pusher means the servers may hold mixed weights: restart them)")
        start = time.perf_counter()
        self.pushes += 1
        self._posted = []
        mode = pause_mode(self.pushes, self.kv_refresh_every)
        try:
            self._check(self._run(self._all("pause", mode=mode)), "pause_generation")
            self._check(self._run(self._all("begin_weight_update")), "begin_weight_update")
            control_s = time.perf_counter() - start
            sent = self._stream(named_tensors, version, flush=mode == "retract")
            t_end = time.perf_counter()
            self._check(self._run(self._all("end_weight_update")), "end_weight_update")
            if mode == "in_place":
                # A server that holds no request (a synchronous schedule pushes between phases) can still drop its
                # old-weight prefix cache; one that does refuses (400), and its KV stays, as in_place intends.
                self._run(self._all("flush_cache"))
            self._check(self._run(self._all("continue_")), "continue_generation")
        except BaseException:
            self._abandon()
            raise
        done = time.perf_counter()
        stats = PushStats(version=version, pause_mode=mode, seconds=done - start, bytes=sent.bytes,
                          buckets=sent.buckets, tensors=sent.tensors, control_s=control_s + done - t_end,
                          first_pack_s=sent.first_pack_s, pack_s=sent.pack_s)
        log.info("pushed weights v%s: %.1f MB in %.2f s (%.3f GB/s, %d buckets)", version, stats.bytes / 1e6,
                 stats.seconds, stats.gb_per_s, stats.buckets)
        return stats

    def relabel(self, version: str) -> None:
        """Label the servers' current weights `version` without sending any: a step that trained nothing still
        advances the policy version (its weights are the previous version's), and the engine's staleness gate,
        which reads the servers' version, must see it move."""
        if self.state is not PushState.CONNECTED:
            raise RuntimeError(f"relabel() on a pusher in state {self.state.value}; connect() first")
        self._check(self._run(self._all("update_weight_version", new_version=version)), "update_weight_version")
        log.info("relabelled the servers' weights v%s (nothing trained this step)", version)

    def _stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str, *, flush: bool) -> _Streamed:
        """Send every bucket. The bucket after the one on the wire is already fetched (so the last one is known: it
        carries the version and the flush), packed during the send, and its HTTP call is chained to the current one's
        reply in the HTTP thread, so it goes out the moment the server acknowledges (SGLang takes one update call at
        a time per server), without a hop through this thread."""
        queue = plan_buckets(named_tensors, self.bytes_per_bucket)
        current = next(queue, None)
        if current is None:
            raise PushError("push() got no tensors to send")
        t0 = time.perf_counter()
        slot, flat = 0, self._staging.pack(0, current)
        first_pack_s = time.perf_counter() - t0
        upcoming = next(queue, None)
        calls = self._post(current, after=None, last=upcoming is None, version=version, flush=flush)
        out = _Streamed(first_pack_s=first_pack_s, pack_s=first_pack_s)
        while True:
            work = dist.broadcast(flat, src=0, group=self._group, async_op=True)
            if upcoming is not None:  # overlaps the broadcast: the other buffer is free (its send was awaited)
                t0 = time.perf_counter()
                next_flat = self._staging.pack(1 - slot, upcoming)
                out.pack_s += time.perf_counter() - t0
                following = next(queue, None)
                next_calls = self._post(upcoming, after=calls, last=following is None, version=version,
                                        flush=flush)
            self._await_bucket(work, calls)
            out.bytes += flat.numel()
            out.buckets += 1
            out.tensors += len(current)
            if upcoming is None:
                return out
            current, upcoming, calls, flat, slot = upcoming, following, next_calls, next_flat, 1 - slot

    def _post(self, bucket: list[tuple[str, torch.Tensor]], *, after: list["Future[Any]"] | None, last: bool,
              version: str, flush: bool) -> list["Future[Any]"]:
        """One update_weights_from_distributed call per server, each sent once that server's `after` call succeeded."""
        body = {"names": [n for n, _ in bucket], "dtypes": [_dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                "load_format": "flattened_bucket", "flush_cache": last and flush,
                "weight_version": version if last else None}
        calls = [self._submit(_update_after(c, None if after is None else after[i], body))
                 for i, c in enumerate(self._clients)]
        self._posted += calls
        return calls

    def _await_bucket(self, work: Any, calls: list["Future[Any]"]) -> None:
        """Wait for one bucket: every server's acknowledgement first, then our side of the broadcast (done once all
        have received it). A call that fails, a connection refused or reset by a server that died, fails the push as
        it comes, while our broadcast may still wait on that server (see the module docstring)."""
        urls = dict(zip(calls, self.urls))
        deadline = time.monotonic() + self.timeout_s
        pending: set[Future[Any]] = set(calls)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=max(deadline - time.monotonic(), 0.0),
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                raise PushError(f"update_weights_from_distributed: no answer within {self.timeout_s:g} s "
                                f"(learner.push_timeout_s) from {sorted(urls[c] for c in pending)}")
            self._check([c.result() for c in done], "update_weights_from_distributed")
        work.wait()

    def _abandon(self) -> None:
        """After a failed push: abort and destroy our side of the group, stop the calls not yet sent, and have every
        server that answers destroy its side (at once, even while a receive waits on it), end its session and
        continue. Best effort: a server that fails these calls is logged and left to its session expiry. The
        original failure is what the caller raises."""
        self.state = PushState.BROKEN
        for call in self._posted:
            call.cancel()
        self._posted = []
        if self._group is None:
            return
        held, self._group = [self._group], None  # the group's only reference from here (_release_in_background)
        try:
            try:
                held[0].abort()  # ends a collective stuck on a dead member with NCCL; gloo's goes on
                dist.destroy_process_group(held[0])
            finally:
                _release_in_background(held)
            doing = f"abandoning group {self.group_name!r}"
            self._best_effort("destroy_weights_update_group", doing, ABANDON_TIMEOUT_S, group_name=self.group_name)
            self._best_effort("end_weight_update", doing, ABANDON_TIMEOUT_S)
            self._best_effort("continue_", doing, ABANDON_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the push failed already; its error is the one to report
            log.warning("abandoning weight-update group %r: %s: %s", self.group_name, type(e).__name__, e)
        log.warning("abandoned weight-update group %r after a failed push", self.group_name)

    def close(self) -> None:
        """Destroy the group here, then on the servers (a failed push abandoned it already); close the HTTP session,
        stop the helper thread. A server that does not answer (dead) is logged and skipped: closing must work after
        any failure."""
        if self.state is PushState.CLOSED:
            return
        try:
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None
                self._best_effort("destroy_weights_update_group", f"closing group {self.group_name!r}",
                                  group_name=self.group_name)
            if self._session is not None:
                self._run(self._session.close())
        finally:
            self._group = None
            self._staging.buffers = [None, None]
            self.state = PushState.CLOSED
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


def leftover_groups(server_info: dict[str, Any], own_name: str) -> list[str]:
    """The weight-update groups a new pusher destroys on a server before it joins: every one the server lists in
    /server_info (GROUPS_FIELD) and `own_name`. A server that lists none (a real SGLang server has no such field)
    gets `own_name` only, so there a group a dead pusher re-formed under another name stays until the server
    restarts (or the learner reuses that name)."""
    listed = server_info.get(GROUPS_FIELD)
    names = {str(name) for name in listed} if isinstance(listed, list) else set()
    return sorted(names | {own_name})


async def _destroy_each(client: Any, names: list[str]) -> list[Any]:
    """destroy_weights_update_group for each of `names` on one server, one after the other."""
    return [await client.destroy_weights_update_group(group_name=name) for name in names]


async def _update_after(client: Any, previous: "Future[Any] | None", body: dict[str, Any]) -> Any:
    """Post one bucket's call once `previous` (the same server's call for the bucket before) has succeeded."""
    if previous is not None:
        reply = await asyncio.wrap_future(previous)
        if not reply.success:
            raise PushError(f"not sent to {client.url}: the previous bucket failed there")
    return await client.update_weights_from_distributed(**body)


def _init_custom_group(init_method: str, world_size: int, group_name: str, backend: str,
                       timeout: timedelta) -> dist.ProcessGroup:
    """Rank 0 of a process group separate from the training group, built like SGLang's server side:
    TCP rendezvous (we host the store) -> PrefixStore(group_name) -> a new process group of that name."""
    # The store is hosted here explicitly: under torchrun, dist.rendezvous() sees TORCHELASTIC_USE_AGENT_STORE and
    # would only open a client to a store nobody hosts, and the servers' join would hang.
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    # NOTE: multi_tenant: every group this process hosts on one port shares one store server. With a fixed
    # learner.push_master_port, a re-formed group binds that port while the abandoned group, freed on a daemon thread
    # that may wait out gloo's timeout, still holds its store there; a store server of its own failed with EADDRINUSE
    # (planted, test_push_recovery's fixed-port kill test). The groups' names differ, so their keys do not mix.
    store = dist.TCPStore(host, int(port), world_size, is_master=True, timeout=timeout, multi_tenant=True)
    store.set_timeout(timeout)
    prefixed = dist.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(world_size, 0, [], backend, prefixed, group_name=group_name,
                                               timeout=timeout)
    # NOTE: the helper does not record the group's rank map, which broadcast/destroy look up. Only this process
    # (group rank 0) uses the group here, so the identity map is exact for it.
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
