"""`ssp bench scale`: one engine process at 1k, 5k and 10k concurrent SSP episodes against simulated servers.

Per size, in this process (the ramp starts once all N episodes are launched; launching renders N prompts): the real
engine (scheduler in async mode with no staleness bound, rollouts, search
batcher over the Tantivy demo index, SSP game; finished groups are counted and dropped) keeps N episodes in flight
against --servers `ssp model serve --sim` processes (7B profile). After --ramp seconds the samples are reset and for
--duration seconds it records:
  - per-turn engine overhead p50/p99 (RolloutRunner.turn_overhead: the engine's own work between a turn's answer and
    the next request, search waits excluded), over every turn completed in the window, in wall-clock time and in
    the loop thread's CPU time (on a shared machine the wall figure also holds the time the host ran others);
  - end-to-end turn latency p50/p99 (RolloutRunner.turn_latency): from a turn's answer being in to the next
    request handed to the connection, with every wait between (the loop, the search, decoding and encoding) but the
    wait for a free server slot, reported beside it (slot wait: at 5k and 10k episodes the servers' slots are all
    taken and requests queue by design), and the search's share of it (search wait: batching window, retriever,
    documents' encoding);
  - event-loop lag p50/p99/max (how late a 10 ms timer fires): how long any callback, an answer, a search result,
    waits for the loop;
  - rollouts in flight, server slot occupancy, turns/s;
  - memory per rollout: (resident set now - resident set once the engine is built, before any episode) / rollouts
    in flight.
Placement: the engine's event-loop thread alone on the first core; its helper threads (Tantivy searches, tokenizer)
and the simulated servers on the others (ssp.bench.cores). The run also counts server ejections (there should be none).
Goals, at the largest size: event-loop lag p99 at most 5 ms and per-turn overhead p99 under 1 ms; a size with no
completed turn in the window fails (no measurement is not a pass). Writes artifacts/bench/scale.json (+ .md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir, default_index_dir

GOAL_P99_MS = 1.0
"""Per-turn engine overhead p99 (wall clock) at the largest size must stay under this."""
GOAL_LOOP_LAG_P99_MS = 5.0
"""Event-loop lag p99 at the largest size must be at most this."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000],
                   help="episodes in flight per measurement (default: 1000 5000 10000)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per size (default: 20)")
    p.add_argument("--ramp", type=float, default=20.0,
                   help="seconds not measured after all N episodes are launched (default: 20)")
    p.add_argument("--servers", type=int, default=2, help="simulated servers (default: 2)")
    p.add_argument("--capacity", type=int, default=2048, help="requests in flight per server (default: 2048)")
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="simulated seconds per wall second of the sim servers (default: 2)")
    p.add_argument("--index", type=Path, help="Tantivy index searched (default: the demo index)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/scale.json)")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


class _Discard:
    """A FrameSink that counts the groups and drops them (no learner in this bench)."""

    def __init__(self) -> None:
        self.frames = 0

    async def write(self, frame: bytes) -> None:
        self.frames += 1

    async def close(self) -> None:
        return None


