"""SSP rewards (as SSP's reference code): solver 0 / penalty / 1, proposer 1 - solver accuracy or `invalid_reward`.

Rewards only: advantages are RL maths and belong to the learner.
"""

from collections.abc import Sequence

from ssp.engine.config import GameConfig


def solver_reward(correct: bool, answer_tags: int, cfg: GameConfig) -> float:
    """1.0 for a correct answer; `answer_tag_penalty_reward` when it is correct but the response has more than
    `answer_tag_limit` answer tags (tag spam could otherwise game the judge); 0.0 when wrong."""
    if not correct:
        return 0.0
    return cfg.answer_tag_penalty_reward if answer_tags > cfg.answer_tag_limit else 1.0


def solver_accuracy(correct: Sequence[bool]) -> float:
    """Fraction of a valid question's solver rollouts that the judge found correct (a tag-spam answer, rewarded
    only `answer_tag_penalty_reward`, still counts as solved, as in SSP; so does any answer a plug-in reward
    scores below 1: accuracy is the judge's, not the reward's)."""
    if not correct:
        raise ValueError("solver accuracy of an empty group is undefined; a valid question always has solvers")
    return sum(1 for c in correct if c) / len(correct)


def invalid_stage(reasons: Sequence[str]) -> str:
    """Where an invalid proposal failed: "no_question", "failed_verification" or "failed_checks" (ssp.engine.config
    INVALID_STAGES), from its reasons (ssp.engine.game: "no_question", "failed_verification", or rule-check names)."""
    if "no_question" in reasons:
        return "no_question"
    if "failed_verification" in reasons:
        return "failed_verification"
    return "failed_checks"


def proposer_reward(valid: bool, reasons: Sequence[str], solvers_correct: Sequence[bool], cfg: GameConfig) -> float:
    """1 - solver accuracy for a valid question (the proposer is paid for the solver's failures), otherwise the
    invalid reward of the stage where it failed (game.invalid_reward_by_stage, else game.invalid_reward)."""
    if not valid:
        return cfg.invalid_reward_by_stage.get(invalid_stage(reasons), cfg.invalid_reward)
    return 1.0 - solver_accuracy(solvers_correct)


def zero_variance(rewards: Sequence[float]) -> bool:
    """All rewards equal: the group carries no GRPO signal."""
    return len(set(rewards)) <= 1
