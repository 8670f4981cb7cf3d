"""`ssp bench async-vs-sync`: trained trajectories/s of the async (disaggregated, streaming) schedule against the
two on-policy schedules on the same G GPUs of a profile, every arm at one time scale.

The engine is the real one, in this process (scheduler, rollout loop, search batcher over the real Tantivy demo
index, SSP game, trajectory stream); the GPU servers are `ssp model serve --sim --sim-profile P` processes; the
learner is `ssp.bench.sim_learner.SimLearner` (the profile's learner step time, pushes through the real pool, which the
sim servers time with the profile's weight-update model). Everything runs on one simulated clock: wall seconds x
--time-scale.

    sync      all G serve, phase by phase (propose, verify, solve), then the learner trains on all G, then the push.
    lockstep  all G serve, eta 0 without phase barriers (each episode propose -> verify -> solve on its own), then
              training on all G, then the push.
    async     g serve, the learner on G - g, staleness bound eta; over the splits g, then at the split with the
              highest bound: the other etas, and the same run flushing the prefix cache on every push (so the gain of
              the in-place update is its own figure).

Each run is judged against its own bound (bench/async_vs_sync_bound.py) and its servers' clock is guarded per phase
(bench/async_vs_sync_run.py). The `async/sync ratio` is printed against the better on-policy arm, and only when both
runs reach 90% of their bound on their clock. Parts: async_vs_sync_run.py (one run), async_vs_sync_bound.py (the
bounds), async_vs_sync_report.py (what is printed). Writes artifacts/bench/async_vs_sync.json (+ .md); `ssp bench
report` turns it into plots and REPORT.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ssp.learner.config import LearnerConfig
from ssp.paths import artifacts_dir, default_index_dir

DEFAULT_PROFILES = ("qwen2.5-7b-h100-tp1",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", nargs="+", default=list(DEFAULT_PROFILES), metavar="NAME_OR_FILE",
                   help="sim profiles (serving/sim_profiles/NAME.toml or a path; default: %(default)s)")
    p.add_argument("--gpus", type=int, default=16, help="G, GPUs every arm gets (default: 16)")
    p.add_argument("--splits", type=int, nargs="+", default=[4],
                   help="serving GPUs g of the async sweep (learner gets G - g; default: 4); with several, the "
                        "comparison uses the split with the highest bound, not the luckiest measurement")
    p.add_argument("--etas", type=int, nargs="+", default=[4],
                   help="staleness bounds of the async arm: the sweep runs the largest, the others run at the chosen "
                        "split (default: 4)")
    p.add_argument("--episodes-per-step", type=int, default=256,
                   help="episodes (groups) the learner trains per step (default: 256, the batch the profiles' learner "
                        "time is for). Async keeps at most (eta + 1) x this many episodes in flight")
    p.add_argument("--steps", type=int, default=3,
                   help="learner steps measured per run (default: 3); async runs measure whole periods of eta + 1 "
                        "steps (at least this many): its staleness gate releases episodes in waves of that period, "
                        "fast invalid episodes first, so a part of a period over- or under-counts")
    p.add_argument("--warmup", type=int, default=1,
                   help="leading steps not measured (default: 1); async runs add eta more, so that the (eta + 1) x "
                        "episodes-per-step episodes launched at once at the start are trained before the window")
    p.add_argument("--capacity", type=int, default=256,
                   help="requests in flight per server (the pool's slots; default: 256)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulated seconds per wall second, for every arm, servers and learner alike (default: 1, "
                        "real time: at 2 the async arm's four busy servers and the engine fell behind their clock by "
                        "up to 2%% of a phase on 2 cores; at 1, phase-barrier sync's 16 servers fall 1-2.4%% behind "
                        "in the verify burst, and keep up at 0.5). The engine's host time counts this many times "
                        "over; each run's per-phase clock guard says whether the host kept up")
    p.add_argument("--kv-refresh-every", type=int, default=LearnerConfig().push_kv_refresh_every,
                   help="async: every this many pushes retract and flush, the others pause in place, as the learner's "
                        "push_kv_refresh_every does (default: the learner's, %(default)s); the chosen split also runs "
                        "with 1 (flush every push)")
    p.add_argument("--run-timeout", type=float, default=1800.0,
                   help="wall seconds one run may take before it is reported as stuck (default: 1800; a sync run of "
                        "4 steps at time scale 1 takes ~9 min)")
    p.add_argument("--index", type=Path, help="Tantivy index searched (default: the demo index, artifacts/index/demo)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/async_vs_sync.json)")


def resolve_profile(name: str) -> Path:
    from ssp.serving.sim_profile import PROFILES_DIR

    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = PROFILES_DIR / f"{name}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
    raise ValueError(f"profile {name!r}: no such file and not a profile name; known profiles: {known}")


def check_arguments(args: argparse.Namespace, per_server: int) -> None:
    gpus = args.gpus
    if gpus % per_server:
        raise ValueError(f"--gpus {gpus}: must be a multiple of the profile's gpus_per_server = {per_server}")
    bad = [g for g in args.splits if g % per_server or not per_server <= g < gpus]
    if bad:
        raise ValueError(f"--splits {bad}: serving GPUs must be multiples of {per_server} in [{per_server}, "
                         f"{gpus - 1}] so the learner keeps at least one GPU")
    if any(eta < 1 for eta in args.etas):
        raise ValueError(f"--etas {args.etas}: async etas must be >= 1 (eta 0 is the lock-step arm, always run)")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps}, --warmup {args.warmup}: need at least one measured step and no "
                         "negative warm-up")
    if args.kv_refresh_every < 1:
        raise ValueError(f"--kv-refresh-every {args.kv_refresh_every}: must be >= 1 (1 = retract and flush on every "
                         "push)")


def bench_profile(profile_path: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Both on-policy arms on G, async over the splits at the largest eta, then at the chosen split the other etas
    and the flush-every-push policy; one profile, one set of servers, one time scale."""
    import uvloop

    from ssp.bench.async_vs_sync_report import run_line, valid
    from ssp.bench.async_vs_sync_run import RunSpec, SimServers, run_schedule
    from ssp.serving.sim_profile import load_profile

    profile = load_profile(profile_path)
    per_server = profile.profile.gpus_per_server
    check_arguments(args, per_server)
    gpus = args.gpus
    runs: list[dict[str, Any]] = []

    def play(servers: SimServers, arm: str, serve: int, eta: int, kv_refresh_every: int) -> dict[str, Any]:
        warmup = args.warmup + eta
        measured = -(-args.steps // (eta + 1)) * (eta + 1)
        spec = RunSpec(arm=arm, serve_gpus=serve, learn_gpus=gpus if arm != "async" else gpus - serve, eta=eta,
                       episodes_per_step=args.episodes_per_step, steps=warmup + measured, warmup=warmup,
                       capacity=args.capacity, time_scale=args.time_scale, kv_refresh_every=kv_refresh_every)
        print(f"  [{profile.profile.name}] {spec.label} ...", flush=True)
        r = uvloop.run(run_schedule(profile, servers.urls[: serve // per_server], spec, timeout_s=args.run_timeout,
                                    index_dir=args.index))
        print(run_line(r), flush=True)
        runs.append(r)
        return r

    servers = SimServers(gpus // per_server, profile_path, args.time_scale, log_dir / profile.profile.name)
    try:
        # Colocated arms push with nothing in flight: they flush on every push (their cache holds old KV).
        sync = play(servers, "sync", gpus, 0, 1)
        lockstep = play(servers, "lockstep", gpus, 0, 1)
        top_eta = max(args.etas)
        sweep = [play(servers, "async", g, top_eta, args.kv_refresh_every) for g in args.splits]
        chosen = max(sweep, key=lambda r: r["bound_traj_per_s"])
        flush = (play(servers, "async", chosen["serve_gpus"], top_eta, 1) if args.kv_refresh_every > 1 else None)
        for eta in sorted(set(args.etas) - {top_eta}):
            try:
                play(servers, "async", chosen["serve_gpus"], eta, args.kv_refresh_every)
            except TimeoutError as e:  # a small eta can take very long per step; the rest stands
                print(f"    {e}", flush=True)
    finally:
        servers.stop()
    better = max(sync, lockstep, key=lambda r: r["trained_trajectories_per_s"])
    out: dict[str, Any] = {
        "profile": profile.profile.name, "gpus": gpus, "runs": runs, "sync": sync, "lockstep": lockstep,
        "async": chosen, "async_flush": flush, "better_sync": better,
        "async_over_sync": round(chosen["trained_trajectories_per_s"] / max(1e-9, better["trained_trajectories_per_s"]),
                                 3),
        "valid": valid(chosen) and valid(better)}
    if flush is not None:
        out["in_place_gain"] = round(chosen["trained_trajectories_per_s"] /
                                     max(1e-9, flush["trained_trajectories_per_s"]), 3)
    return out


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from ssp.bench.async_vs_sync_report import markdown, verdict_lines

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
    started = time.perf_counter()
    for path in paths:
        print(f"profile {path.stem}: G = {args.gpus}, time scale {args.time_scale:g} (every arm), "
              f"{args.episodes_per_step} episodes per step, {args.steps} steps measured after {args.warmup} "
              "(async: + eta) of warm-up", flush=True)
        try:
            results["profiles"].append(bench_profile(path, args, out_json.parent / "logs"))
        except ValueError as e:
            print(f"ssp bench async-vs-sync: {e}", file=sys.stderr)
            return 2
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    out_json.write_text(json.dumps(results, indent=2, default=str))
    report = markdown(results)
    out_json.with_suffix(".md").write_text(report)
    print(report)
    for p in results["profiles"]:
        print("\n".join(verdict_lines(p)))
    ok = all(p["valid"] for p in results["profiles"])
    print(f"{'PASS' if ok else 'FAIL'}: goal: the ratio's two arms (async and the better on-policy arm) each >= 90% "
          f"of its own bound with the servers on their clock, so the ratio measures schedules "
          f"({results['wall_seconds']:.0f} s wall)")
    return 0 if ok else 1