async def measure_size(n: int, urls: list[str], args: argparse.Namespace, helper_cpus: set[int] | None
                       ) -> dict[str, Any]:
    from ssp.bench.cores import pin_helper_threads
    from ssp.config import load_config
    from ssp.engine.assemble import build_scheduler, open_engine, pool_summary
    from ssp.engine.stream import TrajectoryStream
    from ssp.engine.telemetry import Samples
    from ssp.run_config import SSPConfig

    url_list = ",".join(f'"{u}"' for u in urls)
    cfg = load_config(SSPConfig, None, [
        f"inference.server_urls=[{url_list}]", f"inference.capacity_per_server={args.capacity}",
        'scheduler.mode="async"', f"scheduler.max_inflight={n}", f"scheduler.episodes_per_step={n}",
        "scheduler.metrics_interval_s=3600", "stream.queue_groups=100000",
        # The launch burst opens capacity x servers connections at once to simulated servers that share one core,
        # with the engine's loop saturated by thousands of first turns: the 5 s budgets meant for real servers
        # would eject healthy ones (the run reports ejections; there should be none).
        "inference.connect_timeout_s=60", "inference.health_timeout_s=30",
        *([f'retriever.index_dir="{args.index}"'] if args.index is not None else []),
    ]).engine()
    # No learner: nothing to be stale against.
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, eta=None))
    sink = _Discard()
    stream = TrajectoryStream(sink, max_frame_bytes=cfg.stream.max_frame_bytes, queue_groups=cfg.stream.queue_groups,
                              spill_path=artifacts_dir() / "bench" / "scale.spill")
    active, occupancy, rss = Samples(), Samples(), Samples()
    async with open_engine(cfg) as parts:
        pool, runner = parts.pool, parts.game.runner
        sched = build_scheduler(cfg, parts, stream)
        rss0 = _rss_bytes()  # everything but the episodes: imports, tokenizer, index, pool
        task = asyncio.create_task(sched.run(None), name="bench-scale")
        launch_started = time.perf_counter()
        while sched.counters.launched < n and not task.done():  # the launch burst renders n prompts
            await asyncio.sleep(0.25)
            pin_helper_threads(helper_cpus)
        launch_s = time.perf_counter() - launch_started
        await asyncio.sleep(args.ramp)
        runner.turn_overhead = Samples(size=200_000)
        runner.turn_overhead_cpu = Samples(size=200_000)
        runner.turn_latency = Samples(size=200_000)
        runner.turn_slot_wait = Samples(size=200_000)
        runner.search_wait = Samples(size=200_000)
        sched.lag.lag = Samples()
        frames0, start = sink.frames, time.perf_counter()
        while time.perf_counter() - start < args.duration and not task.done():
            await asyncio.sleep(0.25)
            pin_helper_threads(helper_cpus)
            active.add(runner.active)
            occupancy.add(pool_summary(pool)["slot_occupancy"])
            rss.add(_rss_bytes())
        elapsed = time.perf_counter() - start
        if task.done():
            task.result()
            raise RuntimeError("the engine stopped during the measurement")
        turns, cpu, latency, slot_wait, search = (runner.turn_overhead, runner.turn_overhead_cpu,
                                                  runner.turn_latency, runner.turn_slot_wait, runner.search_wait)
        lag = sched.lag.lag
        result = {
            "episodes_in_flight": n,
            "rollouts_in_flight_p50": active.percentile(50),
            "rollouts_in_flight_min": min(active.values(), default=0),
            "turns_measured": turns.count,
            "turns_per_s": round(turns.count / elapsed, 1),
            "episodes_finished_per_s": round((sink.frames - frames0) / elapsed, 2),
            "turn_overhead_p50_ms": round(turns.percentile(50) * 1e3, 3) if turns.count else None,
            "turn_overhead_p99_ms": round(turns.percentile(99) * 1e3, 3) if turns.count else None,
            "turn_cpu_p50_ms": round(cpu.percentile(50) * 1e3, 3) if cpu.count else None,
            "turn_cpu_p99_ms": round(cpu.percentile(99) * 1e3, 3) if cpu.count else None,
            "turn_latency_p50_ms": round(latency.percentile(50) * 1e3, 2) if latency.count else None,
            "turn_latency_p99_ms": round(latency.percentile(99) * 1e3, 2) if latency.count else None,
            "slot_wait_p50_ms": round(slot_wait.percentile(50) * 1e3, 1) if slot_wait.count else None,
            "slot_wait_p99_ms": round(slot_wait.percentile(99) * 1e3, 1) if slot_wait.count else None,
            "search_wait_p50_ms": round(search.percentile(50) * 1e3, 2) if search.count else None,
            "search_wait_p99_ms": round(search.percentile(99) * 1e3, 2) if search.count else None,
            "launch_s": round(launch_s, 1),
            "loop_lag_p50_ms": round(lag.percentile(50) * 1e3, 2),
            "loop_lag_p99_ms": round(lag.percentile(99) * 1e3, 2),
            "loop_lag_max_ms": round(lag.max * 1e3, 2),
            "slot_occupancy_mean": round(occupancy.mean(), 4),
            "server_ejections": pool.metrics().ejections,
            "rss_mb": round(rss.percentile(50) / 2**20, 1),
            "memory_per_rollout_kb": round((rss.percentile(50) - rss0) / 1024 / max(1.0, active.percentile(50)),
                                           1),
        }
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.abort_all()
        return result


