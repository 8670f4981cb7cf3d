"""What `ssp bench async-vs-sync` prints and writes: one line per run as it ends, the verdict lines, and the markdown
tables (also embedded in REPORT.md by `ssp bench report`)."""

from __future__ import annotations

from typing import Any

from ssp.bench.async_vs_sync_run import CLOCK_SLIP_LIMIT

EFFICIENCY_FLOOR = 0.9
"""Both compared arms must reach this share of their own bound for their ratio to be a schedule's, not the
harness's."""


DRAINED_LIMIT = 0.05
"""Largest share of a window's trained groups that may come out of the backlog the window began with. A window that
drains more trains work generated before it began, so its rate says more than the schedule sustains (an async run
with eta 4 may hold thousands of delivered, untrained groups; a one-period window can then pass 100% of its bound)."""


def drained_share(run: dict[str, Any]) -> float:
    """Net groups the window took from the backlog it began with, as a share of the groups it trained."""
    backlog = run["backlog_groups"]
    return max(0, backlog["window_start"] - backlog["window_end"]) / max(1, run["trained_groups"])


def problems(run: dict[str, Any]) -> list[str]:
    """Why the run's rate does not measure its schedule ([] when it does): servers off their clock in a phase, below
    EFFICIENCY_FLOOR of its bound, or a window that drained its starting backlog."""
    out = []
    if not run["clock"]["kept"]:
        out.append("servers off their clock")
    if run["efficiency"] < EFFICIENCY_FLOOR:
        out.append(f"{100 * run['efficiency']:.0f}% of its bound, below {100 * EFFICIENCY_FLOOR:.0f}%")
    drained = drained_share(run)
    if drained > DRAINED_LIMIT:
        out.append(f"its window drained {100 * drained:.0f}% of what it trained from the backlog it began "
                   f"with (limit {100 * DRAINED_LIMIT:.0f}%: more --steps)")
    return out


def valid(run: dict[str, Any]) -> bool:
    """The run's rate measures its schedule (see `problems`)."""
    return not problems(run)


def _caveat(run: dict[str, Any]) -> str:
    """What a verdict line adds to a run whose rate is not a measurement of its schedule ('' when it is)."""
    found = problems(run)
    return f" (NOT VALID: {'; '.join(found)})" if found else ""


