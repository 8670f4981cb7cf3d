"""One run of `ssp bench async-vs-sync`: a schedule (`RunSpec`) played by the real engine against simulated servers
and the simulated learner, measured over the steps after warm-up, with its bound and its clock guard.

Arms:
    sync      scheduler mode "sync" (propose, verify, solve, each a barrier), every server serving, then the learner
              trains on all G GPUs, then the push.
    lockstep  scheduler mode "async" with eta 0 and episodes_per_step in flight: each episode runs propose -> verify
              -> solve on its own, with no phase barrier; the learner trains on all G GPUs once the step's groups
              are in. On-policy like sync, without its phase tails.
    async     g servers, the learner on G - g GPUs, eta > 0: episodes stream while the learner trains.
Colocated arms (sync, lockstep) hold nothing in flight when they push, so they flush the prefix cache on every push
(their cache would hold the old policy's KV); async follows its kv_refresh_every.

Clock guard: every simulated server reports `behind_s`, the wall seconds it ran late, cumulatively (serving/sim.py:
lag counts from the moment work arrived and is not forgiven when the server idles). The run reads it at every phase
boundary (sync: the scheduler's on_phase; every arm: each learner step's end) and requires each interval's
increase, on the worst server, to stay within CLOCK_SLIP_LIMIT of the interval's wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssp.bench.async_vs_sync_bound import GroupTally, async_bound, phased_bound
from ssp.bench.sim_learner import SimClock, SimLearner, StepLog, steady_rate
from ssp.paths import artifacts_dir
from ssp.serving.sim_profile import SimProfile

ARMS = ("sync", "lockstep", "async")

CLOCK_SLIP_LIMIT = 0.01
"""Largest share of any guarded interval's wall time a simulated server may fall behind its clock in it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """One schedule on one hardware split."""

    arm: str
    """"sync", "lockstep" or "async" (see the module docstring)."""
    serve_gpus: int
    learn_gpus: int
    eta: int
    episodes_per_step: int
    steps: int
    warmup: int
    capacity: int
    time_scale: float
    kv_refresh_every: int
    """Pushes pause in place but every this many, which retract and flush (ssp.learner.push.pause_mode); 1 = flush on
    every push."""

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"arm {self.arm!r}: must be one of {', '.join(ARMS)}")
        if self.arm != "async" and self.eta != 0:
            raise ValueError(f"{self.arm} with eta = {self.eta}: the colocated arms are on-policy (eta 0)")
        if self.steps <= self.warmup:
            raise ValueError(f"steps = {self.steps}, warmup = {self.warmup}: need steps > warmup to measure a rate")

    @property
    def label(self) -> str:
        push = "flush every push" if self.kv_refresh_every == 1 else f"flush every {self.kv_refresh_every}"
        return (f"{self.arm} serve={self.serve_gpus} learn={self.learn_gpus} eta={self.eta} ({push}) "
                f"x{self.time_scale:g}")


# ---------------------------------------------------------------- servers


class SimServers:
    """n `ssp model serve --sim` processes for one profile and time scale; `urls`; `stop()`."""

    def __init__(self, n: int, profile: Path, time_scale: float, log_dir: Path) -> None:
        from ssp.processes import ProcessSet, free_port

        self.procs = ProcessSet()
        self.urls: list[str] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        # The servers share what the proposers were told: an episode's solvers and verifiers land on other servers
        # than its proposer, and a sim server answers only questions it knows (sim_profile.SimSpec).
        text = profile.read_text()
        if "[sim]" in text:
            raise ValueError(f"{profile}: has a [sim] table; the bench adds its own (shared_memory_file)")
        memory = log_dir / "questions.jsonl"
        memory.unlink(missing_ok=True)
        profile = log_dir / profile.name
        profile.write_text(f"{text}\n[sim]\nshared_memory_file = {json.dumps(str(memory))}\n")
        started = []
        for i in range(n):
            port = free_port()
            proc = self.procs.start(f"sim-{i}", [
                sys.executable, "-m", "ssp.cli", "model", "serve", "--sim", "--host", "127.0.0.1", "--port",
                str(port), "--sim-profile", str(profile), "--sim-time-scale", str(time_scale)],
                log_path=log_dir / f"sim-{i}.log")
            started.append((proc, f"http://127.0.0.1:{port}"))
        try:
            for proc, url in started:
                proc.wait_ready(url=f"{url}/health", timeout_s=180)
                self.urls.append(url)
        except BaseException:
            self.procs.stop_all()
            raise

    def stop(self) -> None:
        self.procs.stop_all()


# ---------------------------------------------------------------- engine config and push


