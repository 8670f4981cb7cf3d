"""Solver reward plug-ins: the contract (engine/solver_rewards.py), the built-in token-F1 reward, and a plug-in's
reward reaching the solver trajectories of a real episode while the proposer is still paid on the judge's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssp.engine.config import GameConfig
from ssp.engine.judge import Method, Verdict
from ssp.engine.solver_rewards import SolverOutcome, SolverRewardError, make_solver_reward

RIGHT = Verdict(correct=True, method=Method.EM)
WRONG = Verdict(correct=False, method=Method.EM)


def outcome(prediction: str | None, verdict: Verdict, tags: int = 1) -> SolverOutcome:
    return SolverOutcome("Which river?", prediction, ("Danube", "Donau"), verdict, tags)


def test_ssp_reward_is_the_default_and_keeps_the_tag_spam_rule() -> None:
    reward = make_solver_reward(GameConfig())
    assert reward(outcome("Danube", RIGHT)) == 1.0 and reward(outcome("Rhine", WRONG)) == 0.0
    assert reward(outcome("Danube", RIGHT, tags=11)) == 0.25


def test_token_f1_gives_partial_credit() -> None:
    reward = make_solver_reward(GameConfig(solver_reward="token_f1"))
    assert reward(outcome("the Danube river", WRONG)) == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))  # P 1/2, R 1
    assert reward(outcome(None, WRONG)) == 0.0 and reward(outcome("Donau", RIGHT)) == 1.0


def test_a_plugin_is_built_with_its_options() -> None:
    reward = make_solver_reward(GameConfig(solver_reward="example_rewards:BrevityBonus",
                                           solver_reward_options={"max_words": 1}))
    assert reward(outcome("Danube", RIGHT)) == 1.0 and reward(outcome("the river Danube", RIGHT)) == 0.5


@pytest.mark.parametrize(("name", "options", "message"), [
    ("nope", {}, r"game.solver_reward = 'nope' is not known; use one of \['ssp', 'token_f1'\]"),
    ("no_such_module:X", {}, r"cannot import module 'no_such_module'"),
    ("example_rewards:Missing", {}, r"has no class 'Missing'"),
    ("example_rewards:BrevityBonus", {"words": 1}, r"could not be constructed with .*'words'"),
    ("ssp", {"max_words": 1}, r"only for user rewards"),
])
def test_bad_plugins_are_refused_with_the_fix(name: str, options: dict[str, int], message: str) -> None:
    with pytest.raises(SolverRewardError, match=message):
        make_solver_reward(GameConfig(solver_reward=name, solver_reward_options=options))


def test_a_reward_outside_zero_one_stops_instead_of_training() -> None:
    reward = make_solver_reward(GameConfig(solver_reward="example_rewards:Unbounded"))
    with pytest.raises(SolverRewardError, match=r"returned 2.0 for the answer 'Danube'; .* number in \[0, 1\]"):
        reward(outcome("Danube", RIGHT))


async def test_plugin_reward_trains_the_solver_but_the_proposer_is_paid_on_verdicts(model_dir: Path) -> None:
    from scripted_policy import ScriptedPolicy
    from test_game import DANUBE, play

    from ssp.engine.chat import ChatTokenizer

    chat = ChatTokenizer.load(model_dir)
    cfg = GameConfig(solver_group_size=4, verify_samples=2, solver_reward="example_rewards:BrevityBonus",
                     solver_reward_options={"max_words": 0, "long_answer": 0.5, "wrong_answer": 0.1})
    res, _ = await play(chat, ScriptedPolicy(chat), cfg, DANUBE)
    assert res.valid
    # The scripted solvers answer "Danube" (right) and "Rhine" (wrong): their rewards are the plug-in's ...
    assert sorted(t.reward for t in res.trajectories if t.role == "solver") == [0.1, 0.1, 0.5, 0.5]
    # ... while accuracy and the proposer's 1 - accuracy count the judge's verdicts (2 of 4), not positive rewards.
    assert res.solver_accuracy == 0.5 and res.proposer_reward == 0.5
