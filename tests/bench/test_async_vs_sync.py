"""The async-vs-sync harness on a tiny configuration: real engine, two real sim servers, the simulated learner.
Behaviour and bookkeeping (arms, steps, bounds, clock guard, verdict); speed is what `ssp bench async-vs-sync`
reports."""

import argparse
import json
from pathlib import Path

import pytest

from ssp.bench import report
from ssp.bench.async_vs_sync import bench_profile, resolve_profile
from ssp.bench.async_vs_sync_bound import (
    Costs,
    GroupCost,
    async_bound,
    lockstep_step_bound,
    rollout_cost,
    sync_step_bound,
)
from ssp.bench.async_vs_sync_report import markdown, problems, valid, verdict_lines
from ssp.bench.async_vs_sync_run import Reading, clock_guard
from ssp.bench.sim_learner import learner_step_s, push_s
from ssp.engine.trajectory import Trajectory
from ssp.serving.sim_profile import load_profile


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="qwen2.5-7b-h100-tp1"):
        resolve_profile("no-such-profile")


def _traj(role: str, prompt: int, segments: list[tuple[str, int]]) -> Trajectory:
    spans, start = [], 0
    for kind, n in segments:
        spans.append([kind, start, start + n])
        start += n
    mask = [int(kind == "gen") for kind, n in segments for _ in range(n)]
    return Trajectory(role=role, group_id="g", prompt_ids=list(range(1, prompt + 1)), response_ids=[5] * start,
                      loss_mask=mask, rollout_logprobs=[0.0] * start, policy_versions=[0] * start, reward=0.0,
                      meta={"segments": spans})


def test_chain_is_one_rollout_alone_and_work_its_share_of_a_full_batch() -> None:
    p = load_profile()
    costs = Costs.at_capacity(p, 256, 1000.0)
    d, pf = p.decode, p.prefill
    t = _traj("solver", 200, [("gen", 101), ("tool", 400), ("gen", 51)])
    c = rollout_cost(t, costs, prompt_cached=True, block_tokens=64)
    # Each turn's first token comes from the prefill step: 100 + 50 decode steps at batch 1, each at its context.
    step1 = lambda ctx: (d.a_ms + d.b_ms_per_request + d.c_ms_per_kv_token * ctx) / 1000  # noqa: E731
    tool = 400 * (1 + (301 + 200) / pf.attn_ctx_half_tokens) / pf.tokens_per_s
    assert c.chain_s == pytest.approx(100 * step1(200 + 50.5) + tool + 50 * step1(701 + 25.5), rel=1e-9)
    # At full batch the fixed step cost is shared by 256 requests: far cheaper per token than alone.
    assert costs.batch == 256 and c.work_s < 0.3 * c.chain_s


def test_sync_step_is_phase_makespans_plus_train_plus_one_push() -> None:
    p = load_profile()
    a = GroupCost({"propose": 5.0, "verify": 1.0, "solve": 4.0}, {"propose": 8.0, "verify": 2.0, "solve": 40.0}, 5.0,
                  3, 1000)
    b = GroupCost({"propose": 2.0, "verify": 3.0, "solve": 0.0}, {"propose": 8.0, "verify": 2.0, "solve": 0.0}, 1.0,
                  1, 500)
    s = sync_step_bound(p, [a, b], servers=4, gpus=16)
    # propose: chain 5 > work 16/4; verify: chain 3 > 1; solve: work 40/4 = 10 > chain 4.
    assert s.phases_s == {"propose": 5.0, "verify": 3.0, "solve": 10.0}
    assert s.bound_by == {"propose": "chain", "verify": "chain", "solve": "work"}
    # Training on all 16 GPUs over the step's 1500 trained tokens, by the profile's formula alone; the push once.
    assert s.train_s == pytest.approx(learner_step_s(p.learner, flops_per_token=p.model.flops_per_token, tokens=1500,
                                                     gpus=16))
    assert s.push_s == push_s(p) and s.total_s == pytest.approx(18.0 + s.train_s + push_s(p))
    # Lock-step: no barriers, so the longest episode (5 + 1 + 4 = 10 for a; 5 for b) or the work (60 / 4 = 15).
    lk = lockstep_step_bound(p, [a, b], servers=4, gpus=16)
    assert lk.phases_s == {"episodes": 15.0} and lk.train_s == s.train_s


