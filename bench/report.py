"""`ssp bench report`: one markdown report (artifacts/bench/REPORT.md) with PNG plots from the JSON/markdown every
bench part left in artifacts/bench/.

Each part writes its own results (`<part>.json`, most also `<part>.md`); this builder only reads them, so any subset
can be re-run and the report rebuilt. A part with no results is listed as "not run" (never invented). The ratio
lines the goals are judged by (`async/sync ratio: X` per profile, push/raw, coalesced/per-query, scale p99) are
repeated in a summary at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir

PARTS = ("async_vs_sync", "scale", "search", "retrieval", "push", "learner", "inference", "serving", "engine")
"""Report order: the schedule question first, then scale, search, weights, learner, and the helper benches."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, help="where the parts' results are (default: artifacts/bench)")
    p.add_argument("--out", type=Path, help="report path (default: <dir>/REPORT.md)")


def _load(d: Path, part: str) -> dict[str, Any] | None:
    path = d / f"{part}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run `ssp bench {part.replace('_', '-')}`") from e
    return data if isinstance(data, dict) else {"results": data}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_async_vs_sync(profile: dict[str, Any], out: Path) -> Path:
    """Left: async (in place, at its largest eta) trained trajectories/s and bound against serving GPUs, with both
    on-policy arms' levels; right: every arm's rate next to its bound."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    top_eta = profile["async"]["eta"]
    sweep = sorted((r for r in profile["runs"] if r["arm"] == "async" and r["eta"] == top_eta
                    and r["kv_refresh_every"] == profile["async"]["kv_refresh_every"]), key=lambda r: r["serve_gpus"])
    xs = [r["serve_gpus"] for r in sweep]
    left.plot(xs, [r["trained_trajectories_per_s"] for r in sweep], marker="o", label=f"async (eta {top_eta})")
    left.plot(xs, [r["bound_traj_per_s"] for r in sweep], linestyle="--", marker=".", label="async bound")
    left.axhline(profile["sync"]["trained_trajectories_per_s"], color="gray", label="sync (phase barriers)")
    left.axhline(profile["lockstep"]["trained_trajectories_per_s"], color="gray", linestyle=":",
                 label="lock-step (eta 0)")
    left.set_xlabel(f"serving GPUs g (learner: {profile['gpus']} - g)")
    left.set_ylabel("trained trajectories / s")
    left.set_title(f"{profile['profile']}, G = {profile['gpus']}", fontsize=9)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    runs = profile["runs"]
    labels = [f"{r['arm']}\n" + (f"g={r['serve_gpus']} eta={r['eta']}\nflush/{r['kv_refresh_every']}"
                                  if r["arm"] == "async" else "all G") for r in runs]
    idx = range(len(runs))
    right.bar([i - 0.2 for i in idx], [r["trained_trajectories_per_s"] for r in runs], width=0.4, label="measured")
    right.bar([i + 0.2 for i in idx], [r["bound_traj_per_s"] for r in runs], width=0.4, color="#bbbbbb",
              label="bound")
    right.set_xticks(list(idx), labels, fontsize=6)
    right.set_ylabel("trained trajectories / s")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_scale(scale: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    rows = scale["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [r["episodes_in_flight"] for r in rows]
    left.plot(xs, [r["turn_overhead_p50_ms"] or float("nan") for r in rows], marker="o", label="turn overhead p50")
    left.plot(xs, [r["turn_overhead_p99_ms"] or float("nan") for r in rows], marker="o", label="turn overhead p99")
    left.plot(xs, [r["turn_cpu_p99_ms"] or float("nan") for r in rows], marker="o", label="turn CPU p99")
    left.plot(xs, [r["loop_lag_p99_ms"] for r in rows], marker="o", label="event-loop lag p99")
    left.plot(xs, [r.get("turn_latency_p99_ms") or float("nan") for r in rows], marker="o",
              label="end-to-end turn p99")
    left.axhline(1.0, color="gray", linestyle=":", label="1 ms goal (turn overhead p99)")
    left.axhline(5.0, color="gray", linestyle="--", label="5 ms goal (loop lag p99)")
    left.set_yscale("log")
    left.set_xlabel("episodes in flight")
    left.set_ylabel("ms")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(xs, [r["memory_per_rollout_kb"] for r in rows], marker="o")
    right.set_xlabel("episodes in flight")
    right.set_ylabel("KB per rollout in flight")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_bars(title: str, labels: list[str], values: list[float], unit: str, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color=["#999999", "#3b75af"][: len(values)])
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build(d: Path, out: Path) -> str:
    """Write the report from the parts found under `d`; returns its text."""
    from ssp.bench import async_vs_sync_report, push, retrieval, scale, search

    found = {part: _load(d, part) for part in PARTS}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = ["# ssp benchmarks", "",
             f"Built {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} ({os.cpu_count()} CPU cores, "
             f"load average now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}). Simulated-GPU parts use the "
             "profiles in serving/sim_profiles; every ratio below was measured side by side "
             "in one run.", "", "## Summary", ""]
    summary: list[str] = []
    body: list[str] = []
    if (r := found["async_vs_sync"]) is not None:
        for p in r["profiles"]:
            a, better = p["async"], p["better_sync"]
            why = "; ".join(f"{r['arm']}: {', '.join(async_vs_sync_report.problems(r))}" for r in (a, better)
                            if not async_vs_sync_report.valid(r))
            ratio = (f"async/sync ratio: {p['async_over_sync']:.2f}" if p["valid"] else
                     f"async/sync ratio: not printed ({p['async_over_sync']:.2f} measured; {why})")
            summary.append(f"- {ratio} ({p['profile']}, G = {p['gpus']}; async g = {a['serve_gpus']}, eta = "
                           f"{a['eta']}, {100 * a['efficiency']:.0f}% of its bound, against {better['arm']} at "
                           f"{100 * better['efficiency']:.0f}% of its bound) - goal: both >= 90%, steady windows")
            png = plot_async_vs_sync(p, d / f"async_vs_sync-{p['profile']}.png")
            body_png = f"![async vs sync {p['profile']}]({png.name})"
            body.append(body_png)
        body.insert(0, async_vs_sync_report.markdown(r))
    if (r := found["scale"]) is not None:
        last = r["sizes"][-1]
        summary.append(f"- scale: at {last['episodes_in_flight']} episodes in flight ({last['rollouts_in_flight_p50']} "
                       f"rollouts), event-loop lag p50/p99 {last['loop_lag_p50_ms']}/{last['loop_lag_p99_ms']} ms - "
                       f"goal <= {scale.GOAL_LOOP_LAG_P99_MS:g} ms; per-turn overhead p99 "
                       f"{last['turn_overhead_p99_ms']} ms wall-clock over {last['turns_measured']} turns (engine CPU "
                       f"per turn p99 {last['turn_cpu_p99_ms']} ms) - goal < {scale.GOAL_P99_MS:g} ms; end-to-end turn "
                       f"p50/p99 {last.get('turn_latency_p50_ms', '-')}/{last.get('turn_latency_p99_ms', '-')} ms "
                       f"(search included, server-slot wait excluded); memory {last['memory_per_rollout_kb']} KB per "
                       "rollout")
        body += ["", scale.markdown(r), f"![scale]({plot_scale(r, d / 'scale.png').name})"]
    if (r := found["search"]) is not None:
        summary.append(f"- search: coalesced/per-query throughput ratio {r['ratio']} (mean batch "
                       f"{r['coalesced']['search_batch_mean']})")
        png = plot_bars("searches/s through the SearchBatcher", ["one call per query", "coalesced"],
                        [r["per_query"]["queries_per_s"], r["coalesced"]["queries_per_s"]], "queries/s",
                        d / "search.png")
        body += ["", search.markdown(r), f"![search]({png.name})"]
    if (r := found["push"]) is not None:
        summary.append(f"- weight push: push/raw bandwidth ratio {r['ratio']} ({r['push_gb_per_s']} vs "
                       f"{r['raw_gb_per_s']} GB/s, {r['bytes'] / 1e6:.0f} MB) - goal >= 0.8")
        png = plot_bars("weight push vs raw broadcast (gloo)", ["raw broadcast", "WeightPusher"],
                        [r["raw_gb_per_s"], r["push_gb_per_s"]], "GB/s", d / "push.png")
        body += ["", push.markdown(r), f"![push]({png.name})"]
    if (r := found["retrieval"]) is not None:
        corpus = ", ".join(Path(c).name for c in r["corpus"])
        summary.append(f"- retrieval: {retrieval.verdict(r)}; corpus {corpus}")
    for part in ("retrieval", "learner", "inference", "serving", "engine"):
        md = d / f"{part}.md"
        if md.is_file():
            # Their headings move one level down, under this report's sections.
            text = md.read_text().replace("\n## ", "\n### ")
            body += ["", "#" + text if text.startswith("# ") else f"## {part}\n\n{text}"]
        elif found[part] is not None:
            body += ["", f"## {part} (`ssp bench {part}`)", "", "```json",
                     json.dumps(found[part], indent=2)[:4000], "```"]
    missing = [p for p in PARTS if found[p] is None and not (d / f"{p}.md").is_file()]
    if missing:
        summary.append(f"- not run (no results in {d}): {', '.join(missing)}")
    text = "\n".join([*lines, *summary, "", *body]) + "\n"
    out.write_text(text)
    return text


def run(args: argparse.Namespace) -> int:
    d = args.dir or artifacts_dir() / "bench"
    if not d.is_dir():
        print(f"ssp bench report: {d} does not exist; run some `ssp bench <part>` first (or `just bench`)")
        return 2
    out = args.out or d / "REPORT.md"
    text = build(d, out)
    print(text.split("\n## ", 2)[1] if "\n## " in text else text)
    print(f"report: {out}")
    return 0
