"""`ssp bench async-vs-sync`: trained trajectories/s of the async (disaggregated, streaming) schedule against the
reference's synchronous (colocated, phase by phase) schedule, on the same G GPUs of a profile.

The engine is the real one, in this process (scheduler, rollout loop, search batcher over the real Tantivy demo
index, SSP game, trajectory stream); the GPU servers are `ssp model serve --sim --sim-profile P` processes; the
learner is `bench.sim_learner.SimLearner` (the profile's learner step time, pushes through the real pool, which the
sim servers time with the profile's weight-update model). Everything runs on one simulated clock: wall seconds x
--time-scale.

    sync   G servers (every GPU serves), scheduler mode "sync", eta 0: all proposers, then all verifications, then
           all solvers of a step; then the learner trains on all G GPUs; then the push; then the next step.
    async  g servers and a learner on G - g GPUs, scheduler mode "async" with staleness bound eta: episodes stream
           while the learner trains; swept over g (and over eta at the best g).

For each async run the bound is min(server capacity, learner rate) at that split, in trained trajectories/s:
    server capacity = g / (server seconds per episode), server seconds = generated tokens / decode rate at the
        server's batch cap (profile decode formula at the run's mean context) + prefilled tokens / prefill rate;
    learner rate    = episodes_per_step / (train step on G - g GPUs + push), both from the profile;
with the per-episode token counts measured in the run itself. Efficiency = measured / bound.
Writes artifacts/bench/async_vs_sync.json (+ .md); `ssp bench report` turns it into plots and REPORT.md.
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

from learner.config import LearnerConfig
from ssp.paths import artifacts_dir, default_index_dir

DEFAULT_PROFILES = ("qwen2.5-7b-h100-tp1",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", nargs="+", default=list(DEFAULT_PROFILES), metavar="NAME_OR_FILE",
                   help="sim profiles (bench/profiles/NAME.toml or a path; default: %(default)s)")
    p.add_argument("--gpus", type=int, default=16, help="G, GPUs both schedules get (default: 16)")
    p.add_argument("--splits", type=int, nargs="+", default=[2, 4, 6],
                   help="serving GPUs g of the async sweep (learner gets G - g; default: 2 4 6)")
    p.add_argument("--etas", type=int, nargs="+", default=[1, 2, 4],
                   help="staleness bounds run at the best split (the sweep itself uses the largest; default: 1 2 4; "
                        "eta 0 at 256 episodes per step needs ~20 min of wall time per run)")
    p.add_argument("--episodes-per-step", type=int, default=256,
                   help="episodes (groups) the learner trains per step, the sync step size (default: 256, the batch "
                        "the profiles' learner time is for). Async keeps at most (eta + 1) x this many episodes "
                        "in flight, so small steps bind the run by episode latency (Little's law), not by servers "
                        "or learner")
    p.add_argument("--steps", type=int, default=8,
                   help="learner steps per run (default: 8; (eta + 1) x episodes-per-step start at once, and the "
                        "first steps drain that burst)")
    p.add_argument("--warmup", type=int, default=3, help="leading steps not measured (default: 3)")
    p.add_argument("--capacity", type=int, default=256,
                   help="requests in flight per server (the pool's slots; default: 256)")
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="simulated seconds per wall second, servers and learner alike (default: 2; a run warns when "
                        "the simulated servers fall behind their clock, i.e. the host is too slow for the scale)")
    p.add_argument("--sync-time-scale", type=float, default=8.0,
                   help="time scale of the sync run (default: 8). Sync spends most of its time in idle phase tails, "
                        "so it keeps its clock at a faster scale; the engine's CPU time then counts more, against "
                        "sync. Run it at two scales to see that its rate does not depend on it")
    p.add_argument("--kv-refresh-every", type=int, default=LearnerConfig().push_kv_refresh_every,
                   help="every this many pushes retract and flush, the others pause in place, as the learner's "
                        "push_kv_refresh_every does (default: the learner's, %(default)s; 1 = fresh KV after every "
                        "push)")
    p.add_argument("--run-timeout", type=float, default=600.0,
                   help="wall seconds one run may take before it is reported as stuck (default: 600)")
    p.add_argument("--index", type=Path, help="Tantivy index searched (default: the demo index, artifacts/index/demo)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/async_vs_sync.json)")


def resolve_profile(name: str) -> Path:
    from serving.sim_profile import PROFILES_DIR

    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = PROFILES_DIR / f"{name}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
    raise ValueError(f"profile {name!r}: no such file and not a profile name; known profiles: {known}")


# ---------------------------------------------------------------- servers


class SimServers:
    """n `ssp model serve --sim` processes for one profile and time scale, on `cpus` when given; `urls`; `stop()`."""

    def __init__(self, n: int, profile: Path, time_scale: float, log_dir: Path, cpus: set[int] | None = None) -> None:
        from bench.cores import pin
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
            pin(proc.proc.pid, cpus)
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


# ---------------------------------------------------------------- one run


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """One schedule on one hardware split."""

    mode: str
    """"sync" or "async"."""
    serve_gpus: int
    learn_gpus: int
    eta: int
    episodes_per_step: int
    steps: int
    warmup: int
    capacity: int
    time_scale: float
    kv_refresh_every: int
    """Pushes pause in place but every this many, which retract and flush (learner.push.pause_mode)."""


class ShapeTally:
    """Per-episode token counts the bound needs, from the groups the learner receives (engine-side truth)."""

    def __init__(self, block_tokens: int) -> None:
        self.block = block_tokens
        self.episodes = 0
        self.generated = 0
        self.prefilled = 0
        self.ctx_weighted = 0.0

    def add(self, group: list[Any]) -> None:
        self.episodes += 1
        prompts: set[tuple[str, int]] = set()
        for t in group:
            gen = sum(t.loss_mask)
            tool = len(t.response_ids) - gen
            turns = int(t.meta.get("turns", 1)) if isinstance(t.meta, dict) else 1
            key = (t.role, hash(tuple(t.prompt_ids)))
            # A prompt shared by a group's solvers (or verifiers) is prefilled once (the prefix cache); each later
            # turn prefills its tool block and the partial cache block before it.
            self.prefilled += (0 if key in prompts else len(t.prompt_ids)) + tool + (turns - 1) * self.block // 2
            prompts.add(key)
            self.generated += gen
            self.ctx_weighted += gen * (len(t.prompt_ids) + len(t.response_ids) / 2)

    def per_episode(self) -> dict[str, float]:
        n = max(1, self.episodes)
        return {"generated": self.generated / n, "prefilled": self.prefilled / n,
                "mean_context": self.ctx_weighted / max(1, self.generated)}


def server_seconds_per_episode(profile: Any, shape: dict[str, float], batch: int) -> float:
    """Simulated server seconds one episode costs at a full batch (the profile's decode and prefill formulas)."""
    d, s, p = profile.decode, profile.server, profile.prefill
    batch = max(1, min(batch, s.max_running_requests, int(s.kv_capacity_tokens // max(1.0, shape["mean_context"]))))
    step_ms = d.a_ms + d.b_ms_per_request * batch + d.c_ms_per_kv_token * batch * shape["mean_context"]
    step_ms += d.eager_penalty_ms if batch > s.cuda_graph_max_bs else 0.0
    decode_s = shape["generated"] * step_ms / 1000 / batch
    prefill_s = shape["prefilled"] * (1 + shape["mean_context"] / p.attn_ctx_half_tokens) / p.tokens_per_s
    return decode_s + prefill_s


def _clock_delta(start: list[dict[str, float]], end: list[dict[str, float]]) -> dict[str, float]:
    """Each `sim_clock` counter's change between two snapshots of the same servers, summed over them."""
    return {k: sum(e[k] - s[k] for s, e in zip(start, end)) for k in end[0]}


def server_time_shares(start: list[dict[str, float]], end: list[dict[str, float]]) -> dict[str, float]:
    """Where the servers' simulated time went between two `sim_clock` snapshots, summed over servers, as shares:
    decode, prefill of new tokens, recompute (prefill of retracted requests coming back), paused (weight updates)
    and idle (nothing to run: the engine did not keep the server fed)."""
    total = _clock_delta(start, end)
    elapsed = max(1e-9, total["elapsed_s"])
    recompute_s = total["prefill_s"] * total["recomputed_tokens"] / max(1, total["prefill_tokens"])
    busy = total["decode_s"] + total["prefill_s"]
    shares = {"decode": total["decode_s"], "prefill": total["prefill_s"] - recompute_s, "recompute": recompute_s,
              "paused": total["paused_s"], "idle": max(0.0, elapsed - busy - total["paused_s"])}
    return {k: round(v / elapsed, 4) for k, v in shares.items()}


def server_tokens(start: list[dict[str, float]], end: list[dict[str, float]], *, episodes: int) -> dict[str, float]:
    """Tokens the servers decoded, prefilled and recomputed per trained episode between two `sim_clock` snapshots
    (what the bound's per-episode shape assumed, measured on the servers' side)."""
    total = _clock_delta(start, end)
    keys = {"output": "output_tokens", "prefill": "prefill_tokens", "recomputed": "recomputed_tokens"}
    return {name: round(total[k] / max(1, episodes), 1) for name, k in keys.items()}


async def run_schedule(profile: Any, urls: list[str], spec: RunSpec, *, seed: int = 1, timeout_s: float = 600.0,
                       index_dir: Path | None = None) -> dict[str, Any]:
    """Play `spec` with the real engine against `urls` and a SimLearner; return rates, occupancy and the bound.
    `index_dir`: the Tantivy index searched (default: the demo index)."""
    from bench.sim_learner import SimClock, SimLearner, push_s, steady_rate
    from engine.assemble import build_scheduler, open_engine, pool_summary
    from engine.scheduler import Scheduler
    from engine.stream import TrajectoryStream
    from engine.telemetry import Samples
    from learner.push import pause_mode
    from ssp.config import load_config
    from ssp.run_config import SSPConfig

    url_list = ",".join(f'"{u}"' for u in urls)
    cfg = load_config(SSPConfig, None, [
        f"inference.server_urls=[{url_list}]",
        f"inference.capacity_per_server={spec.capacity}",
        f'scheduler.mode="{spec.mode}"',
        f"scheduler.eta={spec.eta}",
        f"scheduler.episodes_per_step={spec.episodes_per_step}",
        f"scheduler.max_inflight={(spec.eta + 1) * spec.episodes_per_step}",
        f"scheduler.seed={seed}",
        "scheduler.metrics_interval_s=3600",
        "stream.queue_groups=100000",
        # Hundreds of rollouts open their connections at once (a sync phase starts every episode together).
        "inference.connect_timeout_s=60",
        *([f'retriever.index_dir="{index_dir}"'] if index_dir is not None else []),
    ])
    clock = SimClock(spec.time_scale)
    tally = ShapeTally(profile.sim.prefix_block_tokens)
    occupancy = Samples()
    async with open_engine(cfg) as parts:
        pool = parts.pool
        _check(await pool.update_weight_version("0"), "update_weight_version")
        await pool.flush_cache()

        async def push(version: int) -> None:
            """The learner's push sequence (learner.push.WeightPusher) with the sim's modeled update."""
            mode = pause_mode(version, spec.kv_refresh_every)
            _check(await pool.pause(mode), "pause_generation")
            _check(await pool.update_weights_from_disk("sim", weight_version=str(version),
                                                       flush_cache=mode == "retract"), "update_weights_from_disk")
            if mode == "in_place":
                await pool.flush_cache()  # refused by a server that holds requests, as in the learner
            _check(await pool.continue_(), "continue_generation")

        sched_holder: list[Scheduler] = []

        async def on_version(version: int) -> None:
            await sched_holder[0].set_policy_version(version)

        learner = SimLearner(profile, gpus=spec.learn_gpus, episodes_per_step=spec.episodes_per_step,
                             clock=clock, push=push, on_version=on_version, on_group=tally.add)
        stream = TrajectoryStream(learner, max_frame_bytes=cfg.stream.max_frame_bytes,
                                  queue_groups=cfg.stream.queue_groups,
                                  spill_path=artifacts_dir() / "bench" / "async_vs_sync.spill")
        sched = build_scheduler(cfg, parts, stream)
        sched_holder.append(sched)
        engine_task = asyncio.create_task(sched.run(None), name="bench-engine")

        async def sim_states() -> list[dict[str, Any]]:
            """Each simulated server's /server_info internal state (sim_clock, sim_behind_s)."""
            return [i["internal_states"][0] for i in (await pool.server_infos()).values()]

        async def sim_clocks() -> list[dict[str, float]]:
            return [state["sim_clock"] for state in await sim_states()]

        window_clocks: list[list[dict[str, float]]] = []

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.05)
                if len(learner.steps) >= spec.warmup:
                    if not window_clocks:
                        window_clocks.append(await sim_clocks())
                    occupancy.add(pool_summary(pool)["slot_occupancy"])

        behind = Samples()

        async def watch_clocks() -> None:
            """How far the simulated servers fall behind their clock (a host too slow for the time scale)."""
            while True:
                await asyncio.sleep(1.0)
                behind.add(max(float(state.get("sim_behind_s", 0.0)) for state in await sim_states()))

        sampler = asyncio.create_task(sample(), name="occupancy-sampler")
        clocks = asyncio.create_task(watch_clocks(), name="sim-clock-watch")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        learn = asyncio.create_task(learner.run(spec.steps, max_staleness=spec.eta), name="sim-learner")
        try:
            done, _ = await asyncio.wait({learn, engine_task}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if engine_task in done:
                engine_task.result()
                raise RuntimeError("the engine stopped before the learner finished its steps")
            if learn not in done:
                raise TimeoutError(f"{spec.mode} g={spec.serve_gpus} eta={spec.eta}: the learner finished "
                                   f"{len(learner.steps)} of {spec.steps} steps in {timeout_s:.0f} s of wall "
                                   "time; raise --run-timeout or lower --steps/--episodes-per-step")
            steps = learn.result()
            window_clocks.append(await sim_clocks())
        finally:
            engine_cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
            for task in (learn, sampler, clocks, engine_task):
                task.cancel()
            await asyncio.gather(learn, sampler, clocks, engine_task, return_exceptions=True)
        summary = sched.summary()
    rate = steady_rate(steps, spec.warmup)
    window = steps[spec.warmup:]
    shape = tally.per_episode()
    # Per-episode figures over the window the rate is measured in: the learner's step time follows its tokens.
    # Over trained groups: a group dropped as too stale is work lost, which the bound must not absorb.
    trained_groups = max(1, sum(s.groups - s.dropped_groups for s in window))
    traj_per_episode = sum(s.trajectories for s in window) / trained_groups
    tokens_per_episode = sum(s.tokens for s in window) / trained_groups
    out: dict[str, Any] = {
        **dataclasses.asdict(spec),
        "trained_trajectories_per_s": round(rate, 4),
        "slot_occupancy_mean": round(occupancy.mean(), 4),
        "sim_seconds": round(steps[-1].ended_at, 2),
        "wall_seconds": round(wall_s, 2),
        "engine_cpu_fraction": round(engine_cpu_s / max(1e-9, wall_s), 3),
        "servers_behind_max_s": round(behind.max, 2) if behind.count else 0.0,
        "learner_wait_share": round(sum(s.wait_s for s in window) /
                                    max(1e-9, window[-1].ended_at - (steps[spec.warmup - 1].ended_at
                                                                     if spec.warmup else 0.0)), 4),
        "train_s_mean": round(sum(s.train_s for s in window) / len(window), 3),
        "push_s_mean": round(sum(s.push_s for s in window) / len(window), 3),
        "trajectories_per_episode": round(traj_per_episode, 3),
        "staleness_max": max((s.staleness_max for s in steps if s.staleness_max is not None), default=None),
        "stale_dropped_share": round(sum(s.dropped_groups for s in window) / max(1, sum(s.groups for s in window)),
                                     4),
        "trained_tokens_per_episode": round(tokens_per_episode, 1),
        "server_shape_per_episode": {k: round(v, 1) for k, v in shape.items()},
        "server_time_shares": server_time_shares(*window_clocks) if len(window_clocks) == 2 else {},
        "server_tokens_per_episode": (server_tokens(*window_clocks, episodes=sum(s.groups for s in window))
                                      if len(window_clocks) == 2 else {}),
        "episodes_failed": summary["episodes_failed"],
        "turn_overhead_p99_ms": summary["turn_overhead_p99_ms"],
        "loop_lag_p99_ms": summary["loop_lag_p99_ms"],
        "steps": [dataclasses.asdict(s) for s in steps],
    }
    if spec.mode == "async":
        server_s = server_seconds_per_episode(profile, shape, spec.capacity)
        server_cap = spec.serve_gpus / server_s * traj_per_episode
        learner_cap = (spec.episodes_per_step * traj_per_episode /
                       (learner.step_s(int(tokens_per_episode * spec.episodes_per_step)) + push_s(profile)))
        bound = min(server_cap, learner_cap)
        out.update(server_capacity_traj_per_s=round(server_cap, 4), learner_rate_traj_per_s=round(learner_cap, 4),
                   bound_traj_per_s=round(bound, 4), bound_by="servers" if server_cap < learner_cap else "learner",
                   efficiency=round(rate / bound, 4))
    return out


CLOCK_SLIP_LIMIT = 0.05
"""Largest share of a run's wall time the simulated servers may fall behind their clock for its rates to count."""


def clock_kept(run: dict[str, Any]) -> bool:
    """Whether the simulated servers kept their clock during `run` (see CLOCK_SLIP_LIMIT)."""
    return run.get("servers_behind_max_s", 0.0) <= CLOCK_SLIP_LIMIT * run["wall_seconds"]


def _check(results: dict[str, Any], what: str) -> None:
    bad = [f"{url}: {r.message}" for url, r in results.items() if not r.success]
    if bad:
        raise RuntimeError(f"{what} failed: " + "; ".join(bad))


# ---------------------------------------------------------------- the bench


def bench_profile(profile_path: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """sync on G, async over the splits at the largest eta, then the etas at the best split; one profile."""
    import uvloop

    from serving.sim_profile import load_profile

    profile = load_profile(profile_path)
    per_server = profile.profile.gpus_per_server
    gpus = args.gpus
    if gpus % per_server:
        raise ValueError(f"--gpus {gpus}: must be a multiple of the profile's gpus_per_server = {per_server}")
    bad = [g for g in args.splits if g % per_server or not per_server <= g < gpus]
    if bad:
        raise ValueError(f"--splits {bad}: serving GPUs must be multiples of {per_server} in [{per_server}, "
                         f"{gpus - 1}] so the learner keeps at least one GPU")
    if args.kv_refresh_every < 1:
        raise ValueError(f"--kv-refresh-every {args.kv_refresh_every}: must be >= 1 (1 = retract and flush on every "
                         "push)")

    sync_scale = args.sync_time_scale

    def spec(mode: str, serve: int, eta: int) -> RunSpec:
        return RunSpec(mode=mode, serve_gpus=serve, learn_gpus=gpus if mode == "sync" else gpus - serve, eta=eta,
                       episodes_per_step=args.episodes_per_step, steps=args.steps, warmup=args.warmup,
                       capacity=args.capacity, time_scale=sync_scale if mode == "sync" else args.time_scale,
                       kv_refresh_every=args.kv_refresh_every)

    runs: list[dict[str, Any]] = []

    def play(s: RunSpec, servers: SimServers) -> dict[str, Any]:
        urls = servers.urls[: s.serve_gpus // per_server]
        label = f"{s.mode} serve={s.serve_gpus} learn={s.learn_gpus} eta={s.eta} x{s.time_scale}"
        print(f"  [{profile.profile.name}] {label} ...", flush=True)
        r = uvloop.run(run_schedule(profile, urls, s, timeout_s=args.run_timeout, index_dir=args.index))
        eff = f", {100 * r['efficiency']:.0f}% of bound ({r['bound_by']})" if "efficiency" in r else ""
        print(f"    {r['trained_trajectories_per_s']:.3f} trained traj/s, occupancy {r['slot_occupancy_mean']:.2f}"
              f"{eff}; engine CPU {100 * r['engine_cpu_fraction']:.0f}%, {r['wall_seconds']:.0f} s wall; staleness "
              f"max {r['staleness_max']}, {100 * r['stale_dropped_share']:.1f}% of groups dropped as too stale",
              flush=True)
        if r["server_time_shares"]:
            print("    server time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["server_time_shares"].items()),
                  flush=True)
        if not clock_kept(r):
            print(f"    WARNING: the simulated servers fell up to {r['servers_behind_max_s']} s behind their clock in "
                  f"{r['wall_seconds']:.0f} s: this host is too slow for time scale {s.time_scale}, so this run's "
                  "rates are too low; rerun with a lower --time-scale", flush=True)
        runs.append(r)
        return r

    logs = log_dir / profile.profile.name
    servers = SimServers(gpus // per_server, profile_path, sync_scale, logs / "sync")
    try:
        sync = play(spec("sync", gpus, 0), servers)
    finally:
        servers.stop()
    servers = SimServers(max(args.splits) // per_server, profile_path, args.time_scale, logs / "async")
    try:
        top_eta = max(args.etas)
        sweep = [play(spec("async", g, top_eta), servers) for g in args.splits]
        best = max(sweep, key=lambda r: r["trained_trajectories_per_s"])
        etas = []
        for eta in sorted(set(args.etas) - {top_eta}):
            try:
                etas.append(play(spec("async", best["serve_gpus"], eta), servers))
            except TimeoutError as e:  # a small eta can take very long per step; the rest of the curve stands
                print(f"    {e}", flush=True)
    finally:
        servers.stop()
    ratio = best["trained_trajectories_per_s"] / max(1e-9, sync["trained_trajectories_per_s"])
    return {"profile": profile.profile.name, "gpus": gpus, "sync": sync, "async_sweep": sweep,
            "async_etas": sorted([*etas, best], key=lambda r: r["eta"]), "best": best,
            "async_over_sync": round(ratio, 3)}


def run(args: argparse.Namespace) -> int:
    out_json = args.out or artifacts_dir() / "bench" / "async_vs_sync.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if args.index is None and not default_index_dir().exists():
        print(f"the demo index {default_index_dir()} is missing; build it with `ssp index build --corpus "
              "data/corpus/*.jsonl --out artifacts/index/demo`", file=sys.stderr)
        return 2
    try:
        paths = [resolve_profile(p) for p in args.profile]
    except ValueError as e:
        print(f"ssp bench async-vs-sync: {e}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                        if k not in ("run", "func")}, "profiles": []}
    for path in paths:
        print(f"profile {path.stem}: G = {args.gpus}, time scale {args.time_scale}, "
              f"{args.episodes_per_step} episodes per step, {args.steps} steps ({args.warmup} warm-up)", flush=True)
        results["profiles"].append(bench_profile(path, args, out_json.parent / "logs"))
    out_json.write_text(json.dumps(results, indent=2, default=str))
    report = markdown(results)
    out_json.with_suffix(".md").write_text(report)
    print(report)
    ok = True
    for p in results["profiles"]:
        print(f"async/sync ratio: {p['async_over_sync']:.2f} ({p['profile']}, G = {p['gpus']}, best split "
              f"g = {p['best']['serve_gpus']}, eta = {p['best']['eta']}; efficiency vs bound "
              f"{100 * p['best']['efficiency']:.0f}%)")
        kept = clock_kept(p["best"]) and clock_kept(p["sync"])
        if not kept:
            print("  not a valid measurement: the simulated servers did not keep their clock (see the warnings); "
                  "lower --time-scale")
        ok = ok and kept and p["async_over_sync"] >= 2.5 and p["best"]["efficiency"] >= 0.9
    print("PASS" if ok else "FAIL", ": goal async/sync >= 2.5 and >= 90% of the async bound, with the simulated "
          "servers on their clock")
    return 0 if ok else 1


def markdown(results: dict[str, Any]) -> str:
    """The tables of one async-vs-sync result (also embedded in REPORT.md)."""
    lines = ["## Async vs sync at equal hardware", ""]
    a = results["args"]
    lines.append(f"Real engine against `--sim` servers and a simulated learner; time scale {a['time_scale']} "
                 f"(sync: {a.get('sync_time_scale') or a['time_scale']}), "
                 f"{a['episodes_per_step']} episodes per learner step, {a['steps']} steps ({a['warmup']} warm-up), "
                 f"{a['capacity']} slots per server. Rates are trained (proposer + solver) trajectories per "
                 "simulated second.")
    for p in results["profiles"]:
        lines += ["", f"### {p['profile']}, G = {p['gpus']}", "",
                  "| mode | serve GPUs | learn GPUs | eta | trained traj/s | slot occupancy | bound traj/s | "
                  "bound by | "
                  "efficiency | learner idle | engine CPU | servers behind, s | staleness max | dropped stale | "
                  "server time: decode / prefill / recompute / paused / idle |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [p["sync"], *p["async_sweep"], *[r for r in p["async_etas"] if r is not p["best"]
                                                and r not in p["async_sweep"]]]
        for r in rows:
            lines.append(
                f"| {r['mode']} | {r['serve_gpus']} | {r['learn_gpus']} | {r['eta']} | "
                f"{r['trained_trajectories_per_s']:.3f} | {r['slot_occupancy_mean']:.2f} | "
                f"{r.get('bound_traj_per_s', '-')} | {r.get('bound_by', '-')} | "
                f"{(str(round(100 * r['efficiency'])) + '%') if 'efficiency' in r else '-'} | "
                f"{100 * r['learner_wait_share']:.0f}% | {100 * r['engine_cpu_fraction']:.0f}% | "
                f"{r.get('servers_behind_max_s', 0.0)}{'' if clock_kept(r) else ' (too slow)'} | "
                f"{r.get('staleness_max', '-')} | {100 * r.get('stale_dropped_share', 0.0):.1f}% | "
                f"{' / '.join(f'{100 * v:.0f}%' for v in r.get('server_time_shares', {}).values()) or '-'} |")
        b = p["best"]
        lines += ["", f"async/sync ratio: {p['async_over_sync']:.2f} (best split g = {b['serve_gpus']}, "
                      f"eta = {b['eta']}, {100 * b['efficiency']:.0f}% of its bound)"]
    return "\n".join(lines) + "\n"
