"""The scheduler over a scripted policy (pure logic): continuous launching within max_inflight, the staleness gate
(eta = 0 lock-step), failures that drop only their episode, the sync phase order, and shutdown."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from scripted_policy import ScriptedPolicy, TinyRetriever

from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import GameConfig, RolloutConfig, SchedulerConfig, SearchBatcherConfig
from ssp.engine.game import Game
from ssp.engine.judge import Judge
from ssp.engine.rollout import RolloutRunner
from ssp.engine.scheduler import EpisodesFailing, Scheduler, StalenessGate
from ssp.engine.search_batcher import SearchBatcher
from ssp.engine.seeds import SeedAnswer, seed_stream
from ssp.engine.stream import FileSink, TrajectoryStream, read_frames
from ssp.engine.trajectory import unpack_group
from ssp.metrics import MetricsLog, read_metrics

SEEDS = [SeedAnswer(("Danube",), "place"), SeedAnswer(("Rhine",), "place")]


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(model_dir)


def build(chat: ChatTokenizer, policy: ScriptedPolicy, cfg: SchedulerConfig, tmp_path: Path, judge: Judge,
          game_cfg: GameConfig = GameConfig(solver_group_size=2, verify_samples=2),
          metrics: MetricsLog | None = None,
          policy_version: Callable[[], Awaitable[int]] | None = None) -> tuple[Scheduler, SearchBatcher, Path]:
    batcher = SearchBatcher(TinyRetriever(), SearchBatcherConfig(window_ms=1), k=2)
    game = Game(RolloutRunner(policy, chat, batcher, RolloutConfig()), chat, judge, game_cfg, random.Random(0))
    out = tmp_path / "out.frames"
    stream = TrajectoryStream(FileSink(out), max_frame_bytes=1 << 24, queue_groups=4, spill_path=tmp_path / "spill")
    seeds = seed_stream(SEEDS, hops_min=2, hops_max=3, seed=0)
    sched = Scheduler(game, seeds, stream, cfg, capacity=8, solver_group_size=game_cfg.solver_group_size,
                      metrics=metrics, search_stats=batcher.stats.summary, policy_version=policy_version,
                      run_id="t")
    return sched, batcher, out


async def test_async_run_writes_every_group(chat: ChatTokenizer, tmp_path: Path) -> None:
    metrics = MetricsLog(tmp_path / "m.jsonl")
    async with Judge(GameConfig().judge) as judge:
        sched, batcher, out = build(chat, ScriptedPolicy(chat, delay_s=0.005), SchedulerConfig(
            max_inflight=3, eta=None, metrics_interval_s=0.05), tmp_path, judge, metrics=metrics)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, sched.gate.inflight)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        summary = await sched.run(episodes=7)
        watcher.cancel()
        await batcher.close()
    metrics.close()
    groups = [unpack_group(p) for p in read_frames(out)]
    assert len(groups) == 7 == summary["episodes_finished"] and summary["episodes_failed"] == 0
    assert peak == 3  # continuous launching up to max_inflight, never more
    assert len({g[0].group_id for g in groups}) == 7
    # Seeds alternate Danube/Rhine but the scripted verifier always says Danube: Rhine questions fail verification.
    assert summary["validity_rate"] is not None and 0 < summary["validity_rate"] < 1
    assert summary["invalid_reasons"].get("failed_verification", 0) >= 1
    assert summary["extraction_rate"] == 1.0 and summary["search_batches"] > 0
    lines = read_metrics(tmp_path / "m.jsonl")
    assert lines[-1]["event"] == "summary" and "turn_overhead_p99_ms" in lines[-1] and "loop_lag_p99_ms" in lines[-1]


async def test_eta_zero_is_lock_step(chat: ChatTokenizer, tmp_path: Path) -> None:
    async with Judge(GameConfig().judge) as judge:
        sched, batcher, out = build(chat, ScriptedPolicy(chat), SchedulerConfig(
            max_inflight=8, eta=0, episodes_per_step=2), tmp_path, judge)
        run = asyncio.create_task(sched.run(episodes=None))
        await asyncio.sleep(1.0)
        assert sched.counters.launched == 2 and sched.counters.finished == 2  # then it waits for the learner
        await sched.set_policy_version(1)
        await asyncio.sleep(1.0)
        assert sched.counters.launched == 4 and sched.counters.finished == 4
        await sched.stop()
        summary = await asyncio.wait_for(run, 10)
        await batcher.close()
    assert summary["episodes_finished"] == 4 and len(read_frames(out)) == 4


async def _sent(gate: StalenessGate, version: int, log: list[int]) -> None:
    await gate.deliver(version, lambda: _record(log, version))


async def _record(log: list[int], version: int) -> None:
    log.append(version)


async def test_staleness_gate_accounting() -> None:
    gate = StalenessGate(eta=1, per_step=2)
    for _ in range(4):  # (version 0 + eta 1 + 1) * 2 = 4 episodes may start on version 0
        assert await gate.acquire() == 0
    blocked = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    assert not blocked.done()
    await gate.withdraw(0)  # a failed episode frees its place: the learner will not wait for it
    assert await asyncio.wait_for(blocked, 1) == 0
    sent: list[int] = []
    for _ in range(3):
        await _sent(gate, 0, sent)
    await gate.set_version(1)
    # One episode of version 0 is still running. The window counts from the current version, (1 + 1 + 1) * 2 = 6
    # slots, so two more may start although the old one holds its place (the rule counting from the oldest running
    # episode would allow none).
    assert gate.inflight == 1 and gate.room() == 2
    assert await gate.acquire_up_to(5) == (1, 2)  # the sync schedule takes what is offered
    # Slot 3 is the old episode's last chance (deadline (0 + 1 + 1) * 2 = 4): a newer group must wait for it.
    newer = asyncio.create_task(_sent(gate, 1, sent))
    await asyncio.sleep(0.01)
    assert not newer.done() and gate.held == 1
    await _sent(gate, 0, sent)
    await asyncio.wait_for(newer, 1)
    assert sent == [0, 0, 0, 0, 1] and gate.delivered == 5 and gate.held == 0
    with pytest.raises(ValueError, match="went back"):
        await gate.set_version(0)


async def test_staleness_gate_sends_newer_groups_before_a_slow_one_until_its_deadline() -> None:
    """eta 2, 2 per step: an episode of version 0 that runs long has deadline slot 6; newer groups take slots 0-4 at
    once, the learner's versions advance without it, and only slot 5 onward waits."""
    gate = StalenessGate(eta=2, per_step=2)
    assert await gate.acquire() == 0  # the slow one
    sent: list[int] = []
    for version in range(3):
        await gate.set_version(version)
        while gate.delivered < 2 * (version + 1) and gate.delivered < 5:
            assert await gate.acquire() == version
            await asyncio.wait_for(_sent(gate, version, sent), 1)
    assert sent == [0, 0, 1, 1, 2] and gate.held == 0
    late = asyncio.create_task(_sent(gate, 2, sent))
    await asyncio.sleep(0.01)
    assert not late.done(), "a newer group took the slow episode's last slot"
    await _sent(gate, 0, sent)
    await asyncio.wait_for(late, 1)
    assert sent == [0, 0, 1, 1, 2, 0, 2]