def run_line(r: dict[str, Any]) -> str:
    c, drained = r["clock"], drained_share(r)
    lines = [f"    {r['trained_trajectories_per_s']:.3f} trained traj/s = {100 * r['efficiency']:.0f}% of its bound "
             f"{r['bound_traj_per_s']:.3f}; step {r['step_s_mean']:.1f} s (bound {r['bound_step_s']:.1f} s); "
             f"{r['trajectories_per_episode']:.2f} traj/episode; backlog {r['backlog_groups']['window_start']} -> "
             f"{r['backlog_groups']['window_end']} groups; {r['wall_seconds']:.0f} s wall, engine CPU "
             f"{100 * r['engine_cpu_fraction']:.0f}%"
             + ("" if drained <= DRAINED_LIMIT else
                f" - DRAINED: {100 * drained:.0f}% of the window's groups came from the backlog it began "
                "with, so the rate counts earlier work (more --steps)"),
             f"    clock: worst phase {c['worst_phase']} {100 * c['worst_share']:.2f}% behind "
             f"({c['worst_behind_s']} s in {c['worst_wall_s']} s wall; limit {100 * CLOCK_SLIP_LIMIT:.0f}%)"
             + ("" if c["kept"] else " - NOT KEPT: the host did not run the servers on time (a lower "
                                    "--time-scale or fewer servers gives it more room)"),
             "    server time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["server_time_shares"].items())]
    if "deadline_rate_traj_per_s" in r:
        lines.append(f"    bound by {r['bound_by']}: best load {r['load_requests_per_server']} of "
                     f"{r['server_batch_cap']} requests per server (servers and deadlines there "
                     f"{r['load_rate_traj_per_s']:.3f}; servers at full load {r['server_rate_traj_per_s']:.3f}, "
                     f"deadlines at the best load {r['deadline_rate_traj_per_s']:.3f}, learner "
                     f"{r['learner_rate_traj_per_s']:.3f} traj/s)")
    if r["phase_s_mean"]:
        bound = r["bound_parts_s"]
        lines.append("    phases, measured / bound s: " + ", ".join(
            f"{k} {v:.1f} / {bound.get(k, 0.0):.1f}" for k, v in r["phase_s_mean"].items() if k in bound)
            + f"; train {r['train_s_mean']:.1f}, push {r['push_s_mean']:.2f} / {bound['push']:.2f}")
    return "\n".join(lines)


def verdict_lines(p: dict[str, Any]) -> list[str]:
    """The lines the goal is judged by: both sync variants, async in place and flushing, and the ratio (only when
    the compared runs are valid measurements)."""
    sync, lock, best, flush = p["sync"], p["lockstep"], p["async"], p.get("async_flush")
    better = p["better_sync"]
    out = [f"sync (phase barriers): {sync['trained_trajectories_per_s']:.3f} traj/s, {100 * sync['efficiency']:.0f}% "
           f"of bound{_caveat(sync)}; lock-step (eta 0, no barriers): {lock['trained_trajectories_per_s']:.3f} "
           f"traj/s, {100 * lock['efficiency']:.0f}% of bound{_caveat(lock)}",
           f"async g = {best['serve_gpus']}, eta = {best['eta']}: {best['trained_trajectories_per_s']:.3f} traj/s, "
           f"{100 * best['efficiency']:.0f}% of bound ({best['bound_by']}){_caveat(best)}"]
    if flush is not None:
        out.append(f"in-place update gain: {p['in_place_gain']:.3f}x (in place {best['trained_trajectories_per_s']:.3f}"
                   f" vs flush every push {flush['trained_trajectories_per_s']:.3f} traj/s, "
                   f"{100 * flush['efficiency']:.0f}% of bound)")
    if p["valid"]:
        out.append(f"async/sync ratio: {p['async_over_sync']:.2f} ({p['profile']}, G = {p['gpus']}, against "
                   f"{better['arm']}; time scale {best['time_scale']:g})")
    else:
        bad = [f"{r['arm']} ({'; '.join(problems(r))})" for r in (best, better) if not valid(r)]
        out.append(f"async/sync ratio: not printed: {', '.join(bad)}; the figures would measure the harness")
    return out


def markdown(results: dict[str, Any]) -> str:
    """The tables of one async-vs-sync result."""
    a = results["args"]
    lines = ["## Async vs sync at equal hardware", "",
             f"Real engine against `--sim` servers and a simulated learner, every arm at time scale {a['time_scale']}; "
             f"{a['episodes_per_step']} episodes per learner step, {a['steps']} steps measured after {a['warmup']} "
             "of warm-up (async: + eta), "
             f"{a['capacity']} slots per server. Rates are trained (proposer + solver) trajectories per simulated "
             f"second. A ratio is printed only when both compared arms reach {100 * EFFICIENCY_FLOOR:.0f}% of their "
             f"own bound with every server within {100 * CLOCK_SLIP_LIMIT:.0f}% of its clock in every phase."]
    for p in results["profiles"]:
        lines += ["", f"### {p['profile']}, G = {p['gpus']}", "",
                  "| arm | serve GPUs | learn GPUs | eta | flush every | traj/s | bound | efficiency | step s (bound) "
                  "| traj/episode | backlog start -> end | clock worst | learner idle | staleness max | server time: "
                  "decode / prefill / recompute / paused / idle |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in p["runs"]:
            c = r["clock"]
            lines.append(
                f"| {r['arm']} | {r['serve_gpus']} | {r['learn_gpus']} | {r['eta']} | {r['kv_refresh_every']} | "
                f"{r['trained_trajectories_per_s']:.3f} | {r['bound_traj_per_s']:.3f} "
                f"({r.get('bound_by', 'phases')}) | {100 * r['efficiency']:.0f}% | {r['step_s_mean']:.1f} "
                f"({r['bound_step_s']:.1f}) | {r['trajectories_per_episode']:.2f} | "
                f"{r['backlog_groups']['window_start']} -> {r['backlog_groups']['window_end']} | "
                f"{100 * c['worst_share']:.2f}%{'' if c['kept'] else ' (not kept)'} | "
                f"{100 * r['learner_wait_share']:.0f}% | {r['staleness_max']} | "
                f"{' / '.join(f'{100 * v:.0f}%' for v in r['server_time_shares'].values())} |")
        lines += ["", *verdict_lines(p)]
    return "\n".join(lines) + "\n"