def engine_config(spec: RunSpec, urls: list[str], index_dir: Path | None, seed: int) -> Any:
    """The run's SSPConfig: the defaults with the bench's servers, slots and schedule."""
    from ssp.run_config import SSPConfig

    base = SSPConfig()
    mode = "sync" if spec.arm == "sync" else "async"
    # Lock-step keeps exactly one step in flight; async up to eta + 1 steps (the gate bounds it anyway).
    inflight = (spec.eta + 1) * spec.episodes_per_step
    return dataclasses.replace(
        base,
        # Hundreds of rollouts open their connections at once (a sync phase starts every episode together).
        inference=dataclasses.replace(base.inference, server_urls=tuple(urls), capacity_per_server=spec.capacity,
                                      connect_timeout_s=60.0),
        scheduler=dataclasses.replace(base.scheduler, mode=mode, eta=spec.eta,
                                      episodes_per_step=spec.episodes_per_step, max_inflight=inflight, seed=seed,
                                      metrics_interval_s=3600.0),
        stream=dataclasses.replace(base.stream, queue_groups=100_000),
        retriever=base.retriever if index_dir is None else dataclasses.replace(base.retriever, index_dir=index_dir),
    )


async def push_weights(pool: Any, version: int, kv_refresh_every: int) -> None:
    """The learner's push sequence (ssp.learner.push.WeightPusher.push: pause, update, in place a flush when the servers
    hold nothing, continue) with the sim's modeled update in place of the broadcast. WeightPusher itself broadcasts
    real tensors over a process group, which the simulated servers do not join, so the sequence is replayed here
    over the engine's pool, with the same pause_mode schedule."""
    from ssp.learner.push import pause_mode

    mode = pause_mode(version, kv_refresh_every)
    _check(await pool.pause(mode), "pause_generation")
    _check(await pool.update_weights_from_disk("sim", weight_version=str(version), flush_cache=mode == "retract"),
           "update_weights_from_disk")
    if mode == "in_place":
        await pool.flush_cache()  # refused by a server that holds requests, as in the learner
    _check(await pool.continue_(), "continue_generation")


def _check(results: dict[str, Any], what: str) -> None:
    bad = [f"{url}: {r.message}" for url, r in results.items() if not r.success]
    if bad:
        raise RuntimeError(f"{what} failed: " + "; ".join(bad))


# ---------------------------------------------------------------- clock readings


@dataclass(frozen=True, slots=True)
class Reading:
    """Every server's sim_clock at one moment of the run."""

    label: str
    """What begins here: a sync phase ("propose", ...) or "step N" (learner step N's push ended)."""
    sim_s: float
    """Simulated time of the event (the phase boundary)."""
    wall_s: float
    """Wall time the servers answered (what their behind_s counters are as of)."""
    clocks: list[dict[str, float]]


@dataclass(slots=True)
class ClockLog:
    """Readings of the servers' clocks, taken without blocking the schedule (each in its own task)."""

    pool: Any
    clock: SimClock
    readings: list[Reading] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def mark(self, label: str) -> None:
        self._tasks.append(asyncio.create_task(self._read(label, self.clock.now())))

    async def _read(self, label: str, sim_s: float) -> None:
        infos = await self.pool.server_infos()
        self.readings.append(Reading(label, sim_s, time.perf_counter(),
                                     [i["internal_states"][0]["sim_clock"] for i in infos.values()]))

    async def settle(self) -> list[Reading]:
        await asyncio.gather(*self._tasks)
        return sorted(self.readings, key=lambda r: r.sim_s)


GUARD_MIN_WALL_S = 1.0
"""Shortest wall interval the clock guard judges alone; a shorter phase (a push, a sync step's end right before the
next step's first phase) is judged together with what follows it, so one reading's jitter is not a share of nothing."""


def clock_guard(readings: list[Reading]) -> dict[str, Any]:
    """The worst guarded interval: the largest increase of one server's behind_s over the interval's wall time.
    Intervals run between readings, merged forward until each spans GUARD_MIN_WALL_S (the last may be shorter).
    Within CLOCK_SLIP_LIMIT everywhere: the run's rates stand."""
    worst = {"share": 0.0, "phase": None, "behind_s": 0.0, "wall_s": 0.0}
    shares: list[float] = []
    i = 0
    while i < len(readings) - 1:
        a, j = readings[i], i + 1
        while j < len(readings) - 1 and readings[j].wall_s - a.wall_s < GUARD_MIN_WALL_S:
            j += 1
        b = readings[j]
        wall = max(1e-9, b.wall_s - a.wall_s)
        behind = max(e["behind_s"] - s["behind_s"] for s, e in zip(a.clocks, b.clocks))
        shares.append(round(behind / wall, 4))
        if behind / wall > worst["share"]:
            worst = {"share": behind / wall, "phase": a.label, "behind_s": behind, "wall_s": wall}
        i = j
    return {"worst_share": round(worst["share"], 5), "worst_phase": worst["phase"],
            "worst_behind_s": round(worst["behind_s"], 4), "worst_wall_s": round(worst["wall_s"], 3),
            "intervals": len(shares), "shares": shares, "kept": worst["share"] <= CLOCK_SLIP_LIMIT}


