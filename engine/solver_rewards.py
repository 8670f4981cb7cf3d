"""`make_solver_reward`: the solver's training reward, SSP's or the user's own, chosen by `game.solver_reward`.

Why a plug-in: the reward is the second thing RL users change after the data (partial credit, format bonuses,
length penalties). What a plug-in changes is the solver's GRPO reward only. Whether an answer is *correct* stays
the judge's verdict (ssp.engine.judge), and the proposer's reward (1 - solver accuracy) and the accuracy metrics count
correct answers, so a shaped solver reward cannot pay the proposer for questions that were in fact answered.

`game.solver_reward` is one of:
- "ssp": SSP's reward (ssp.engine.rewards.solver_reward): 1 correct, 0 wrong, game.answer_tag_penalty_reward when
  correct but with more than game.answer_tag_limit answer tags;
- "token_f1": the answer's best token F1 against the aliases (partial credit; 1 for a correct verdict);
- the name of an entry point in the group `ssp.solver_rewards` (a package registers
  `[project.entry-points."ssp.solver_rewards"] mine = "mypkg.rewards:MyReward"`);
- "package.module:ClassName", imported directly.
A user's class (or factory) is called with `**game.solver_reward_options` and must give a callable
`reward(SolverOutcome) -> float` returning a finite number in [0, 1] (checked on every call: anything else stops the
run with the plug-in's name, and the episode is never trained):

    [game]
    solver_reward = "mypkg.rewards:BrevityBonus"
    solver_reward_options = { max_words = 5 }
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ssp.engine.config import GameConfig
from ssp.engine.judge import Verdict, token_f1
from ssp.engine.rewards import solver_reward
from ssp.plugins import build_plugin

ENTRY_POINT_GROUP = "ssp.solver_rewards"
BUILTIN = ("ssp", "token_f1")


class SolverRewardError(ValueError):
    """A solver reward plug-in that cannot be loaded, or that returned something other than a number in [0, 1]."""


@dataclass(frozen=True, slots=True)
class SolverOutcome:
    """What a reward may look at: the question, the solver's extracted answer (None: it wrote no <answer>), the
    ground-truth aliases, the judge's verdict, and how many answer tags the response holds."""

    question: str
    prediction: str | None
    aliases: tuple[str, ...]
    verdict: Verdict
    answer_tags: int


class SolverReward(Protocol):
    def __call__(self, outcome: SolverOutcome) -> float: ...


class SspSolverReward:
    """SSP's reward (see the module docstring)."""

    def __init__(self, cfg: GameConfig) -> None:
        self._cfg = cfg

    def __call__(self, outcome: SolverOutcome) -> float:
        return solver_reward(outcome.verdict.correct, outcome.answer_tags, self._cfg)


class TokenF1Reward:
    """Partial credit: the best token F1 against any alias; a correct verdict (e.g. from the LLM judge, for an
    answer worded differently) earns 1."""

    def __call__(self, outcome: SolverOutcome) -> float:
        if outcome.verdict.correct:
            return 1.0
        return token_f1(outcome.prediction, outcome.aliases) if outcome.prediction else 0.0


def make_solver_reward(cfg: GameConfig) -> Callable[[SolverOutcome], float]:
    """The reward `cfg.solver_reward` names, wrapped so that every value it returns is checked."""
    name = cfg.solver_reward
    if name in BUILTIN:
        if cfg.solver_reward_options:
            raise SolverRewardError(f"game.solver_reward_options {sorted(cfg.solver_reward_options)} is only for "
                                    f"user rewards; solver_reward = {name!r} takes none")
        reward: SolverReward = SspSolverReward(cfg) if name == "ssp" else TokenF1Reward()
    else:
        reward = build_plugin(name, cfg.solver_reward_options, group=ENTRY_POINT_GROUP, key="game.solver_reward",
                              options_key="game.solver_reward_options", builtin=BUILTIN, error=SolverRewardError)
        if not callable(reward):
            raise SolverRewardError(f"game.solver_reward = {name!r} built a {type(reward).__name__}, which is not "
                                    "callable; a solver reward is called as reward(outcome) -> float")

    def checked(outcome: SolverOutcome) -> float:
        value = reward(outcome)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 <= value <= 1.0:
            raise SolverRewardError(f"game.solver_reward = {name!r} returned {value!r} for the answer "
                                    f"{outcome.prediction!r}; a solver reward must be a number in [0, 1]")
        return float(value)

    return checked
