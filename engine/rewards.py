"""SSP rewards (ssp-spec.md §1.8-1.10): solver 0 / penalty / 1, proposer 1 - solver accuracy or `invalid_reward`.

Rewards only: advantages are RL maths and belong to the learner.
"""

from collections.abc import Sequence

from engine.config import GameConfig


def solver_reward(correct: bool, answer_tags: int, cfg: GameConfig) -> float:
    """1.0 for a correct answer; `answer_tag_penalty_reward` when it is correct but the response has more than
    `answer_tag_limit` answer tags (tag spam could otherwise game the judge); 0.0 when wrong."""
    if not correct:
        return 0.0
    return cfg.answer_tag_penalty_reward if answer_tags > cfg.answer_tag_limit else 1.0


def solver_accuracy(rewards: Sequence[float]) -> float:
    """Fraction of solver rollouts with a positive reward (a penalised 0.25 still counts as solved, as in SSP)."""
    if not rewards:
        raise ValueError("solver accuracy of an empty group is undefined; a valid question always has solvers")
    return sum(1 for r in rewards if r > 0) / len(rewards)


def proposer_reward(valid: bool, solver_rewards: Sequence[float], cfg: GameConfig) -> float:
    """1 - solver accuracy for a valid question (the proposer is paid for the solver's failures), otherwise
    `invalid_reward`."""
    if not valid:
        return cfg.invalid_reward
    return 1.0 - solver_accuracy(solver_rewards)


def zero_variance(rewards: Sequence[float]) -> bool:
    """All rewards equal: the group carries no GRPO signal."""
    return len(set(rewards)) <= 1