def _delta(a: Reading, b: Reading) -> dict[str, float]:
    return {k: sum(e[k] - s[k] for s, e in zip(a.clocks, b.clocks)) for k in b.clocks[0]}


def server_time_shares(a: Reading, b: Reading) -> dict[str, float]:
    """Where the servers' simulated time went between two readings, summed over servers, as shares: decode, prefill
    of new tokens, recompute (retracted or flushed contexts prefilled again), paused (weight updates) and idle."""
    total = _delta(a, b)
    elapsed = max(1e-9, total["elapsed_s"])
    recompute = total["prefill_s"] * total["recomputed_tokens"] / max(1, total["prefill_tokens"])
    busy = total["decode_s"] + total["prefill_s"]
    shares = {"decode": total["decode_s"], "prefill": total["prefill_s"] - recompute, "recompute": recompute,
              "paused": total["paused_s"], "idle": max(0.0, elapsed - busy - total["paused_s"])}
    return {k: round(v / elapsed, 4) for k, v in shares.items()}


def phase_durations(readings: list[Reading]) -> dict[str, float]:
    """Mean simulated seconds from each sync phase's start to the next reading (sync runs; {} otherwise)."""
    spans: dict[str, list[float]] = {}
    for a, b in zip(readings, readings[1:]):
        if not a.label.startswith("step"):
            spans.setdefault(a.label, []).append(b.sim_s - a.sim_s)
    return {k: round(sum(v) / len(v), 3) for k, v in spans.items()}


# ---------------------------------------------------------------- one run


