"""One SSP episode end to end over a scripted policy (pure logic: the real-server run is test_rollout_e2e.py):
group layout, rewards, validity reasons, verification fail-closed, per-role temperatures."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scripted_policy import QUESTION, ScriptedPolicy, TinyRetriever

from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import GameConfig, RolloutConfig, SearchBatcherConfig
from ssp.engine.game import Game
from ssp.engine.judge import Judge
from ssp.engine.rollout import RolloutError, RolloutRunner
from ssp.engine.search_batcher import SearchBatcher
from ssp.engine.seeds import Seed


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(model_dir)


async def play(chat: ChatTokenizer, policy: ScriptedPolicy, cfg: GameConfig, seed: Seed,
               gid: str = "g-1") -> tuple:  # type: ignore[type-arg]
    batcher = SearchBatcher(TinyRetriever(), SearchBatcherConfig(window_ms=1), k=2)
    async with Judge(cfg.judge) as judge:
        game = Game(RolloutRunner(policy, chat, batcher, RolloutConfig()), chat, judge, cfg, random.Random(0))
        try:
            return await game.play(gid, seed), game
        finally:
            await batcher.close()


DANUBE = Seed(("Danube", "Donau"), "place", 2)


async def test_valid_episode_group_layout_and_rewards(chat: ChatTokenizer) -> None:
    cfg = GameConfig(solver_group_size=4, verify_samples=3, checks=GameConfig().checks)
    res, _ = await play(chat, ScriptedPolicy(chat), cfg, DANUBE)
    roles = [t.role for t in res.trajectories]
    assert roles == ["proposer"] + ["verifier"] * 3 + ["solver"] * 4
    assert res.valid and res.reasons == []
    solver_rewards = [t.reward for t in res.trajectories if t.role == "solver"]
    assert sorted(solver_rewards) == [0.0, 0.0, 1.0, 1.0]
    assert res.solver_accuracy == 0.5 and res.proposer_reward == 0.5
    proposer = res.trajectories[0]
    assert proposer.reward == 0.5 and proposer.meta["question"] == QUESTION and proposer.meta["valid"]
    assert proposer.meta["answer"] == ["Danube", "Donau"] and proposer.meta["hops"] == 2
    assert proposer.meta["searches"] == ["step 0 towards the answer", "step 1 towards the answer"]
    assert all(t.reward == 1.0 for t in res.trajectories if t.role == "verifier")
    assert {t.group_id for t in res.trajectories} == {"g-1"}
    for t in res.trajectories:
        t.validate()


async def test_per_role_temperatures_reach_the_requests(chat: ChatTokenizer) -> None:
    # SSP's reference code set a proposer temperature that never reached the sampler.
    policy = ScriptedPolicy(chat)
    cfg = GameConfig(proposer_temperature=0.8, solver_temperature=0.6, verifier_temperature=0.1, top_p=0.9)
    await play(chat, policy, cfg, DANUBE)
    temps = {(role, s.temperature, s.top_p) for role, s, _ in policy.calls}
    assert temps == {("proposer", 0.8, 0.9), ("solver", 0.6, 0.9), ("verifier", 0.1, 0.9)}
    verify_calls = [(s, aff) for role, s, aff in policy.calls if role == "verifier"]
    assert len(verify_calls) == 4 and len({aff for _, aff in verify_calls}) == 1  # one shared affinity
    assert all(s.max_new_tokens == cfg.verify_max_new_tokens for s, _ in verify_calls)
    # The verifier's samples and the solver group each share one prompt, prefilled once before them, on their server.
    warmed = {(role, aff) for role, _, aff in policy.prefills}
    assert len(policy.prefills) == 2 and warmed == {("verifier", verify_calls[0][1]),
                                                    ("solver", next(a for r, _, a in policy.calls if r == "solver"))}


async def test_leaking_question_is_invalid_and_gets_invalid_reward(chat: ChatTokenizer) -> None:
    policy = ScriptedPolicy(chat, question=QUESTION.replace("river", "river (the donau)"))
    res, _ = await play(chat, policy, GameConfig(invalid_reward=-1.0), DANUBE)
    assert not res.valid and "answer_leak" in res.reasons
    assert [t.role for t in res.trajectories] == ["proposer"]
    assert res.trajectories[0].reward == -1.0 and res.trajectories[0].meta["invalid_reasons"] == ["answer_leak"]


async def test_failed_verification_invalidates(chat: ChatTokenizer) -> None:
    # The verifier answers "Danube" but the seed's answer is Paris: no sample is correct.
    res, _ = await play(chat, ScriptedPolicy(chat), GameConfig(), Seed(("Paris",), "place", 2))
    assert not res.valid and res.reasons == ["failed_verification"]
    assert [t.role for t in res.trajectories] == ["proposer"] + ["verifier"] * 4
    assert all(t.reward == 0.0 for t in res.trajectories)


async def test_zero_variance_solver_group_is_counted_and_sent_for_the_learner_to_judge(chat: ChatTokenizer) -> None:
    res, _ = await play(chat, ScriptedPolicy(chat), GameConfig(solver_group_size=1), DANUBE)
    assert res.valid and res.zero_variance
    assert [t.role for t in res.trajectories].count("solver") == 1


async def test_distractors_come_from_other_episodes(chat: ChatTokenizer) -> None:
    batcher = SearchBatcher(TinyRetriever(), SearchBatcherConfig(window_ms=1), k=2)
    cfg = GameConfig(distractors=1)
    async with Judge(cfg.judge) as judge:
        game = Game(RolloutRunner(ScriptedPolicy(chat), chat, batcher, RolloutConfig()), chat, judge, cfg,
                    random.Random(0))
        first = await game.propose("g-1", DANUBE)
        assert game.distractors.draw(1, exclude="g-1") == []
        game.distractors.add("g-0", [first.rollout.docs[0][0].__class__("other-doc", "Other", "Elsewhere.", 1.0)])
        v = await game.verify(first)
        assert v is not None and "Elsewhere." in v.documents and "About step 0" in v.documents
    await batcher.close()


async def test_unreachable_server_fails_the_episode(chat: ChatTokenizer) -> None:
    with pytest.raises(RolloutError, match="unreachable"):
        await play(chat, ScriptedPolicy(chat, fail_every=1), GameConfig(), DANUBE)
