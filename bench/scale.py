"""`ssp bench scale`: one engine process at 1k, 5k and 10k concurrent rollouts against a simulated server.

Each size is one run of `ssp bench engine --rollouts N --compare-episodes 0` (helper bench of the engine: per-turn
overhead p50/p99, event-loop lag, slot occupancy, rollouts in flight), in its own process so that its memory can be
read from outside: this bench samples the engine process's resident set (/proc/PID/status VmRSS) while it runs.
Memory per rollout is the slope of peak RSS against rollouts in flight between the smallest and largest size (the
fixed cost of the process, its imports and index, cancels out). Goal: per-turn overhead p99 under 1 ms at the
largest size. Writes artifacts/bench/scale.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir

GOAL_P99_MS = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000],
                   help="episodes in flight per run (default: 1000 5000 10000)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per size (default: 20)")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds of ramp-up per size, not measured (default: 10)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulated seconds per wall second of the sim server (default: 1)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/scale.json)")


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_size(n: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One `ssp bench engine` run at n episodes in flight; its JSON plus the engine's peak RSS."""
    out = out_dir / f"scale-{n}.json"
    cmd = [sys.executable, "-m", "ssp.cli", "bench", "engine", "--rollouts", str(n), "--compare-episodes", "0",
           "--duration", str(args.duration), "--ramp", str(args.ramp), "--time-scale", str(args.time_scale),
           "--out", str(out)]
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _rss_bytes(proc.pid) or 0)
            time.sleep(0.25)
    if not out.is_file():
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode} without a report; see {log}")
    result = json.loads(out.read_text())["scale"]
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    result["engine_exit_code"] = proc.returncode
    return result


def run(args: argparse.Namespace) -> int:
    out_json = args.out or artifacts_dir() / "bench" / "scale.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.sizes))
    if not sizes or sizes[0] < 1:
        print(f"ssp bench scale: --sizes {args.sizes}: give positive episode counts", file=sys.stderr)
        return 2
    rows = []
    for n in sizes:
        print(f"scale: {n} episodes in flight (ramp {args.ramp}s, measured {args.duration}s) ...", flush=True)
        r = run_size(n, args, out_json.parent)
        print(f"  rollouts in flight p50 {r['rollouts_in_flight_p50']}, turn overhead p50/p99 "
              f"{r['turn_overhead_p50_ms']}/{r['turn_overhead_p99_ms']} ms, loop lag p99 {r['loop_lag_p99_ms']} ms, "
              f"peak RSS {r['peak_rss_mb']} MB", flush=True)
        rows.append(r)
    per_rollout_kb = None
    if len(rows) > 1:
        dn = rows[-1]["rollouts_in_flight_p50"] - rows[0]["rollouts_in_flight_p50"]
        if dn > 0:
            per_rollout_kb = round((rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) * 1024 / dn, 1)
    results = {"args": {k: str(v) for k, v in vars(args).items() if k != "run"}, "sizes": rows,
               "memory_per_rollout_kb": per_rollout_kb}
    out_json.write_text(json.dumps(results, indent=2))
    report = markdown(results)
    out_json.with_suffix(".md").write_text(report)
    print(report)
    last = rows[-1]
    ok = last["turn_overhead_p99_ms"] < GOAL_P99_MS
    print("PASS" if ok else "FAIL", f": per-turn overhead p99 {last['turn_overhead_p99_ms']} ms at "
          f"{last['max_inflight']} episodes in flight (goal < {GOAL_P99_MS} ms)")
    return 0 if ok else 1


def markdown(results: dict[str, Any]) -> str:
    lines = ["## Scale: one engine process", "",
             "| episodes in flight | rollouts in flight p50 | turn overhead p50 ms | p99 ms | loop lag p50 ms | "
             "p99 ms | max ms | slot occupancy | episodes/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        lines.append(f"| {r['max_inflight']} | {r['rollouts_in_flight_p50']} | {r['turn_overhead_p50_ms']} | "
                     f"{r['turn_overhead_p99_ms']} | {r['loop_lag_p50_ms']} | {r['loop_lag_p99_ms']} | "
                     f"{r['loop_lag_max_ms']} | {r['slot_occupancy_mean']} | {r['episodes_per_s']} | "
                     f"{r['peak_rss_mb']} |")
    if results["memory_per_rollout_kb"] is not None:
        lines += ["", f"memory per rollout in flight: {results['memory_per_rollout_kb']} KB (slope of peak RSS)"]
    return "\n".join(lines) + "\n"