def test_async_bound_prices_the_prefill_the_servers_did_and_one_pause_per_step() -> None:
    p = load_profile()
    costs = Costs.at_capacity(p, 256, mean_context=2000)
    g = GroupCost({"propose": 1.0, "verify": 1.0, "solve": 1.0}, {"propose": 0.2, "verify": 0.1, "solve": 0.3}, 0.1,
                  4, 8000)
    kw = {"costs": costs, "per_step": 8, "serve_servers": 2, "learn_gpus": 12, "eta": 4}
    own = async_bound(p, [g, g], **kw, measured_prefill_s_per_episode=0.05)
    # Measured prefill below the groups' own (cannot happen, but a bound never takes less): 0.6 s per episode.
    assert own["server_s_per_episode"] == pytest.approx(0.6)
    assert own["server_rate_traj_per_s"] == pytest.approx(8 * 4 / (8 * 0.6 / 2 + push_s(p)))
    # Cache misses and recompute cost the servers 0.3 s more per episode: the server rate falls with them.
    more = async_bound(p, [g, g], **kw, measured_prefill_s_per_episode=0.4)
    assert more["server_s_per_episode"] == pytest.approx(0.9)
    assert more["prefill_beyond_own_s_per_episode"] == pytest.approx(0.3)
    assert more["learner_rate_traj_per_s"] == own["learner_rate_traj_per_s"]
    # No start versions known: no deadline, the servers run full.
    assert more["load_requests_per_server"] == costs.batch
    assert more["bound_traj_per_s"] == min(more["server_rate_traj_per_s"], more["learner_rate_traj_per_s"])


def _episode(start: int, path_steps: int) -> GroupCost:
    return GroupCost({"propose": 1.0, "verify": 0.0, "solve": 0.0}, {"propose": 0.5, "verify": 0.0, "solve": 0.0},
                     0.0, 6, 6000, decode_steps=2000, path_steps=path_steps, start_version=start)


def test_async_bound_waits_for_the_longest_episode_of_each_start_version_by_its_deadline() -> None:
    p = load_profile()
    costs = Costs.at_capacity(p, 256, mean_context=3000)
    # Two start versions; in each one episode runs a long path (a runaway turn of 8,000 decode steps).
    groups = [_episode(0, 300), _episode(0, 8000), _episode(1, 300), _episode(1, 6000)]
    kw = {"costs": costs, "per_step": 256, "serve_servers": 4, "learn_gpus": 12,
          "measured_prefill_s_per_episode": 0.0}
    tight = async_bound(p, groups, **kw, eta=1)
    train = learner_step_s(p.learner, flops_per_token=p.model.flops_per_token, tokens=6000 * 256, gpus=12)

    def rates(load: int) -> tuple[float, float]:
        # At `load` requests per server: each of the 2,000 decode steps per episode carries a/load of a step's fixed
        # cost (0.5 s of work was priced at the full batch); eta + 1 = 2 steps span the mean over start versions of
        # the longest path at that load, training and a push.
        work = 0.5 + 2000 * (costs.fixed_share_s(load) - costs.fixed_share_s(costs.batch))
        span = (8000 + 6000) / 2 * costs.step_s(load) + train + push_s(p)
        return 256 * 6 / (256 * work / 4 + push_s(p)), 256 * 6 * 2 / span

    load = tight["load_requests_per_server"]
    server, deadline = rates(load)
    assert tight["deadline_rate_traj_per_s"] == pytest.approx(deadline)
    # The deadline makes the best load a partial one: a full server would run the runaways too slowly; a lighter
    # load decodes them faster but serves less: the chosen load is the best of every load.
    assert tight["bound_by"] == "deadline" and load < costs.batch
    assert tight["bound_traj_per_s"] == pytest.approx(min(server, deadline))
    assert all(min(*rates(k)) <= min(server, deadline) + 1e-9 for k in range(1, costs.batch + 1))
    assert tight["bound_traj_per_s"] < tight["server_rate_traj_per_s"]
    # With slack to spare (a large eta) the deadline does not bind: the servers run full.
    loose = async_bound(p, groups, **kw, eta=50)
    assert loose["load_requests_per_server"] == costs.batch and loose["bound_by"] in ("servers", "learner")
    assert loose["bound_traj_per_s"] == pytest.approx(min(loose["server_rate_traj_per_s"],
                                                          loose["learner_rate_traj_per_s"]))


