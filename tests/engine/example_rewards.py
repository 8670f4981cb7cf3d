"""Solver reward plug-ins for tests/engine/test_solver_rewards.py, loaded as "example_rewards:ClassName" (the same
seam a user's package uses)."""

from __future__ import annotations

from ssp.engine.solver_rewards import SolverOutcome


class BrevityBonus:
    """A user's reward: 1 for a correct answer of at most `max_words` words, `long_answer` for a longer correct
    one, `wrong_answer` for a wrong one."""

    def __init__(self, max_words: int, long_answer: float = 0.5, wrong_answer: float = 0.0) -> None:
        self.max_words = max_words
        self.long_answer = long_answer
        self.wrong_answer = wrong_answer

    def __call__(self, outcome: SolverOutcome) -> float:
        if not outcome.verdict.correct:
            return self.wrong_answer
        return 1.0 if len((outcome.prediction or "").split()) <= self.max_words else self.long_answer


class Unbounded:
    """A broken plug-in: its reward is outside [0, 1]."""

    def __call__(self, outcome: SolverOutcome) -> float:
        return 2.0
