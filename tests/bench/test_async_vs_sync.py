"""The async-vs-sync harness on a tiny configuration: real engine, two real sim servers, the simulated learner.
Behaviour only (runs, steps, versions, bound bookkeeping); speed is what `ssp bench async-vs-sync` reports."""

import argparse
from pathlib import Path

import pytest

from bench.async_vs_sync import bench_profile, markdown, resolve_profile


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="qwen2.5-7b-h100-tp1"):
        resolve_profile("no-such-profile")


def test_tiny_sweep_runs_both_schedules(demo_index: Path, tmp_path: Path) -> None:
    # Pushes 1 and 2 of each run: one in place, one retract-and-flush.
    args = argparse.Namespace(gpus=2, splits=[1], etas=[1], episodes_per_step=2, steps=2, warmup=1, capacity=16,
                              time_scale=20.0, sync_time_scale=20.0, run_timeout=240.0, kv_refresh_every=2,
                              index=demo_index)
    r = bench_profile(resolve_profile("qwen2.5-7b-h100-tp1"), args, tmp_path)
    sync, best = r["sync"], r["best"]
    assert (sync["mode"], sync["serve_gpus"], sync["learn_gpus"], sync["eta"]) == ("sync", 2, 2, 0)
    assert [(x["mode"], x["serve_gpus"], x["learn_gpus"]) for x in r["async_sweep"]] == [("async", 1, 1)]
    assert [x["eta"] for x in r["async_etas"]] == [1]
    for run in (sync, *r["async_etas"]):
        assert [s["version"] for s in run["steps"]] == [1, 2]
        assert all(s["groups"] == 2 for s in run["steps"])
        assert run["episodes_failed"] == 0
        assert run["trained_trajectories_per_s"] > 0
        # Each step ends with a push through the pool; the sim servers charge the profile's update time.
        assert all(s["push_s"] >= 1.0 for s in run["steps"])
        # The sim servers' /server_info says how far behind their clock they ran (x20 on 2 cores: a little).
        assert 0.0 <= run["servers_behind_max_s"] < run["wall_seconds"]
        # Where the servers' time went in the measured window: shares of it, pushes among them.
        shares = run["server_time_shares"]
        assert set(shares) == {"decode", "prefill", "recompute", "paused", "idle"}
        assert shares["decode"] > 0 and shares["paused"] > 0
        assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)
    # Sync trains only after generation: the learner waited for each step's groups.
    assert all(s["wait_s"] > 0 for s in sync["steps"])
    for run in r["async_etas"]:
        assert run["bound_traj_per_s"] == min(run["server_capacity_traj_per_s"], run["learner_rate_traj_per_s"])
        assert run["efficiency"] == pytest.approx(run["trained_trajectories_per_s"] / run["bound_traj_per_s"],
                                                  abs=2e-3)
    assert r["async_over_sync"] == pytest.approx(best["trained_trajectories_per_s"] /
                                                 sync["trained_trajectories_per_s"], rel=1e-2)
    text = markdown({"args": vars(args), "profiles": [r]})
    assert "async/sync ratio:" in text and "| sync | 2 | 2 | 0 |" in text