def run(args: argparse.Namespace) -> int:
    import uvloop

    from ssp.bench.async_vs_sync import resolve_profile
    from ssp.bench.async_vs_sync_run import SimServers
    from ssp.bench.cores import pin_process, place_engine

    out_json = args.out or artifacts_dir() / "bench" / "scale.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.sizes))
    if not sizes or sizes[0] < 1:
        print(f"ssp bench scale: --sizes {args.sizes}: give positive episode counts", file=sys.stderr)
        return 2
    if args.index is None and not default_index_dir().exists():
        print(f"the demo index {default_index_dir()} is missing; build it with `ssp index build --corpus "
              "data/corpus/*.jsonl --out artifacts/index/demo`", file=sys.stderr)
        return 2
    placement = place_engine()
    servers = SimServers(args.servers, resolve_profile("qwen2.5-7b-h100-tp1"), args.time_scale,
                         out_json.parent / "logs" / "scale")
    for process in servers.procs.processes:
        pin_process(process.pid, placement.server_cpus)
    rows = []
    try:
        for n in sizes:
            print(f"scale: {n} episodes in flight on {args.servers} sim servers (x{args.time_scale}); ramp "
                  f"{args.ramp}s, measured {args.duration}s ...", flush=True)
            r = uvloop.run(measure_size(n, servers.urls, args, placement.server_cpus))
            print(f"  rollouts in flight {r['rollouts_in_flight_p50']}, {r['turns_measured']} turns, overhead "
                  f"p50/p99 {r['turn_overhead_p50_ms']}/{r['turn_overhead_p99_ms']} ms, end-to-end turn p50/p99 "
                  f"{r['turn_latency_p50_ms']}/{r['turn_latency_p99_ms']} ms, loop lag p50/p99 "
                  f"{r['loop_lag_p50_ms']}/{r['loop_lag_p99_ms']} ms, {r['memory_per_rollout_kb']} KB per rollout",
                  flush=True)
            rows.append(r)
    finally:
        servers.stop()
    results = {"args": {k: str(v) for k, v in vars(args).items() if k != "run"}, "sizes": rows}
    out_json.write_text(json.dumps(results, indent=2))
    report = markdown(results)
    out_json.with_suffix(".md").write_text(report)
    print(report)
    last = rows[-1]
    p99, lag = last["turn_overhead_p99_ms"], last["loop_lag_p99_ms"]
    ok = p99 is not None and p99 < GOAL_P99_MS and lag <= GOAL_LOOP_LAG_P99_MS
    print("PASS" if ok else "FAIL", f": at {last['episodes_in_flight']} episodes in flight, event-loop lag p99 {lag} "
          f"ms (goal <= {GOAL_LOOP_LAG_P99_MS} ms) and per-turn overhead p99 {p99} ms wall-clock over "
          f"{last['turns_measured']} turns (goal < {GOAL_P99_MS} ms); the engine's own CPU per turn p99 "
          f"{last['turn_cpu_p99_ms']} ms, end-to-end turn p99 {last['turn_latency_p99_ms']} ms")
    return 0 if ok else 1


def markdown(results: dict[str, Any]) -> str:
    a = results["args"]
    lines = ["## Scale: one engine process", "",
             f"{a['servers']} simulated 7B servers at time scale {a['time_scale']}, {a['capacity']} slots each; "
             f"ramp {a['ramp']} s, measured {a['duration']} s per size.", "",
             "| episodes in flight | launch s | rollouts in flight | turns measured | turn overhead p50 ms | p99 ms | "
             "CPU p50 ms | CPU p99 ms | end-to-end turn p50 ms | p99 ms | of which search p50 ms | p99 ms | "
             "slot wait p50 ms | p99 ms | loop lag p50 ms | p99 ms | max ms | slot occupancy | KB per rollout | "
             "server ejections |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        lines.append(f"| {r['episodes_in_flight']} | {r['launch_s']} | {r['rollouts_in_flight_p50']} | "
                     f"{r['turns_measured']} | {r['turn_overhead_p50_ms']} | {r['turn_overhead_p99_ms']} | "
                     f"{r['turn_cpu_p50_ms']} | {r['turn_cpu_p99_ms']} | {r.get('turn_latency_p50_ms', '-')} | "
                     f"{r.get('turn_latency_p99_ms', '-')} | {r.get('search_wait_p50_ms', '-')} | "
                     f"{r.get('search_wait_p99_ms', '-')} | {r.get('slot_wait_p50_ms', '-')} | "
                     f"{r.get('slot_wait_p99_ms', '-')} | {r['loop_lag_p50_ms']} | "
                     f"{r['loop_lag_p99_ms']} | {r['loop_lag_max_ms']} | {r['slot_occupancy_mean']} | "
                     f"{r['memory_per_rollout_kb']} | {r.get('server_ejections', '-')} |")
    return "\n".join(lines) + "\n"