def test_the_deadline_path_waits_for_the_prefill_of_the_other_requests_on_its_server() -> None:
    # The async arm at the defaults (2026-12-03): servers 31% prefilling, and the longest episodes ran ~35% longer
    # than their decode steps alone at the load the servers held. Here 0.2 s of prefill per episode over its 2,000
    # decode steps: each step of a runaway's path at load n also carries (n - 1) x 1e-4 s of the others' prefill.
    p = load_profile()
    costs = Costs.at_capacity(p, 256, mean_context=3000)
    groups = [_episode(0, 300), _episode(0, 8000), _episode(1, 300), _episode(1, 6000)]
    kw = {"costs": costs, "per_step": 256, "serve_servers": 4, "learn_gpus": 12, "eta": 1}
    b = async_bound(p, groups, **kw, measured_prefill_s_per_episode=0.2)
    train = learner_step_s(p.learner, flops_per_token=p.model.flops_per_token, tokens=6000 * 256, gpus=12)
    load = b["load_requests_per_server"]
    span = (8000 + 6000) / 2 * (costs.step_s(load) + (load - 1) * 0.2 / 2000) + train + push_s(p)
    assert b["bound_by"] == "deadline" and b["deadline_rate_traj_per_s"] == pytest.approx(256 * 6 * 2 / span)
    # Without the interleaved prefill the same runaways would look faster and the bound higher.
    assert b["bound_traj_per_s"] < async_bound(p, groups, **kw, measured_prefill_s_per_episode=0.0)[
        "bound_traj_per_s"] * 0.95


def _reading(label: str, wall: float, behind: list[float]) -> Reading:
    return Reading(label, sim_s=2 * wall, wall_s=wall, clocks=[{"behind_s": b} for b in behind])


def test_clock_guard_judges_each_interval_on_the_worst_server() -> None:
    # 10 ms behind over a 2 s interval (0.5%) is kept; 30 ms over the next 1 s interval (3%) is not.
    ok = clock_guard([_reading("propose", 0.0, [0.0, 0.0]), _reading("verify", 2.0, [0.01, 0.002])])
    assert ok["kept"] and ok["worst_share"] == pytest.approx(0.005)
    bad = clock_guard([_reading("propose", 0.0, [0.0, 0.0]), _reading("verify", 2.0, [0.01, 0.0]),
                       _reading("solve", 3.0, [0.01, 0.03])])
    assert not bad["kept"] and bad["worst_phase"] == "verify" and bad["worst_share"] == pytest.approx(0.03)
    # A reading 10 ms after the last (a step's end, then the next phase) is not an interval of its own: 5 ms of
    # jitter in it is judged over the 1.5 s that follow.
    short = clock_guard([_reading("step 1", 0.0, [0.0]), _reading("propose", 0.01, [0.005]),
                         _reading("verify", 1.5, [0.006])])
    assert short["kept"] and short["intervals"] == 1 and short["worst_share"] == pytest.approx(0.004)


def test_a_window_that_drains_its_starting_backlog_does_not_count() -> None:
    # The quick run of 2026-12-02: 5 measured steps of 64 groups, the backlog 128 -> 60, "122% of its bound".
    run = {"clock": {"kept": True}, "efficiency": 1.22, "trained_groups": 320,
           "backlog_groups": {"window_start": 128, "window_end": 60}}
    assert not valid(run) and problems(run) == [
        "its window drained 21% of what it trained from the backlog it began with (limit 5%: more --steps)"]
    # A backlog that holds (or grows) is a steady window; a few groups either way are noise.
    for end in (128, 1500, 116):
        assert valid({**run, "efficiency": 0.95, "backlog_groups": {"window_start": 128, "window_end": end}})
    assert problems({**run, "efficiency": 0.8, "clock": {"kept": False}, "backlog_groups": {
        "window_start": 128, "window_end": 128}}) == ["servers off their clock", "80% of its bound, below 90%"]


