"""The episode scheduler: keeps SSP episodes in flight, bounded by server capacity and by policy staleness.

Loops and buffers ("async" mode; every task is named, every buffer bounded):

    seeds (shuffled, endless)
      │
      ▼
    launcher loop ── waits on: a free episode slot (≤ max_inflight episodes in flight)
      │                        the staleness gate  (delivered + in flight < (version + eta + 1) · episodes_per_step)
      │                        the pause flag       (cleared by pause_launches() during a weight update)
      │              unblocked by: an episode finishing, set_policy_version() (called by the policy-version loop,
      │              which polls the servers' weight version), resume_launches()
      ▼
    episode tasks ×≤max_inflight ── propose → check → verify → solve → judge → rewards (ssp.engine.game.Game)
      │   each generate() waits for a server slot in the InferencePool (≤ its capacity per server: the pool
      │   enforces it, so the server's own queue is never flooded), older episodes first (SLOT_PRIORITY = the
      │   version the episode started on: the earliest staleness deadline); each <search> waits in the SearchBatcher
      ▼
    the staleness gate's send order ── a finished group is held while sending it would take a slot an older,
      │                                still running episode needs to make its deadline
      ▼
    TrajectoryStream queue (≤ stream.queue_groups) ── a full queue blocks episodes (back-pressure from the learner)
      │
      ▼
    sender loop ─► TCP to the learner, or a frames file (spill file when the connection breaks)

    metrics loop ── every metrics_interval_s: one JSONL line (rates, occupancy, queue depths, validity, rewards)
    policy-version loop ── every version_poll_s: the lowest weight version on the servers -> set_policy_version
    lag monitor  ── event-loop lag (how late a 10 ms timer fires)
    collector    ── garbage collection on the loop's clock: young passes every 50 ms, a full one every
                    gc_full_every_s (ssp.engine.gc_pacing: none starts by itself inside a turn)

"sync" mode replaces the launcher and episode tasks with the reference's phases: per step, all
`episodes_per_step` proposers, then all verifications, then all solver groups, then the groups are sent; the same
staleness gate decides when the next step may start (eta = 0: after the learner has consumed this one).

Staleness (the guarantee): the learner consumes groups in the order they arrive, `episodes_per_step` (B) per policy
version, and every batch advances the version. An episode started at version v is delivered among the first
(v + eta + 1) · B groups, however many later episodes finish before it, so it is trained at version ≤ v + eta and none
of its tokens (sampled on weights of version ≥ v) is more than eta versions old; `StalenessGate` says why. The price
of a slow episode is paid late: newer groups fill the learner's batches up to its deadline, and only then are newer
groups held back until it arrives, while episodes keep starting against the current version. A failed episode sends
no group and frees its place, so the learner is never left waiting for a group that will not come (in sync mode the
next step is topped up by that many episodes).

Shutdown: `run()` ends when the episode budget is done or `stop()` is called: the launcher stops, in-flight episodes
finish (or are cancelled on error), the stream sends what it holds, then every task is cancelled and gathered.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ssp.engine.config import SchedulerConfig
from ssp.engine.game import EpisodeResult, Game
from ssp.engine.gc_pacing import GcPacer
from ssp.engine.generation import SLOT_PRIORITY
from ssp.engine.rollout import RolloutError
from ssp.engine.seeds import Seed
from ssp.engine.stream import TrajectoryStream
from ssp.engine.telemetry import LoopLagMonitor
from ssp.metrics import MetricsLog

log = logging.getLogger(__name__)


class StalenessGate:
    """When an episode may start, and when its finished group may be sent, so that none is trained more than `eta`
    policy versions after the version it started on.

    The learner trains groups in the order they arrive, `per_step` per policy version: the group sent k-th (from 0)
    is trained at version k // per_step. An episode started at version v must therefore be sent before its deadline,
    slot (v + eta + 1) * per_step. The gate keeps one invariant over the episodes not yet sent (running, or finished
    and held back), counted per start version in `_pending`:

        for every start version u:   delivered + pending(<= u)  <=  (u + eta + 1) * per_step            (*)

    i.e. were everything started on u or earlier sent next, each would still make its deadline. Two moves keep it:

        start   at the current version V (no pending episode is newer, so only (*) at V can break):
                room = (V + eta + 1) * per_step - delivered - pending
        send    a group started on w takes the next slot. (*) for u >= w is unchanged (one more delivered, one
                fewer pending); for u < w it needs delivered + 1 + pending(<= u) <= its deadline, so a newer group
                is held back while it would take a slot that older, still running episodes need. A group of the
                oldest pending version is never held.

    So a slow episode costs its own place, not the window: episodes keep starting against the current version, newer
    groups fill the learner's batches up to the slow one's deadline, and only there does the learner wait for it.
    (Counting the window from the oldest running episode's version instead is as safe, but it closes the window on
    new starts for as long as a slow episode runs: the servers idle while it decodes.) Its tokens were sampled on
    weights of version >= v and it is trained at version <= v + eta, so no trained token is more than eta versions
    old. Sends happen in slot order: a group's slot is taken under the lock and `send` is awaited in slot order.

    Why it never deadlocks: the oldest pending version's groups are never held, so sends go on as episodes finish,
    and an episode that fails withdraws its place, which only loosens (*). The learner at version V waits for
    (V + 1) * per_step delivered groups, and (*) at the current version lets (V + eta + 1) * per_step exist.
    """

    def __init__(self, eta: int | None, per_step: int, version: int = 0) -> None:
        self.eta = eta
        self.per_step = per_step
        self.version = version
        self.delivered = 0
        """Slots taken: groups sent to the learner, or being sent in slot order."""
        self.held = 0
        """Finished episodes whose group waits for an older episode (see `_may_send`)."""
        self._pending: collections.Counter[int] = collections.Counter()
        """Start version -> episodes not yet sent (running or held) that started on it."""
        self._next_send = 0
        """The slot whose `send` runs next."""
        self._done_slots: set[int] = set()
        """Slots after `_next_send` whose send has ended (out of turn only when cancelled)."""
        self.closed = False
        self._cond = asyncio.Condition()

    @property
    def inflight(self) -> int:
        """Episodes started and not yet sent: running or held."""
        return sum(self._pending.values())

    def room(self) -> int | None:
        """How many more episodes may start now (None: no bound, eta unset)."""
        if self.eta is None:
            return None
        return self._deadline(self.version) - self.delivered - self.inflight

    def _deadline(self, version: int) -> int:
        assert self.eta is not None
        return (version + self.eta + 1) * self.per_step

    def _may_send(self, version: int) -> bool:
        """Whether a group started on `version` may take the next slot without making an older episode late."""
        if self.eta is None or self.closed:
            return True
        older = 0
        for u in sorted(self._pending):
            if u >= version:
                return True
            older += self._pending[u]
            if self.delivered + 1 + older > self._deadline(u):
                return False
        return True

    def _has_room(self) -> bool:
        room = self.room()
        return self.closed or room is None or room >= 1

    def _take(self, n: int) -> int:
        self._pending[self.version] += n
        return self.version

    def _drop(self, version: int) -> None:
        self._pending[version] -= 1
        if self._pending[version] <= 0:
            del self._pending[version]

    async def acquire(self) -> int:
        """Wait until one more episode may start; returns the policy version it starts on."""
        async with self._cond:
            await self._cond.wait_for(self._has_room)
            return self._take(1)

    async def acquire_up_to(self, n: int) -> tuple[int, int]:
        """Wait until at least one episode may start, then take up to n places; returns (version, places taken).
        The sync schedule uses it, so that a step whose episode failed is topped up instead of waiting for a
        group that will never come."""
        async with self._cond:
            await self._cond.wait_for(self._has_room)
            room = self.room()
            taken = n if self.closed or room is None else min(n, room)
            return self._take(taken), taken

    async def deliver(self, version: int, send: Callable[[], Awaitable[None]]) -> None:
        """The episode started on `version` finished: wait until its group may take the next slot, take it, and await
        `send` (which hands the group to the stream) in slot order. Cancelled before it has a slot, the episode's
        place is withdrawn; once it has one, the slot counts as delivered."""
        async with self._cond:
            self.held += 1
            try:
                await self._cond.wait_for(lambda: self._may_send(version))
            except BaseException:
                self._drop(version)
                self._cond.notify_all()
                raise
            finally:
                self.held -= 1
            self._drop(version)
            slot = self.delivered
            self.delivered += 1
            self._cond.notify_all()
        try:
            async with self._cond:
                await self._cond.wait_for(lambda: self._next_send == slot)
            await send()
        finally:
            async with self._cond:
                # Cancelled before its turn (shutdown), a slot still counts as done, so later ones are not stuck.
                self._done_slots.add(slot)
                while self._next_send in self._done_slots:
                    self._done_slots.remove(self._next_send)
                    self._next_send += 1
                self._cond.notify_all()

    async def withdraw(self, version: int) -> None:
        """The episode started on `version` ended without a group (it failed): its place is offered again."""
        async with self._cond:
            self._drop(version)
            self._cond.notify_all()

    async def close(self) -> None:
        """Wake every waiter for good (shutdown); callers check their own stop flag after acquiring."""
        async with self._cond:
            self.closed = True
            self._cond.notify_all()

    async def set_version(self, version: int) -> None:
        async with self._cond:
            if version < self.version:
                raise ValueError(f"policy version went back from {self.version} to {version}")
            self.version = version
            self._cond.notify_all()


class EpisodesFailing(RuntimeError):
    """scheduler.max_consecutive_failures episodes in a row failed: something every episode needs is down."""


@dataclass(slots=True)
class Counters:
    """Everything counted over a run (the metrics lines and the final summary read these)."""

    launched: int = 0
    finished: int = 0
    failed: int = 0
    failed_in_a_row: int = 0
    """Episodes failed since the last one that finished (scheduler.max_consecutive_failures bounds it)."""
    questions: int = 0
    checked: int = 0
    """Questions that passed the rule checks (valid or not after verification)."""
    valid: int = 0
    groups: int = 0
    zero_variance_groups: int = 0
    generated_tokens: int = 0
    accuracy_sum: float = 0.0
    proposer_reward_sum: float = 0.0
    invalid_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    failure_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    roles: collections.Counter[str] = field(default_factory=collections.Counter)


class Scheduler:
    """Runs episodes of `game` from `seeds` and sends their groups to `stream`.

    `capacity` is the inference pool's total request capacity (slots over all servers); `pool_stats` and
    `search_stats` return occupancy and queue depths for the metrics lines; `policy_version` reads the learner's
    policy version (from the servers); `on_episode(finished)` is called once per episode (a progress bar).
    """

    def __init__(self, game: Game, seeds: Iterator[Seed], stream: TrajectoryStream, cfg: SchedulerConfig, *,
                 capacity: int, solver_group_size: int, metrics: MetricsLog | None = None,
                 pool_stats: Callable[[], dict[str, Any]] | None = None,
                 search_stats: Callable[[], dict[str, Any]] | None = None,
                 policy_version: Callable[[], Awaitable[int]] | None = None,
                 on_episode: Callable[[bool], None] | None = None, run_id: str | None = None) -> None:
        self.game = game
        self._seeds = seeds
        self.stream = stream
        self.cfg = cfg
        self.max_inflight = cfg.max_inflight or max(1, 2 * capacity // solver_group_size)
        self.gate = StalenessGate(cfg.eta, cfg.episodes_per_step)
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._launch_allowed = asyncio.Event()
        self._launch_allowed.set()
        self._stop = asyncio.Event()
        self._episodes: set[asyncio.Task[None]] = set()
        self._metrics = metrics
        self._pool_stats = pool_stats
        self._search_stats = search_stats
        self._policy_version = policy_version
        self._on_episode = on_episode
        self._run_id = run_id or os.urandom(4).hex()
        self._ids = itertools.count()
        self.counters = Counters()
        self.lag = LoopLagMonitor()
        self.collector = GcPacer(cfg.gc_full_every_s)
        self.on_phase: Callable[[str], None] | None = None
        """Sync mode: called with "propose", "verify", "solve" and "deliver" as each phase of a step begins (a bench
        reads the servers' clocks there); it must not block."""
        self._crash: asyncio.Future[None] | None = None
        """While `run()` runs: set to the first unexpected error of an episode task, which `run()` then raises."""
        self._t0 = time.perf_counter()

    # -- control from outside (the learner side of a training run) --------------------------------------------
    async def set_policy_version(self, version: int) -> None:
        """The learner now trains policy `version` (its weights are on the servers): lets the next episodes start."""
        await self.gate.set_version(version)

    def pause_launches(self) -> None:
        """Start no new episode (e.g. during a weight update); in-flight ones continue or are resumed."""
        self._launch_allowed.clear()

    def resume_launches(self) -> None:
        self._launch_allowed.set()

    async def stop(self) -> None:
        """Finish: launch nothing more; `run()` returns once in-flight episodes are done and sent."""
        self._stop.set()
        self._launch_allowed.set()
        await self.gate.close()

    # -- the run ----------------------------------------------------------------------------------------------
    async def run(self, episodes: int | None = None) -> dict[str, Any]:
        """Run until `episodes` episodes have finished or failed (None: until `stop()`); returns the summary."""
        with self.collector:
            await self._run(episodes)
        summary = self.summary()
        if self._metrics is not None:
            self._metrics.write({"event": "summary", **summary})
        return summary

    async def _run(self, episodes: int | None) -> None:
        self._t0 = time.perf_counter()
        producer = self._launch_loop(episodes) if self.cfg.mode == "async" else self._sync_loop(episodes)
        tasks = {
            asyncio.create_task(producer, name="launcher"),
            asyncio.create_task(self.stream.run(), name="stream-sender"),
            asyncio.create_task(self.lag.run(), name="loop-lag"),
            asyncio.create_task(self.collector.run(), name="collector"),
            asyncio.create_task(self._metrics_loop(), name="metrics"),
        }
        if self._policy_version is not None:
            tasks.add(asyncio.create_task(self._version_loop(self._policy_version), name="policy-version"))
        launcher = next(t for t in tasks if t.get_name() == "launcher")
        sender = next(t for t in tasks if t.get_name() == "stream-sender")
        crash = self._crash = asyncio.get_running_loop().create_future()
        try:
            done, _ = await asyncio.wait({*tasks, crash}, return_when=asyncio.FIRST_COMPLETED)
            if crash in done:
                crash.result()  # re-raises the episode's error
            if launcher not in done:
                crashed = next(iter(done))
                crashed.result()  # re-raises its error
                raise RuntimeError(f"task {crashed.get_name()} exited unexpectedly while episodes were running")
            launcher.result()
            await self.stream.finish()
            await sender
        finally:
            self._stop.set()
            self.stream.close_nowait()
            for task in [*tasks, *self._episodes]:
                task.cancel()
            await asyncio.gather(*tasks, *self._episodes, return_exceptions=True)

    async def _launch_loop(self, episodes: int | None) -> None:
        for n in itertools.count():
            if (episodes is not None and n >= episodes) or self._stop.is_set():
                break
            await self._slots.acquire()
            await self._launch_allowed.wait()
            version = await self.gate.acquire()
            if self._stop.is_set():
                await self.gate.withdraw(version)
                self._slots.release()
                break
            seed = next(self._seeds)
            gid = f"{self._run_id}-{next(self._ids):08d}"
            task = asyncio.create_task(self._episode(gid, seed, version), name=f"episode-{gid}")
            self._episodes.add(task)
            task.add_done_callback(self._episodes.discard)
            self.counters.launched += 1
            # NOTE: yield, so that a burst of launches (thousands at start-up) is spread over loop iterations
            # instead of running every new episode's first step (a prompt render) in one long stall.
            await asyncio.sleep(0)
        if self._episodes:
            await asyncio.gather(*list(self._episodes))

    async def _episode(self, gid: str, seed: Seed, version: int) -> None:
        """One episode started on policy `version`; its gate place is sent or withdrawn however it ends."""
        SLOT_PRIORITY.set(version)  # this task's own context: every request of the episode waits by its deadline
        try:
            try:
                result = await self.game.play(gid, seed)
            except BaseException:
                await self.gate.withdraw(version)
                raise
            await self.gate.deliver(version, functools.partial(self._deliver, result))
        except RolloutError as e:
            self._record_failure(gid, e)
        except Exception as e:  # a bug, not a failed server: stop the run with it instead of losing every episode
            if self._crash is not None and not self._crash.done():
                self._crash.set_exception(e)
        finally:
            self._slots.release()

    async def _sync_loop(self, episodes: int | None) -> None:
        """The reference's phases, one step at a time (for comparison with the async schedule). A step takes the
        places the gate offers, up to episodes_per_step: after a failed episode the learner still waits for one
        group of its batch, and the next "step" is that one episode (at eta 0 a full step would never be let in)."""
        done = 0
        while not self._stop.is_set() and (episodes is None or done < episodes):
            want = self.cfg.episodes_per_step if episodes is None else min(self.cfg.episodes_per_step, episodes - done)
            await self._launch_allowed.wait()
            version, n = await self.gate.acquire_up_to(want)
            if self._stop.is_set():
                for _ in range(n):
                    await self.gate.withdraw(version)
                break
            done += n
            self.counters.launched += n
            gids = [f"{self._run_id}-{next(self._ids):08d}" for _ in range(n)]
            seeds = [next(self._seeds) for _ in range(n)]
            self._phase_begins("propose")
            proposals = await self._phase([self.game.propose(g, s) for g, s in zip(gids, seeds)], gids)
            self._phase_begins("verify")
            verifs = await self._phase([self.game.verify(p) for p in proposals.values()], list(proposals))
            passed = [g for g, v in verifs.items() if v is not None and v.passed]
            self._phase_begins("solve")
            solves = await self._phase([self.game.solve(proposals[g]) for g in passed], passed)
            self._phase_begins("deliver")
            for gid in gids:
                if gid in verifs and (gid not in passed or gid in solves):
                    result = self.game.assemble(proposals[gid], verifs[gid], solves.get(gid, []))
                    await self.gate.deliver(version, functools.partial(self._deliver, result))
                else:
                    await self.gate.withdraw(version)

    def _phase_begins(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)

    async def _phase(self, coros: list[Any], gids: list[str]) -> dict[str, Any]:
        """Run one phase for every episode of a step; failed episodes are recorded and left out."""
        results = await asyncio.gather(*coros, return_exceptions=True)
        out = {}
        for gid, r in zip(gids, results):
            if isinstance(r, RolloutError):
                self._record_failure(gid, r)
            elif isinstance(r, BaseException):
                raise r
            else:
                out[gid] = r
        return out

    async def _deliver(self, result: EpisodeResult) -> None:
        await self.stream.put(result.trajectories)
        c = self.counters
        c.finished += 1
        c.failed_in_a_row = 0
        c.groups += 1
        c.questions += "no_question" not in result.reasons
        c.checked += all(r == "failed_verification" for r in result.reasons)
        c.generated_tokens += result.generated_tokens
        c.proposer_reward_sum += result.proposer_reward
        c.zero_variance_groups += result.zero_variance
        c.invalid_reasons.update(result.reasons)
        c.roles.update(t.role for t in result.trajectories)
        if result.valid:
            c.valid += 1
            c.accuracy_sum += result.solver_accuracy or 0.0
        if self._on_episode is not None:
            self._on_episode(True)

    def _record_failure(self, gid: str, err: Exception) -> None:
        c = self.counters
        c.failed += 1
        c.failed_in_a_row += 1
        cause = err.__cause__ or err
        c.failure_reasons[type(cause).__name__] += 1
        log.warning("episode %s failed and is dropped: %s", gid, err)
        if self._on_episode is not None:
            self._on_episode(False)
        budget = self.cfg.max_consecutive_failures
        if budget and c.failed_in_a_row >= budget and self._crash is not None and not self._crash.done():
            self._crash.set_exception(EpisodesFailing(
                f"{c.failed_in_a_row} episodes in a row failed and none finished (scheduler.max_consecutive_failures"
                f" = {budget}); the last: {type(cause).__name__}: {err}. Check that the retriever and the inference "
                "servers answer; raise the budget, or set it to 0 to retry forever"))

    # -- metrics ----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        c = self.counters
        elapsed = max(1e-9, time.perf_counter() - self._t0)
        proposals = c.finished
        out: dict[str, Any] = {
            "elapsed_s": round(elapsed, 3),
            "episodes_launched": c.launched,
            "episodes_finished": c.finished,
            "episodes_failed": c.failed,
            "failure_reasons": dict(c.failure_reasons),
            "episodes_inflight": self.gate.inflight,
            "episodes_held": self.gate.held,
            "rollouts_active": self.game.runner.active,
            "episodes_per_s": round(c.finished / elapsed, 4),
            "tokens_per_s": round(c.generated_tokens / elapsed, 2),
            "generated_tokens": c.generated_tokens,
            "extraction_rate": round(c.questions / proposals, 4) if proposals else None,
            "validity_rate": round(c.valid / proposals, 4) if proposals else None,
            "invalid_reasons": dict(c.invalid_reasons),
            "solver_accuracy": round(c.accuracy_sum / c.valid, 4) if c.valid else None,
            "proposer_reward_mean": round(c.proposer_reward_sum / proposals, 4) if proposals else None,
            "zero_variance_groups": c.zero_variance_groups,
            "trajectories": dict(c.roles),
            "policy_version": self.gate.version,
            "max_inflight": self.max_inflight,
            "stream_queue": self.stream.queue_depth,
            "frames_sent": self.stream.stats.frames_sent,
            "frames_spilled": self.stream.stats.frames_spilled,
            "spill_path": self.stream.stats.spill_path,
            "stream_error": self.stream.stats.error,
            **self.game.runner.turn_overhead.summary_ms("turn_overhead"),
            **self.lag.lag.summary_ms("loop_lag"),
            **self.lag.busy.summary_ms("loop_busy"),
            **self.collector.summary(),
        }
        if self._pool_stats is not None:
            out.update(self._pool_stats())
        if self._search_stats is not None:
            out.update(self._search_stats())
        return out

    async def _version_loop(self, read: Callable[[], Awaitable[int]]) -> None:
        """Follow the learner: its weight pushes label the servers with the policy version."""
        while True:
            try:
                version = await read()
            except Exception as e:  # a server briefly unreachable must not stop the run; the gate just waits
                log.warning("could not read the policy version from the servers: %s", e)
            else:
                if version > self.gate.version:
                    await self.gate.set_version(version)
            await asyncio.sleep(self.cfg.version_poll_s)

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.metrics_interval_s)
            if self._metrics is not None:
                self._metrics.write({"event": "progress", **self.summary()})
