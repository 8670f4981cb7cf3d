"""A simulated learner for the benches: receives the real trajectory stream, "trains" for the time the profile's
learner model gives, then pushes weights through the real pool to the simulated servers.

Why simulated: the async-vs-sync question is about schedules on GPUs this machine does not have. The engine side
stays real (scheduler, rollouts, search, game, stream); only the two GPU costs are modeled, both from the profile
([learner] and [weight_update]):

    train step  t = fixed_s + tokens * flops_per_token * passes * attn_overhead / (gpus * peak_flops_per_gpu * mfu)
    weight push pause_generation(in_place, or retract every kv_refresh_every-th push: ssp.learner.push.pause_mode) ->
                update_weights_from_disk -> continue_generation on every server; the simulated server sleeps the
                profile's pause / update (tp_gather + bytes/bandwidth + buckets * per_bucket_overhead) / resume
                times, so the push costs what the profile says, at the servers' clock.

Clock: simulated seconds = wall seconds x time_scale, the same scale the sim servers run at (`--sim-time-scale`),
so learner, servers and the engine's own (real, unscaled) CPU work are on one time line. The engine's CPU time
therefore counts time_scale times over in simulated seconds; a bench compares schedules at one time scale and checks
each against its bound, so host time that leaks in shows as lost efficiency.

The learner consumes `episodes_per_step` groups per step, in arrival order, as the real learner does; it trains
the roles the real learner trains (proposer and solver; verifier samples are not trained) and counts them. With
`max_staleness` it drops a group whose oldest trained token is older than that many versions, as the real
learner's learner.max_staleness does (ssp.learner.batching), and trains the rest of the batch.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ssp.engine.stream import HEADER
from ssp.engine.trajectory import Trajectory, unpack_group
from ssp.learner.batching import oldest_trained_version
from ssp.serving.sim_profile import LearnerSpec, SimProfile

TRAINED_ROLES = ("proposer", "solver")


def learner_step_s(spec: LearnerSpec, *, flops_per_token: float, tokens: int, gpus: int) -> float:
    """Seconds of one training step over `tokens` tokens on `gpus` GPUs (profile [learner]); linear in tokens/gpus."""
    if gpus < 1:
        raise ValueError(f"gpus = {gpus}: a learner needs at least one GPU")
    if tokens < 0:
        raise ValueError(f"tokens = {tokens}: must be >= 0")
    flops = tokens * flops_per_token * spec.passes * spec.attn_overhead
    return spec.fixed_s + flops / (gpus * spec.peak_flops_per_gpu * spec.mfu)


def push_s(profile: SimProfile) -> float:
    """Simulated seconds of one weight push as the sim server models it: pause + full update + resume."""
    import math

    w = profile.weight_update
    buckets = math.ceil(w.bytes / w.bucket_bytes)
    update = w.tp_gather_s + w.bytes / w.bandwidth_bytes_per_s + buckets * w.per_bucket_overhead_ms / 1000
    return (w.pause_ms + w.resume_ms) / 1000 + update


class SimClock:
    """Simulated time at a fixed multiple of the wall clock (the servers' --sim-time-scale)."""

    def __init__(self, time_scale: float) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale = {time_scale}: must be > 0 (1 = real time)")
        self.time_scale = time_scale
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return (time.perf_counter() - self._t0) * self.time_scale

    async def sleep(self, sim_s: float) -> None:
        await asyncio.sleep(sim_s / self.time_scale)


@dataclass(frozen=True, slots=True)
class StepLog:
    """One simulated learner step."""

    version: int
    """Policy version after the step (the first step makes version 1)."""
    ended_at: float
    """Simulated time when the pushed weights were live on every server."""
    groups: int
    trajectories: int
    """Trained trajectories (proposer and solver records)."""
    tokens: int
    """Prompt + response tokens of the trained trajectories (what the learner runs forward/backward over)."""
    train_s: float
    push_s: float
    """Simulated seconds of the push, measured on the shared clock."""
    wait_s: float
    """Simulated seconds the learner waited for this step's groups (starvation)."""
    staleness_max: int | None
    """Versions between the oldest trained token of the batch's groups and the version trained (None: no known
    version), before any drop."""
    dropped_groups: int
    """Groups of the batch beyond max_staleness, consumed but not trained."""
    backlog: int
    """Groups received but not yet trained when the step's push ended (delivered work waiting for the learner)."""


class SimLearner:
    """A `FrameSink` for the engine's TrajectoryStream, plus the learner loop that consumes what it receives.

    `push` is called after every step with the new version (it pauses, updates and resumes the servers),
    `on_version` after the push (it lets the scheduler start episodes on the new version), and `on_group` with every
    group received (benches tally shapes from it). `on_version` may be assigned after construction, before `run()`:
    the scheduler it informs is built on the stream that feeds this learner.
    """

    def __init__(self, profile: SimProfile, *, gpus: int, episodes_per_step: int, clock: SimClock,
                 push: Callable[[int], Awaitable[None]],
                 on_version: Callable[[int], Awaitable[None]] | None = None,
                 on_group: Callable[[list[Trajectory]], None] | None = None) -> None:
        self.profile = profile
        self.gpus = gpus
        self.per_step = episodes_per_step
        self.clock = clock
        self._push = push
        self.on_version = on_version
        self._on_group = on_group
        self._inbox: collections.deque[tuple[int, int, int | None]] = collections.deque()
        """(trained trajectories, tokens, oldest trained version) per received group, in arrival order."""
        self._arrived = asyncio.Event()
        self.steps: list[StepLog] = []
        self.groups_received = 0

    # -- FrameSink ----------------------------------------------------------------------------------------------
    async def write(self, frame: bytes) -> None:
        group = unpack_group(frame[HEADER.size:])
        if self._on_group is not None:
            self._on_group(group)
        trained = [t for t in group if t.role in TRAINED_ROLES]
        self._inbox.append((len(trained), sum(len(t.prompt_ids) + len(t.response_ids) for t in trained),
                            oldest_trained_version(group, TRAINED_ROLES)))
        self.groups_received += 1
        self._arrived.set()

    async def close(self) -> None:
        return None

    # -- the learner loop ---------------------------------------------------------------------------------------
    def step_s(self, tokens: int) -> float:
        return learner_step_s(self.profile.learner, flops_per_token=self.profile.model.flops_per_token,
                              tokens=tokens, gpus=self.gpus)

    async def run(self, steps: int, *, max_staleness: int | None = None) -> list[StepLog]:
        """Train `steps` steps (each on the next episodes_per_step groups, those beyond `max_staleness` dropped),
        pushing after each; returns the log."""
        if self.on_version is None:
            raise RuntimeError("SimLearner.run: on_version is unset; assign the callback that hands each new policy "
                               "version to the scheduler before running")
        for version in range(1, steps + 1):
            waited_from = self.clock.now()
            while len(self._inbox) < self.per_step:
                self._arrived.clear()
                await self._arrived.wait()
            wait_s = self.clock.now() - waited_from
            batch = [self._inbox.popleft() for _ in range(self.per_step)]
            lags = [version - 1 - oldest for _, _, oldest in batch if oldest is not None]
            kept = [(n, k) for n, k, oldest in batch
                    if max_staleness is None or oldest is None or version - 1 - oldest <= max_staleness]
            trajectories = sum(n for n, _ in kept)
            tokens = sum(k for _, k in kept)
            train_s = self.step_s(tokens)
            await self.clock.sleep(train_s)
            push_from = self.clock.now()
            await self._push(version)
            pushed = self.clock.now()
            await self.on_version(version)
            self.steps.append(StepLog(version=version, ended_at=pushed, groups=len(batch), trajectories=trajectories,
                                      tokens=tokens, train_s=train_s, push_s=pushed - push_from, wait_s=wait_s,
                                      staleness_max=max(lags, default=None),
                                      dropped_groups=len(batch) - len(kept), backlog=len(self._inbox)))
        return self.steps


def steady_rate(steps: list[StepLog], warmup: int) -> float:
    """Trained trajectories per simulated second over the steps after the first `warmup` (the steady state)."""
    if len(steps) <= warmup:
        raise ValueError(f"{len(steps)} steps recorded: need more than warmup = {warmup} to measure a rate")
    start = steps[warmup - 1].ended_at if warmup > 0 else 0.0
    window = steps[warmup:]
    return sum(s.trajectories for s in window) / max(1e-9, window[-1].ended_at - start)