def test_tiny_bench_runs_every_arm(demo_index: Path, tmp_path: Path) -> None:
    # Pushes of the in-place async run alternate: in place, retract-and-flush, ...
    args = argparse.Namespace(gpus=2, splits=[1], etas=[1], episodes_per_step=2, steps=2, warmup=1, capacity=16,
                              time_scale=20.0, run_timeout=240.0, kv_refresh_every=2, index=demo_index)
    r = bench_profile(resolve_profile("qwen2.5-7b-h100-tp1"), args, tmp_path)
    arms = [(x["arm"], x["serve_gpus"], x["learn_gpus"], x["eta"], x["kv_refresh_every"]) for x in r["runs"]]
    assert arms == [("sync", 2, 2, 0, 1), ("lockstep", 2, 2, 0, 1), ("async", 1, 1, 1, 2), ("async", 1, 1, 1, 1)]
    for run in r["runs"]:
        # Two measured steps after one of warm-up; async (eta 1) warms up eta more steps (its first burst is trained
        # first) and measures whole periods of eta + 1 = 2 steps.
        assert [s["version"] for s in run["step_logs"]] == ([1, 2, 3] if run["arm"] != "async" else [1, 2, 3, 4])
        assert all(s["groups"] == 2 for s in run["step_logs"]) and run["episodes_failed"] == 0
        # Each step ends with a push through the pool; the sim servers charge the profile's update time.
        assert all(s["push_s"] >= 1.0 for s in run["step_logs"])
        assert 0 < run["trained_trajectories_per_s"] and 0 < run["bound_traj_per_s"]
        assert run["efficiency"] == pytest.approx(run["trained_trajectories_per_s"] / run["bound_traj_per_s"],
                                                  abs=2e-3)
        # The guard read the servers over the window (phases shorter than a second of wall time are merged; x20
        # makes them short here).
        assert run["clock"]["intervals"] >= 1 and run["clock"]["worst_phase"] is not None
        shares = run["server_time_shares"]
        assert shares["decode"] > 0 and sum(shares.values()) == pytest.approx(1.0, abs=0.02)
    sync, lockstep = r["sync"], r["lockstep"]
    # Sync trains only after generation: the learner waited for each step's groups; its phases were timed.
    assert all(s["wait_s"] > 0 for s in sync["step_logs"])
    assert set(sync["phase_s_mean"]) == {"propose", "verify", "solve", "deliver"}
    assert set(sync["bound_parts_s"]) == {"propose", "verify", "solve", "train", "push"}
    assert set(lockstep["bound_parts_s"]) == {"episodes", "train", "push"}
    for run in (r["async"], r["async_flush"]):
        assert run["bound_traj_per_s"] == pytest.approx(min(run["load_rate_traj_per_s"],
                                                            run["learner_rate_traj_per_s"]), abs=1e-3)
        assert run["load_rate_traj_per_s"] <= run["server_rate_traj_per_s"] + 1e-3
        assert 1 <= run["load_requests_per_server"] <= run["server_batch_cap"]
    assert r["better_sync"] is max(sync, lockstep, key=lambda x: x["trained_trajectories_per_s"])
    assert r["async_over_sync"] == pytest.approx(r["async"]["trained_trajectories_per_s"] /
                                                 r["better_sync"]["trained_trajectories_per_s"], rel=1e-2)
    assert r["in_place_gain"] == pytest.approx(r["async"]["trained_trajectories_per_s"] /
                                               r["async_flush"]["trained_trajectories_per_s"], rel=1e-2)
    results = {"args": {**vars(args), "index": str(demo_index)}, "profiles": [r]}
    text = markdown(results)
    assert "| sync | 2 | 2 | 0 | 1 |" in text and "| lockstep | 2 | 2 | 0 | 1 |" in text
    ratio = [line for line in verdict_lines(r) if line.startswith("async/sync ratio:")]
    assert len(ratio) == 1 and (("not printed" in ratio[0]) != r["valid"])
    # Each arm's verdict says when its own rate is not a measurement, whether or not the ratio uses it.
    sync_part, lockstep_part = verdict_lines(r)[0].split("; lock-step")
    assert ("NOT VALID" in sync_part) != valid(sync) and ("NOT VALID" in lockstep_part) != valid(lockstep)
    # `ssp bench report` renders the same result: its summary line and the plot.
    (tmp_path / "async_vs_sync.json").write_text(json.dumps(results, default=str))
    built = report.build(tmp_path, tmp_path / "REPORT.md")
    assert "- async/sync ratio: " in built and (tmp_path / "async_vs_sync-qwen2.5-7b-h100-tp1.png").is_file()