async def run_schedule(profile: SimProfile, urls: list[str], spec: RunSpec, *, seed: int = 1,
                       timeout_s: float = 600.0, index_dir: Path | None = None) -> dict[str, Any]:
    """Play `spec` with the real engine against `urls` and a SimLearner; return rates, bound, efficiency, clock
    guard and where the servers' time went, over the steps after warm-up."""
    from ssp.engine.assemble import build_scheduler, open_engine, pool_summary
    from ssp.engine.stream import TrajectoryStream
    from ssp.engine.telemetry import Samples

    cfg = engine_config(spec, urls, index_dir, seed)
    clock = SimClock(spec.time_scale)
    tally = GroupTally(profile, spec.capacity)
    occupancy = Samples()
    async with open_engine(cfg) as parts:
        pool = parts.pool
        _check(await pool.update_weight_version("0"), "update_weight_version")
        await pool.flush_cache()
        readings = ClockLog(pool, clock)
        learner = SimLearner(profile, gpus=spec.learn_gpus, episodes_per_step=spec.episodes_per_step, clock=clock,
                             push=lambda v: push_weights(pool, v, spec.kv_refresh_every), on_group=tally.add)
        stream = TrajectoryStream(learner, max_frame_bytes=cfg.stream.max_frame_bytes,
                                  queue_groups=cfg.stream.queue_groups,
                                  spill_path=artifacts_dir() / "bench" / "async_vs_sync.spill")
        sched = build_scheduler(cfg, parts, stream)
        sched.on_phase = readings.mark

        async def on_version(version: int) -> None:
            readings.mark(f"step {version}")
            await sched.set_policy_version(version)

        learner.on_version = on_version
        readings.mark("step 0")

        async def sample_occupancy() -> None:
            while True:
                await asyncio.sleep(0.05)
                if len(learner.steps) >= spec.warmup:
                    occupancy.add(pool_summary(pool)["slot_occupancy"])

        engine_task = asyncio.create_task(sched.run(None), name="bench-engine")
        sampler = asyncio.create_task(sample_occupancy(), name="occupancy-sampler")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        learn = asyncio.create_task(learner.run(spec.steps, max_staleness=spec.eta), name="sim-learner")
        try:
            done, _ = await asyncio.wait({learn, engine_task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if engine_task in done:
                engine_task.result()
                raise RuntimeError("the engine stopped before the learner finished its steps")
            if learn not in done:
                raise TimeoutError(f"{spec.label}: the learner finished {len(learner.steps)} of {spec.steps} steps "
                                   f"in {timeout_s:.0f} s of wall time; raise --run-timeout or lower --steps/"
                                   "--episodes-per-step")
            steps = learn.result()
            all_readings = await readings.settle()
        finally:
            engine_cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
            for task in (learn, sampler, engine_task):
                task.cancel()
            await asyncio.gather(learn, sampler, engine_task, return_exceptions=True)
        summary = sched.summary()
    return measure(profile, spec, steps, tally, all_readings, summary=summary, occupancy=occupancy.mean(),
                   wall_s=wall_s, engine_cpu_s=engine_cpu_s)


def measure(profile: SimProfile, spec: RunSpec, steps: list[StepLog], tally: GroupTally, readings: list[Reading], *,
            summary: dict[str, Any], occupancy: float, wall_s: float, engine_cpu_s: float) -> dict[str, Any]:
    """The run's figures over its window (the steps after warm-up): rate, bound and efficiency, clock guard."""
    rate = steady_rate(steps, spec.warmup)
    window = steps[spec.warmup:]
    start_label, end_label = f"step {spec.warmup}", f"step {spec.steps}"
    first = next(i for i, r in enumerate(readings) if r.label == start_label)
    last = next(i for i, r in enumerate(readings) if r.label == end_label)
    in_window = readings[first:last + 1]
    trained_groups = max(1, sum(s.groups - s.dropped_groups for s in window))
    window_start = steps[spec.warmup - 1].ended_at if spec.warmup else 0.0
    costs, groups = tally.costs()
    window_groups = groups[spec.warmup * spec.episodes_per_step:spec.steps * spec.episodes_per_step]
    delivered = _delta(in_window[0], in_window[-1])
    out: dict[str, Any] = {
        **dataclasses.asdict(spec),
        "trained_trajectories_per_s": round(rate, 4),
        "step_s_mean": round((window[-1].ended_at - window_start) / len(window), 3),
        "slot_occupancy_mean": round(occupancy, 4),
        "sim_seconds": round(steps[-1].ended_at, 2),
        "wall_seconds": round(wall_s, 2),
        "engine_cpu_fraction": round(engine_cpu_s / max(1e-9, wall_s), 3),
        "clock": clock_guard(in_window),
        "learner_wait_share": round(sum(s.wait_s for s in window) / max(1e-9, window[-1].ended_at - window_start),
                                    4),
        "train_s_mean": round(sum(s.train_s for s in window) / len(window), 3),
        "push_s_mean": round(sum(s.push_s for s in window) / len(window), 3),
        "trajectories_per_episode": round(sum(s.trajectories for s in window) / trained_groups, 3),
        "backlog_groups": {"window_start": steps[spec.warmup - 1].backlog if spec.warmup else 0,
                           "window_end": window[-1].backlog},
        "staleness_max": max((s.staleness_max for s in steps if s.staleness_max is not None), default=None),
        "stale_dropped_share": round(sum(s.dropped_groups for s in window) / max(1, sum(s.groups for s in window)),
                                     4),
        "server_time_shares": server_time_shares(in_window[0], in_window[-1]),
        "phase_s_mean": phase_durations(in_window),
        "server_batch_cap": costs.batch,
        # What the servers did per trained episode (their own counters): beside the bound's per-episode work, this
        # says whether a gap is the bound's token accounting or the schedule.
        "server_measured_per_episode": {
            "decode_s": round(delivered["decode_s"] / trained_groups, 4),
            "prefill_s": round(delivered["prefill_s"] / trained_groups, 4),
            "output_tokens": round(delivered["output_tokens"] / trained_groups, 1),
            "prefill_tokens": round(delivered["prefill_tokens"] / trained_groups, 1),
            "recomputed_tokens": round(delivered["recomputed_tokens"] / trained_groups, 1)},

        "episodes_failed": summary["episodes_failed"],
        "turn_overhead_p99_ms": summary["turn_overhead_p99_ms"],
        "loop_lag_p99_ms": summary["loop_lag_p99_ms"],
        "trained_groups": trained_groups,
        "step_logs": [dataclasses.asdict(s) for s in steps],
    }
    n_servers = len(in_window[0].clocks)
    if spec.arm == "async":
        bound = async_bound(profile, window_groups, costs=costs, per_step=spec.episodes_per_step,
                            serve_servers=n_servers, learn_gpus=spec.learn_gpus, eta=spec.eta,
                            measured_prefill_s_per_episode=delivered["prefill_s"] / trained_groups)
    else:
        bound = phased_bound(profile, groups, per_step=spec.episodes_per_step,
                             window=range(spec.warmup, spec.steps), servers=n_servers, gpus=spec.learn_gpus,
                             lockstep=spec.arm == "lockstep")
    out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in bound.items()})
    out["efficiency"] = round(rate / bound["bound_traj_per_s"], 4)
    return out
