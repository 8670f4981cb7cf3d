"""`InferencePool`: routes the engine's generate calls over many SGLang-compatible servers (implements `Generator`).

What it owns, in the order a request meets it:

    generate(input_ids, sampling, affinity)
      │ 1. place: the affinity's server if healthy (all turns of a rollout, all samples of a prompt share its prefix
      │    cache), else the least-loaded healthy server with a free slot, which the affinity is then bound to
      │ 2. no free slot -> wait: on the bound server's own queue, or the pool queue for unbound requests; a released
      │    slot goes to the most urgent waiter of the two queues (lowest SLOT_PRIORITY, the server's own on a tie,
      │    then first come, first served); bounded by queue_timeout_s
      │ 3. send under a fresh rid (ssp.engine.ids) through that server's ServerClient
      │ 4. retryable failure -> eject the server if it is unreachable, abort the rid there if it may still run
      │    (best effort), then re-send under a NEW rid, preferring another server; at most max_retries times
      ▼
    GenerateResult (also for aborted requests: finish.type == "abort")

    health loop (task "pool-health"): every health_check_interval_s, GET /health on every server; eject_after_failures
      failures in a row eject a server (its waiters are re-placed), a 200 re-admits it once it serves a weight version
      that an admitted server serves (a restarted server holds its initial weights until the learner's next push
      reaches it; routing to it before would sample from a stale policy). While the pool has paused the servers,
      only unreachable servers count as failures (SGLang's /health answers 503 during long pauses).

Slots (in_flight <= capacity per server) bound what each server holds; the engine's own concurrency can be far
higher, waiting here rather than in the servers' queues. Admin calls (pause, continue, abort, flush, the weight-update
steps) fan out to every server concurrently and return one `AdminResult` per server URL. In router mode
(`InferenceConfig.router_url`), /generate goes to the router (one target, capacity = capacity_per_server x workers)
and admin calls go to the workers directly, because sglang-router does not forward them.

    async with InferencePool(cfg) as pool:
        result = await pool.generate(prompt_ids, SamplingParams(max_new_tokens=256), affinity="episode-7/solver-2")
        await pool.pause("retract"); ...; await pool.continue_()
        print(pool.metrics().to_json())

Cancelling a `generate` call aborts its request on the server. A closed pool refuses reuse.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ssp.engine.client import AdminResult, PauseMode, ServerClient
from ssp.engine.errors import ConnectionFailed, InferenceError, NoServerAvailable, RetryableError
from ssp.engine.generation import SLOT_PRIORITY, GenerateResult, SamplingParams
from ssp.engine.ids import RequestIds
from ssp.engine.inference_config import InferenceConfig

log = logging.getLogger(__name__)

_ADMIN_CONNECTIONS = 8
"""Connections per host kept above the generate slots for control calls, health checks and aborts."""


class PoolState(enum.Enum):
    UNOPENED = "unopened"  # constructed; `async with` (or open()) not yet entered
    OPEN = "open"  # session and health task running; generate and admin calls allowed
    CLOSED = "closed"  # session closed, waiters failed; cannot be reopened


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """One generate target at one moment."""

    url: str
    healthy: bool
    capacity: int
    in_flight: int
    occupancy: float
    """in_flight / capacity now."""
    mean_occupancy: float
    """Time-averaged in_flight / capacity since the pool opened."""
    requests: int
    """Requests sent (re-sends included)."""
    failures: int
    """Requests that failed with a retryable error here."""
    ejections: int


@dataclass(frozen=True, slots=True)
class PoolMetrics:
    """A snapshot of the pool: per-server slots and the pool-wide queue and retry counters."""

    servers: tuple[ServerMetrics, ...]
    queue_depth: int
    """Requests waiting for a slot now."""
    max_queue_depth: int
    queued_total: int
    """Requests that had to wait for a slot at all."""
    queue_wait_s_total: float
    queue_wait_s_max: float
    requests: int
    """generate() calls finished (successfully or not)."""
    retries: int
    """Re-sends after retryable failures."""
    aborts_sent: int
    """Best-effort aborts of failed or cancelled requests."""
    ejections: int
    readmissions: int

    def to_json(self) -> dict[str, Any]:
        return {
            "queue_depth": self.queue_depth, "max_queue_depth": self.max_queue_depth,
            "queued_total": self.queued_total, "queue_wait_s_total": round(self.queue_wait_s_total, 6),
            "queue_wait_s_max": round(self.queue_wait_s_max, 6), "requests": self.requests,
            "retries": self.retries, "aborts_sent": self.aborts_sent, "ejections": self.ejections,
            "readmissions": self.readmissions,
            "servers": [{
                "url": s.url, "healthy": s.healthy, "capacity": s.capacity, "in_flight": s.in_flight,
                "occupancy": round(s.occupancy, 4), "mean_occupancy": round(s.mean_occupancy, 4),
                "requests": s.requests, "failures": s.failures, "ejections": s.ejections,
            } for s in self.servers],
        }


@dataclass(frozen=True, slots=True)
class WeightUpdateLayout:
    """Ranks of a weight-update group over the pool's workers: trainer rank 0, then each server's TP ranks."""

    world_size: int
    rank_offsets: dict[str, int]
    """Worker URL -> its first rank (its TP ranks follow)."""


@dataclass(order=True, slots=True)
class _Waiter:
    """A request waiting for a slot, ordered by urgency (`SLOT_PRIORITY`), then by arrival."""

    priority: int
    seq: int
    fut: asyncio.Future[_Server | None] = field(compare=False)
    affinity: str = field(compare=False)


class _WaitQueue:
    """Waiting requests, most urgent first. A waiter that timed out or was cancelled stays in the heap until it
    reaches the head, where `head` drops it, so it never makes a free slot look taken."""

    def __init__(self) -> None:
        self._heap: list[_Waiter] = []

    def push(self, waiter: _Waiter) -> None:
        heapq.heappush(self._heap, waiter)

    def head(self) -> _Waiter | None:
        """The most urgent waiter still waiting, or None."""
        while self._heap and self._heap[0].fut.done():
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def pop(self) -> _Waiter:
        return heapq.heappop(self._heap)

    def drain(self) -> list[_Waiter]:
        """Every waiter, the queue left empty."""
        waiters, self._heap = self._heap, []
        return waiters


@dataclass(slots=True, eq=False)
class _Server:
    """Routing state of one generate target. Only touched from the event loop, so no lock is needed."""

    client: ServerClient
    capacity: int
    healthy: bool = True
    in_flight: int = 0
    health_failures: int = 0
    """Consecutive failed health checks."""
    waiters: _WaitQueue = field(default_factory=_WaitQueue)
    """Requests bound to this server (by affinity) waiting for one of its slots."""
    requests: int = 0
    failures: int = 0
    ejections: int = 0
    held_out_at: str | None = None
    """The weight version this ejected server was last held out at (logged once per version)."""
    busy_slot_s: float = 0.0
    last_change: float = 0.0

    @property
    def url(self) -> str:
        return self.client.url

    def account(self, now: float) -> None:
        """Integrate in_flight over time (for mean occupancy); call before in_flight changes."""
        self.busy_slot_s += self.in_flight * (now - self.last_change)
        self.last_change = now


class InferencePool:
    """The engine's `Generator`: slots, affinity, queueing, health and retries over SGLang-compatible servers."""

    def __init__(self, cfg: InferenceConfig, *, rids: RequestIds | None = None) -> None:
        self._cfg = cfg
        self._api_key = cfg.bearer_key()
        self._rids = rids if rids is not None else RequestIds()
        self._state = PoolState.UNOPENED
        self._session: aiohttp.ClientSession | None = None
        self._targets: list[_Server] = []
        """Where /generate goes: the servers, or the router alone."""
        self._admin: list[ServerClient] = []
        """Where control calls go: the servers (the router's workers in router mode)."""
        self._affinity: OrderedDict[str, _Server] = OrderedDict()
        self._queue = _WaitQueue()
        """Unbound requests waiting for a slot on any server."""
        self._arrivals = itertools.count()
        """Arrival order of waiters (the tie-break among equal priorities)."""
        self._live: dict[str, _Server] = {}
        """rid -> server of every request on the wire (for abort by rid)."""
        self._paused: PauseMode | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._opened_at = 0.0
        self._waiting = 0
        self._max_waiting = 0
        self._queued_total = 0
        self._queue_wait_s_total = 0.0
        self._queue_wait_s_max = 0.0
        self._requests = 0
        self._retries = 0
        self._aborts_sent = 0
        self._ejections = 0
        self._readmissions = 0

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> InferencePool:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Read capacities, open the shared session, run a first health round, start the health loop."""
        if self._state is PoolState.CLOSED:
            raise RuntimeError("this InferencePool is closed; create a new one")
        if self._state is PoolState.OPEN:
            raise RuntimeError("this InferencePool is already open")
        cfg = self._cfg
        capacities = await self._capacities()
        per_host = max(capacities) + _ADMIN_CONNECTIONS
        connector = aiohttp.TCPConnector(limit=per_host * (len(capacities) + len(cfg.server_urls)),
                                         limit_per_host=per_host, keepalive_timeout=cfg.keepalive_s)
        self._session = aiohttp.ClientSession(connector=connector)
        now = time.monotonic()
        self._opened_at = now
        self._admin = [self._client(url) for url in cfg.server_urls]
        if cfg.router_url is not None:
            self._targets = [_Server(self._client(cfg.router_url, routing_header=True), capacities[0],
                                     last_change=now)]
        else:
            self._targets = [_Server(client, capacity, last_change=now)
                             for client, capacity in zip(self._admin, capacities, strict=True)]
        self._state = PoolState.OPEN
        await self._check_health_once(eject_after=1)  # start only with servers that answer
        self._health_task = asyncio.create_task(self._health_loop(), name="pool-health")

    async def close(self) -> None:
        """Stop the health loop, fail queued requests, close the session. Idempotent."""
        if self._state is PoolState.CLOSED:
            return
        self._state = PoolState.CLOSED
        for waiter in [*self._queue.drain(), *(w for s in self._targets for w in s.waiters.drain())]:
            if not waiter.fut.done():
                waiter.fut.set_result(None)
        tasks = [t for t in (self._health_task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _check_open(self) -> None:
        if self._state is not PoolState.OPEN:
            raise RuntimeError(f"InferencePool is {self._state.value}; use it inside `async with InferencePool(cfg)`")

    def _client(self, url: str, *, routing_header: bool = False) -> ServerClient:
        assert self._session is not None
        cfg = self._cfg
        return ServerClient(url, self._session, request_timeout_s=cfg.request_timeout_s,
                            admin_timeout_s=cfg.admin_timeout_s, connect_timeout_s=cfg.connect_timeout_s,
                            api_key=self._api_key, routing_header=routing_header)

    async def _capacities(self) -> list[int]:
        """Slots per generate target: from config, or each server's max_running_requests (router: their sum)."""
        cfg = self._cfg
        if cfg.capacity_per_server > 0:
            per_server = [cfg.capacity_per_server] * len(cfg.server_urls)
        else:
            timeout = aiohttp.ClientTimeout(total=cfg.admin_timeout_s, sock_connect=cfg.connect_timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                infos = await asyncio.gather(*(ServerClient(url, session, api_key=self._api_key).server_info()
                                               for url in cfg.server_urls), return_exceptions=True)
            per_server = []
            for url, info in zip(cfg.server_urls, infos, strict=True):
                if isinstance(info, BaseException):
                    raise NoServerAvailable(
                        f"cannot read max_running_requests from /server_info ({info}); start the server or set "
                        f"inference.capacity_per_server", url=url) from info
                value = info.get("max_running_requests")
                if not isinstance(value, int) or value < 1:
                    raise NoServerAvailable(f"/server_info max_running_requests is {value!r}, not a positive "
                                            f"integer; set inference.capacity_per_server", url=url)
                per_server.append(value)
        return [sum(per_server)] if cfg.router_url is not None else per_server

    # ---------------------------------------------------------------- generate

    async def generate(self, input_ids: Sequence[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
        """One sample, routed with prefix-cache affinity; retried elsewhere after retryable failures.

        Raises NoServerAvailable when no slot frees up within queue_timeout_s, the last RetryableError after
        max_retries re-sends, or a FatalError (e.g. BadRequest for a prompt longer than the context) at once.
        """
        self._check_open()
        deadline = time.monotonic() + self._cfg.queue_timeout_s
        avoid: _Server | None = None
        attempt = 0
        try:
            while True:
                server = await self._acquire(affinity, avoid, deadline)
                rid = self._rids.next()
                self._live[rid] = server
                server.requests += 1
                try:
                    return await server.client.generate(input_ids, sampling, rid, affinity=affinity)
                except RetryableError as e:
                    error = e
                except asyncio.CancelledError:
                    # The caller gave up on this request: free the server from it too.
                    self._spawn(self._abort_on(server, rid), f"pool-abort-{rid}")
                    raise
                finally:
                    del self._live[rid]
                    self._release(server)
                server.failures += 1
                await self._recover(server, rid, error)
                if attempt >= self._cfg.max_retries:
                    raise error
                attempt += 1
                self._retries += 1
                log.warning("request %s failed on %s (%s); re-sending under a new rid (attempt %d of %d)", rid,
                            server.url, error.message, attempt, self._cfg.max_retries)
                avoid = server
                await asyncio.sleep(self._cfg.retry_backoff_s * 2 ** (attempt - 1))
        finally:
            self._requests += 1

    async def _recover(self, server: _Server, rid: str, error: RetryableError) -> None:
        """After a failed send: eject an unreachable server; abort a request that may still run there."""
        if isinstance(error, ConnectionFailed) and server.healthy:
            self._eject(server, f"connection failed: {error.message}")
        if error.may_be_running:
            await self._abort_on(server, rid)

    async def _abort_on(self, server: _Server, rid: str) -> None:
        """Best-effort abort of `rid` where it ran (every worker in router mode), bounded by abort_timeout_s."""
        clients = self._admin if self._cfg.router_url is not None else [server.client]
        self._aborts_sent += 1
        try:
            async with asyncio.timeout(self._cfg.abort_timeout_s):
                await asyncio.gather(*(c.abort(rid) for c in clients))
        except (InferenceError, TimeoutError) as e:
            log.info("best-effort abort of %s failed: %s", rid, e)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` in the background, tracked so close() can cancel it."""
        if self._state is not PoolState.OPEN:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- slots and placement

    async def _acquire(self, affinity: str, avoid: _Server | None, deadline: float) -> _Server:
        """Take a slot for `affinity`, waiting (most urgent first, see `_WaitQueue`) until one frees up or the
        deadline passes."""
        started = time.monotonic()
        queued = False
        priority = SLOT_PRIORITY.get()
        try:
            while True:
                self._check_open()
                bound = self._bound(affinity, avoid)
                if bound is not None:
                    if bound.in_flight < bound.capacity and bound.waiters.head() is None:
                        return self._take(bound, affinity)
                else:
                    best = self._least_loaded(avoid)
                    if best is not None and self._queue.head() is None:
                        return self._take(best, affinity)
                fut: asyncio.Future[_Server | None] = asyncio.get_running_loop().create_future()
                waiter = _Waiter(priority, next(self._arrivals), fut, affinity)
                (bound.waiters if bound is not None else self._queue).push(waiter)
                if not queued:
                    queued = True
                    self._queued_total += 1
                server = await self._wait(fut, deadline)
                if server is not None:
                    return server
                # None: the server we waited on was ejected; place again.
        finally:
            if queued:
                waited = time.monotonic() - started
                self._queue_wait_s_total += waited
                self._queue_wait_s_max = max(self._queue_wait_s_max, waited)

    async def _wait(self, fut: asyncio.Future[_Server | None], deadline: float) -> _Server | None:
        self._waiting += 1
        self._max_waiting = max(self._max_waiting, self._waiting)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await fut
        except (asyncio.CancelledError, TimeoutError) as e:
            # NOTE: a slot may have been handed over just before the timeout or cancel landed; give it back.
            if fut.done() and not fut.cancelled() and (granted := fut.result()) is not None:
                self._release(granted)
            if isinstance(e, TimeoutError):
                raise NoServerAvailable(
                    f"no slot on a healthy server within queue_timeout_s = {self._cfg.queue_timeout_s:g} s "
                    f"({self._health_summary()}); raise inference.queue_timeout_s or add servers",
                    url=self._cfg.router_url or ",".join(self._cfg.server_urls)) from None
            raise
        finally:
            self._waiting -= 1

    def _bound(self, affinity: str, avoid: _Server | None) -> _Server | None:
        """The healthy server `affinity` is bound to (refreshing its LRU position), or None."""
        server = self._affinity.get(affinity)
        if server is None or not server.healthy or server is avoid:
            return None
        self._affinity.move_to_end(affinity)
        return server

    def _least_loaded(self, avoid: _Server | None) -> _Server | None:
        """The healthy server with a free slot and the lowest in_flight/capacity; `avoid` only if it is the only one."""
        candidates = [s for s in self._targets if s.healthy and s.in_flight < s.capacity]
        preferred = [s for s in candidates if s is not avoid] or candidates
        return min(preferred, key=lambda s: s.in_flight / s.capacity, default=None)

    def _take(self, server: _Server, affinity: str) -> _Server:
        server.account(time.monotonic())
        server.in_flight += 1
        self._bind(affinity, server)
        return server

    def _bind(self, affinity: str, server: _Server) -> None:
        self._affinity[affinity] = server
        self._affinity.move_to_end(affinity)
        if len(self._affinity) > self._cfg.affinity_entries:
            self._affinity.popitem(last=False)

    def _release(self, server: _Server) -> None:
        server.account(time.monotonic())
        server.in_flight -= 1
        self._dispatch(server)

    def _dispatch(self, server: _Server) -> None:
        """Hand free slots of `server` to the more urgent head of its own waiters and the pool queue (its own on a
        tie; a pool waiter is bound to `server`)."""
        while server.healthy and server.in_flight < server.capacity and self._state is PoolState.OPEN:
            own, pooled = server.waiters.head(), self._queue.head()
            if own is None and pooled is None:
                return
            if own is not None and (pooled is None or own.priority <= pooled.priority):
                waiter = server.waiters.pop()
            else:
                waiter = self._queue.pop()
                self._bind(waiter.affinity, server)
            server.account(time.monotonic())
            server.in_flight += 1
            waiter.fut.set_result(server)

    # ---------------------------------------------------------------- health

    def _eject(self, server: _Server, reason: str) -> None:
        """Stop routing to `server`; its waiters are placed again elsewhere."""
        if not server.healthy:
            return
        log.warning("ejecting %s: %s", server.url, reason)
        server.healthy = False
        server.ejections += 1
        self._ejections += 1
        for waiter in server.waiters.drain():
            if not waiter.fut.done():
                waiter.fut.set_result(None)

    def _readmit(self, server: _Server) -> None:
        log.info("re-admitting %s: it answers /health again", server.url)
        server.healthy = True
        server.health_failures = 0
        self._readmissions += 1
        self._dispatch(server)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.health_check_interval_s)
            await self._check_health_once(eject_after=self._cfg.eject_after_failures)

    async def _check_health_once(self, *, eject_after: int) -> None:
        statuses = await asyncio.gather(*(s.client.health(self._cfg.health_timeout_s) for s in self._targets))
        for server, status in zip(self._targets, statuses, strict=True):
            if status == 200:
                server.health_failures = 0
                if not server.healthy and await self._serves_current_weights(server):
                    self._readmit(server)
                continue
            if self._paused is not None and status is not None:
                continue  # a paused SGLang answers /health with 503 after ~20 s; not a fault
            server.health_failures += 1
            if server.health_failures >= eject_after:
                self._eject(server, f"{server.health_failures} failed health checks (last: "
                                    f"{'no answer' if status is None else f'HTTP {status}'})")

    async def _serves_current_weights(self, server: _Server) -> bool:
        """Whether an ejected `server` serves a weight version that an admitted one serves (trivially so when none is
        admitted, or behind a router, whose workers the pool does not see)."""
        admitted = [s for s in self._targets if s.healthy]
        if not admitted or self._cfg.router_url is not None:
            return True
        versions = await asyncio.gather(*(_weight_version(s.client) for s in [server, *admitted]))
        current = {v for v in versions[1:] if v is not None}
        if versions[0] is not None and (versions[0] in current or not current):
            return True
        if server.held_out_at != versions[0]:
            server.held_out_at = versions[0]
            log.info("not re-admitting %s yet: it serves weight version %s, the admitted servers %s", server.url,
                     versions[0], sorted(current))
        return False

    def _health_summary(self) -> str:
        healthy = sum(s.healthy for s in self._targets)
        return f"{healthy} of {len(self._targets)} targets healthy, {sum(s.in_flight for s in self._targets)} in flight"

    # ---------------------------------------------------------------- admin fan-out

    async def _fan_out(self, call: Callable[[ServerClient], Awaitable[AdminResult]]) -> dict[str, AdminResult]:
        """Run `call` on every worker concurrently; an exception becomes that server's failed AdminResult."""
        self._check_open()
        results = await asyncio.gather(*(call(c) for c in self._admin), return_exceptions=True)
        out: dict[str, AdminResult] = {}
        for client, result in zip(self._admin, results, strict=True):
            if isinstance(result, InferenceError):
                out[client.url] = AdminResult(client.url, False, str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                out[client.url] = result
        return out

    async def pause(self, mode: PauseMode = "abort") -> dict[str, AdminResult]:
        """Pause every server (SGLang's /pause_generation). Health checks tolerate 503s until `continue_`."""
        self._paused = mode
        return await self._fan_out(lambda c: c.pause(mode))

    async def continue_(self) -> dict[str, AdminResult]:
        """Resume every server."""
        results = await self._fan_out(lambda c: c.continue_())
        self._paused = None
        return results

    async def abort(self, rid: str) -> None:
        """Abort request `rid` on the server it runs on (every worker if unknown or behind a router)."""
        self._check_open()
        server = self._live.get(rid)
        if server is not None and self._cfg.router_url is None:
            await server.client.abort(rid)
        else:
            await self._fan_out(lambda c: _ok_after(c.abort(rid), c.url))

    async def abort_all(self) -> dict[str, AdminResult]:
        """Abort every queued and running request on every server; they return partial output, finish "abort"."""
        return await self._fan_out(lambda c: _ok_after(c.abort_all(), c.url))

    async def flush_cache(self, timeout_s: float = 0.0) -> dict[str, AdminResult]:
        """Clear every server's prefix cache (fails per server while it has requests, unless idle within timeout)."""
        return await self._fan_out(lambda c: c.flush_cache(timeout_s))

    async def server_infos(self) -> dict[str, dict[str, Any]]:
        """/server_info of every worker."""
        self._check_open()
        infos = await asyncio.gather(*(c.server_info() for c in self._admin))
        return {c.url: info for c, info in zip(self._admin, infos, strict=True)}

    async def model_infos(self) -> dict[str, dict[str, Any]]:
        """/model_info of every worker: its `weight_version` is the current one (/server_info's is as launched)."""
        self._check_open()
        infos = await asyncio.gather(*(c.model_info() for c in self._admin))
        return {c.url: info for c, info in zip(self._admin, infos, strict=True)}

    async def weight_versions(self) -> dict[str, str | None]:
        """Every worker's current weight version (/model_info); None for a worker that does not answer."""
        self._check_open()
        versions = await asyncio.gather(*(_weight_version(c) for c in self._admin))
        return {c.url: v for c, v in zip(self._admin, versions, strict=True)}

    def admitted_urls(self) -> set[str] | None:
        """URLs of the servers the pool routes to now; None behind a router (it routes, not the pool)."""
        if self._cfg.router_url is not None:
            return None
        return {s.url for s in self._targets if s.healthy}

    async def weight_update_layout(self) -> WeightUpdateLayout:
        """Group ranks for a weight push: the trainer is rank 0, worker k starts at 1 + sum of earlier tp_size."""
        infos = await self.server_infos()
        offsets: dict[str, int] = {}
        rank = 1
        for url, info in infos.items():
            offsets[url] = rank
            rank += int(info.get("tp_size", 1))
        return WeightUpdateLayout(world_size=rank, rank_offsets=offsets)

    async def init_weights_update_group(
        self, *, master_address: str, master_port: int, layout: WeightUpdateLayout,
        group_name: str = "weight_update_group", backend: str = "nccl",
    ) -> dict[str, AdminResult]:
        """Every worker joins the trainer's group at its rank offset. Blocks until the trainer joins too (as a task)."""
        return await self._fan_out(lambda c: c.init_weights_update_group(
            master_address=master_address, master_port=master_port, rank_offset=layout.rank_offsets[c.url],
            world_size=layout.world_size, group_name=group_name, backend=backend))

    async def begin_weight_update(self) -> dict[str, AdminResult]:
        return await self._fan_out(lambda c: c.begin_weight_update())

    async def update_weights_from_distributed(self, **bucket: Any) -> dict[str, AdminResult]:
        """One bucket on every worker; keywords as `ServerClient.update_weights_from_distributed`."""
        return await self._fan_out(lambda c: c.update_weights_from_distributed(**bucket))

    async def end_weight_update(self) -> dict[str, AdminResult]:
        return await self._fan_out(lambda c: c.end_weight_update())

    async def update_weight_version(self, new_version: str) -> dict[str, AdminResult]:
        return await self._fan_out(lambda c: c.update_weight_version(new_version))

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       flush_cache: bool = True) -> dict[str, AdminResult]:
        return await self._fan_out(lambda c: c.update_weights_from_disk(model_path, weight_version=weight_version,
                                                                        flush_cache=flush_cache))

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict[str, AdminResult]:
        return await self._fan_out(lambda c: c.destroy_weights_update_group(group_name))

    # ---------------------------------------------------------------- metrics

    def live_rids(self) -> dict[str, str]:
        """rid -> server URL of every request now on the wire."""
        return {rid: server.url for rid, server in self._live.items()}

    def metrics(self) -> PoolMetrics:
        now = time.monotonic()
        elapsed = max(now - self._opened_at, 1e-9)
        servers = []
        for s in self._targets:
            s.account(now)
            servers.append(ServerMetrics(
                url=s.url, healthy=s.healthy, capacity=s.capacity, in_flight=s.in_flight,
                occupancy=s.in_flight / s.capacity, mean_occupancy=s.busy_slot_s / (s.capacity * elapsed),
                requests=s.requests, failures=s.failures, ejections=s.ejections))
        return PoolMetrics(
            servers=tuple(servers), queue_depth=self._waiting, max_queue_depth=self._max_waiting,
            queued_total=self._queued_total, queue_wait_s_total=self._queue_wait_s_total,
            queue_wait_s_max=self._queue_wait_s_max, requests=self._requests, retries=self._retries,
            aborts_sent=self._aborts_sent, ejections=self._ejections, readmissions=self._readmissions)


async def _weight_version(client: ServerClient) -> str | None:
    try:
        return str((await client.model_info()).get("weight_version", "default"))
    except InferenceError:
        return None


async def _ok_after(call: Awaitable[None], url: str) -> AdminResult:
    await call
    return AdminResult(url, True, "")


def _loop_time(deadline_monotonic: float) -> float:
    """Convert a time.monotonic() deadline to the event loop's clock (they may differ, e.g. under uvloop)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())