async def test_failed_episodes_are_counted_and_others_delivered(chat: ChatTokenizer, tmp_path: Path) -> None:
    async with Judge(GameConfig().judge) as judge:
        sched, batcher, out = build(chat, ScriptedPolicy(chat, fail_every=3), SchedulerConfig(max_inflight=2, eta=None),
                                    tmp_path, judge)
        summary = await sched.run(episodes=6)
        await batcher.close()
    assert summary["episodes_failed"] >= 1
    assert summary["episodes_finished"] + summary["episodes_failed"] == 6
    assert summary["failure_reasons"] == {"ConnectionFailed": summary["episodes_failed"]}
    assert len(read_frames(out)) == summary["episodes_finished"]


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_run_whose_every_episode_fails_stops_after_the_budget(chat: ChatTokenizer, tmp_path: Path,
                                                                      mode: str) -> None:
    """Servers that never answer fail every episode: without the budget the run would retry forever."""
    async with Judge(GameConfig().judge) as judge:
        sched, batcher, out = build(chat, ScriptedPolicy(chat, fail_every=1),
                                    SchedulerConfig(mode=mode, max_inflight=2, eta=None, episodes_per_step=2,
                                                    max_consecutive_failures=5), tmp_path, judge)
        with pytest.raises(EpisodesFailing, match=r"5 episodes in a row failed .*ConnectionFailed.*raise the budget"):
            await asyncio.wait_for(sched.run(episodes=None), timeout=20)
        await batcher.close()
    assert 5 <= sched.counters.failed <= 6 and sched.counters.finished == 0  # (2 in flight: one more may fail)


