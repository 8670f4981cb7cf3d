"""The staleness bound at the level of the loop: the real Scheduler and Game (over a scripted policy) feed an instant
learner that trains `episodes_per_step` groups per version, in arrival order, as the real learner does. One episode
is made far slower than the rest, so later episodes overtake it. No token may be trained more than eta versions
after the version that sampled it, at eta 0, 1 and 4, and a failed episode must never stall a step."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scripted_policy import ScriptedPolicy, TinyRetriever

from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import GameConfig, RolloutConfig, SchedulerConfig, SearchBatcherConfig
from ssp.engine.game import Game
from ssp.engine.generation import GenerateResult, SamplingParams
from ssp.engine.judge import Judge
from ssp.engine.rollout import RolloutRunner
from ssp.engine.scheduler import Scheduler
from ssp.engine.search_batcher import SearchBatcher
from ssp.engine.seeds import SeedAnswer, seed_stream
from ssp.engine.stream import HEADER, TrajectoryStream
from ssp.engine.trajectory import unpack_group

PER_STEP = 2
STEPS = 12
"""Versions the instant learner trains per run: enough for the slow episode to be overtaken many times over."""
SLOW_DELAY_S = 0.4
"""Per request of the slow episode; the others take 2 ms, so about 25 of them finish while it runs one turn."""


@dataclass
class VersionedPolicy(ScriptedPolicy):
    """The scripted policy, made slow for the requests of one episode (its group id is in the affinity)."""

    slow_group: str = ""
    fast_delay_s: float = 0.002

    async def generate(self, input_ids: list[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
        await asyncio.sleep(SLOW_DELAY_S if self.slow_group and affinity.startswith(self.slow_group)
                            else self.fast_delay_s)
        return await super().generate(input_ids, sampling, affinity=affinity)


@dataclass
class InstantLearner:
    """A FrameSink that trains every `per_step` groups it receives at once: the version goes up by one, the policy
    samples with it from then on (as a weight push does), and the scheduler is told. Records, per trained group,
    the version it was trained at minus the oldest version among its loss tokens."""

    policy: ScriptedPolicy
    per_step: int
    scheduler: Scheduler | None = None
    version: int = 0
    staleness: dict[str, int] = field(default_factory=dict)
    _batch: list[tuple[str, int]] = field(default_factory=list)

    async def write(self, frame: bytes) -> None:
        group = unpack_group(frame[HEADER.size:])
        sampled = [v for t in group if t.role != "verifier"
                   for v, m in zip(t.policy_versions, t.loss_mask) if m]
        self._batch.append((group[0].group_id, min(sampled)))
        if len(self._batch) < self.per_step:
            return
        for gid, oldest in self._batch:
            self.staleness[gid] = self.version - oldest
        self._batch.clear()
        self.version += 1
        self.policy.version = str(self.version)
        assert self.scheduler is not None
        await self.scheduler.set_policy_version(self.version)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(model_dir)


async def _train_until(chat: ChatTokenizer, tmp_path: Path, policy: ScriptedPolicy, cfg: SchedulerConfig,
                       steps: int, group: str | None = None) -> tuple[InstantLearner, Scheduler]:
    """Run the scheduler against the instant learner until it has trained `steps` versions (and `group`)."""
    game_cfg = GameConfig(solver_group_size=2, verify_samples=1)
    async with Judge(game_cfg.judge) as judge:
        batcher = SearchBatcher(TinyRetriever(), SearchBatcherConfig(window_ms=1), k=2)
        game = Game(RolloutRunner(policy, chat, batcher, RolloutConfig()), chat, judge, game_cfg, random.Random(0))
        learner = InstantLearner(policy, cfg.episodes_per_step)
        stream = TrajectoryStream(learner, max_frame_bytes=1 << 24, queue_groups=4, spill_path=tmp_path / "spill")
        seeds = seed_stream([SeedAnswer(("Danube",), "place")], hops_min=2, hops_max=2, seed=0)
        sched = Scheduler(game, seeds, stream, cfg, capacity=16, solver_group_size=2, run_id="s")
        learner.scheduler = sched
        run = asyncio.create_task(sched.run(None))
        try:
            async with asyncio.timeout(60):
                while learner.version < steps or (group is not None and group not in learner.staleness):
                    assert not run.done(), run.exception()
                    await asyncio.sleep(0.01)
        finally:
            await sched.stop()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await batcher.close()
    return learner, sched


@pytest.mark.parametrize("eta", [0, 1, 4])
async def test_a_slow_episode_is_never_trained_more_than_eta_versions_late(chat: ChatTokenizer, tmp_path: Path,
                                                                          eta: int) -> None:
    slow = "s-00000000"  # the first episode launched
    policy = VersionedPolicy(chat, slow_group=slow)
    cfg = SchedulerConfig(max_inflight=8, eta=eta, episodes_per_step=PER_STEP)
    learner, sched = await _train_until(chat, tmp_path, policy, cfg, STEPS, group=slow)
    overtaking = sum(1 for gid in learner.staleness if gid > slow)
    assert overtaking >= STEPS, f"only {overtaking} later episodes were trained: nothing overtook the slow one"
    worst = max(learner.staleness.values())
    assert worst <= eta, f"a group was trained {worst} versions after it was sampled (eta = {eta}): {learner.staleness}"


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("eta", [0, 1, 4])
async def test_failed_episodes_never_stall_a_step(chat: ChatTokenizer, tmp_path: Path, mode: str, eta: int) -> None:
    """Every fifth proposer request fails (an episode makes three): the learner still gets full batches and keeps training."""
    policy = VersionedPolicy(chat, fail_every=5)
    cfg = SchedulerConfig(mode=mode, max_inflight=4, eta=eta, episodes_per_step=PER_STEP)  # type: ignore[arg-type]
    learner, sched = await _train_until(chat, tmp_path, policy, cfg, 6)
    assert sched.counters.failed >= 2
    assert max(learner.staleness.values()) <= eta