async def test_sync_mode_runs_phase_by_phase(chat: ChatTokenizer, tmp_path: Path) -> None:
    policy = ScriptedPolicy(chat)
    async with Judge(GameConfig().judge) as judge:
        sched, batcher, out = build(chat, policy, SchedulerConfig(mode="sync", eta=None, episodes_per_step=3),
                                    tmp_path, judge, game_cfg=GameConfig(solver_group_size=2, verify_samples=1))
        # Each phase is announced before its first call (benches read the servers' clocks there): record how many
        # calls the policy had seen at each announcement.
        marks: list[tuple[str, int]] = []
        sched.on_phase = lambda name: marks.append((name, len(policy.calls)))
        summary = await sched.run(episodes=5)
        await batcher.close()
    assert summary["episodes_finished"] == 5 and len(read_frames(out)) == 5
    roles = [r for r, _, _ in policy.calls]
    # Step 1 (3 episodes): every proposer call comes before any verifier call, and those before any solver call.
    first_step = roles[:roles.index("proposer", roles.index("solver"))]
    assert first_step == sorted(first_step, key=["proposer", "verifier", "solver"].index)
    assert [name for name, _ in marks] == ["propose", "verify", "solve", "deliver"] * 2
    expected = {"propose": "proposer", "verify": "verifier", "solve": "solver"}
    for (name, begin), (_, end) in zip(marks, marks[1:]):
        assert {r for r, _, _ in policy.calls[begin:end]} <= {expected.get(name)}, name


async def test_policy_version_is_followed_from_the_servers(chat: ChatTokenizer, tmp_path: Path) -> None:
    served = {"version": 0}

    async def read_version() -> int:
        return served["version"]

    async with Judge(GameConfig().judge) as judge:
        sched, batcher, out = build(chat, ScriptedPolicy(chat), SchedulerConfig(
            max_inflight=8, eta=0, episodes_per_step=2, version_poll_s=0.05), tmp_path, judge,
            policy_version=read_version)
        run = asyncio.create_task(sched.run(episodes=4))
        await asyncio.sleep(0.8)
        assert sched.counters.launched == 2  # lock-step: waits for the learner's push
        served["version"] = 1  # the learner pushed weights labelled "1"
        summary = await asyncio.wait_for(run, 10)
        await batcher.close()
    assert summary["episodes_finished"] == 4 and summary["policy_version"] == 1


async def test_an_unexpected_error_in_an_episode_stops_the_run(chat: ChatTokenizer, tmp_path: Path) -> None:
    """A bug (not a RolloutError) must not be swallowed episode after episode while the run goes on."""
    async with Judge(GameConfig().judge) as judge:
        sched, batcher, _ = build(chat, ScriptedPolicy(chat), SchedulerConfig(max_inflight=2, eta=None), tmp_path,
                                  judge)

        async def broken(gid: str, seed: object) -> None:
            raise TypeError(f"bug in episode {gid}")

        sched.game.play = broken  # type: ignore[method-assign]
        with pytest.raises(TypeError, match="bug in episode"):
            await asyncio.wait_for(sched.run(episodes=10), 30)
        await batcher.close()
