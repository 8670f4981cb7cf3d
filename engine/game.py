"""One SSP episode, in phases: propose → check → verify → solve → judge → rewards → a group of Trajectory records.

The phases are separate methods so the scheduler can run them per episode ("async" mode: `play`) or phase by
phase over a whole step, as the reference does ("sync" mode).

Group layout (one msgpack frame per episode, all records share group_id):
    proposer  ×1       reward = 1 - solver accuracy (valid) or game.invalid_reward
    verifier  ×0..V    reward = 1/0 judged answer from the documents (only for questions that passed the checks)
    solver    ×0..G    reward = 1 / answer_tag_penalty_reward / 0 (only for valid questions)
A solver group whose rewards are all equal carries no GRPO signal; the engine sends it anyway and counts it
("zero_variance_groups"): dropping it is the learner's rule alone (learner.drop_zero_variance_groups), so that
one switch decides what is trained.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from ssp.engine.chat import ChatTokenizer
from ssp.engine.checks import check_question, count_answer_tags, extract_answer, extract_question
from ssp.engine.config import GameConfig
from ssp.engine.judge import Judge, Verdict
from ssp.engine.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    QUESTION_CLOSE,
    QUESTION_OPEN,
    SEARCH_OPEN,
    proposer_messages,
    solver_messages,
)
from ssp.engine.rewards import proposer_reward, solver_accuracy, zero_variance
from ssp.engine.rollout import Rollout, RolloutRunner, RolloutSpec
from ssp.engine.seeds import Seed
from ssp.engine.solver_rewards import SolverOutcome, make_solver_reward
from ssp.engine.trajectory import Trajectory
from ssp.engine.verify import DistractorPool, Verification, Verifier, verification_documents


@dataclass(slots=True)
class Proposal:
    group_id: str
    seed: Seed
    rollout: Rollout
    question: str | None
    reasons: list[str]
    """Why the question is invalid so far (empty = it passed the rule checks)."""


@dataclass(slots=True)
class SolverRun:
    rollout: Rollout
    verdict: Verdict
    reward: float
    answer_tags: int


@dataclass(slots=True)
class EpisodeResult:
    group_id: str
    trajectories: list[Trajectory]
    valid: bool
    reasons: list[str]
    solver_accuracy: float | None
    proposer_reward: float
    zero_variance: bool
    """The solver group's rewards are all equal (counted; the learner decides whether it is trained)."""
    generated_tokens: int


class Game:
    """Plays episodes with shared components: the rollout runner, the judge, the distractor pool."""

    def __init__(self, runner: RolloutRunner, chat: ChatTokenizer, judge: Judge, cfg: GameConfig,
                 rng: random.Random) -> None:
        self.runner = runner
        self._chat = chat
        self._judge = judge
        self._cfg = cfg
        self._rng = rng
        self.distractors = DistractorPool(cfg.distractor_pool_size, rng)
        self.verifier = Verifier(runner, chat, judge, cfg)
        self._solver_reward = make_solver_reward(cfg)
        self.proposer_spec = RolloutSpec(final_open=QUESTION_OPEN, final_close=QUESTION_CLOSE, search=True,
                                         temperature=cfg.proposer_temperature, top_p=cfg.top_p,
                                         prefill=cfg.proposer_prefill)
        self.solver_spec = RolloutSpec(final_open=ANSWER_OPEN, final_close=ANSWER_CLOSE, search=True,
                                       temperature=cfg.solver_temperature, top_p=cfg.top_p, prefill=cfg.solver_prefill)

    async def play(self, group_id: str, seed: Seed) -> EpisodeResult:
        proposal = await self.propose(group_id, seed)
        verification = await self.verify(proposal)
        solvers = await self.solve(proposal) if verification is not None and verification.passed else []
        return self.assemble(proposal, verification, solvers)

    async def propose(self, group_id: str, seed: Seed) -> Proposal:
        spec = self.proposer_spec
        if self._cfg.proposer_scaffold:  # one opener per turn: the seed's searches, then the question
            spec = dataclasses.replace(spec, prefill=SEARCH_OPEN,
                                       later_prefills=(SEARCH_OPEN,) * (seed.hops - 1) + (QUESTION_OPEN,))
        prompt = await self._chat.render(proposer_messages(seed.answer, seed.hops), prefill=spec.prefill)
        ro = await self.runner.run(prompt, spec, affinity=f"{group_id}-p")
        question = extract_question(ro.generated_text)
        reasons = (["no_question"] if question is None else
                   check_question(question, seed.aliases, ro.searches, self._cfg.checks))
        self.distractors.add(group_id, [d for docs in ro.docs for d in docs])
        return Proposal(group_id, seed, ro, question, reasons)

    async def verify(self, p: Proposal) -> Verification | None:
        """RAG verification of a question that passed the rule checks; None when it did not get that far."""
        if p.question is None or p.reasons:
            return None
        own = [d for docs in p.rollout.docs for d in docs]
        documents = verification_documents(own, self.distractors.draw(self._cfg.distractors, exclude=p.group_id),
                                           self._rng)
        v = await self.verifier.verify(p.question, p.seed.aliases, documents, affinity=f"{p.group_id}-v")
        if not v.passed:
            p.reasons.append("failed_verification")
        return v

    async def solve(self, p: Proposal) -> list[SolverRun]:
        assert p.question is not None and not p.reasons, "solve() runs only on valid questions"
        prompt = await self._chat.render(solver_messages(p.question), prefill=self.solver_spec.prefill)
        rollouts = await self.runner.run_group(prompt, self.solver_spec, self._cfg.solver_group_size,
                                               affinity=f"{p.group_id}-s")
        runs = []
        for ro in rollouts:
            prediction = extract_answer(ro.generated_text)
            verdict = await self._judge.judge(p.question, prediction, p.seed.aliases)
            tags = count_answer_tags(ro.generated_text)
            reward = self._solver_reward(SolverOutcome(p.question, prediction, p.seed.aliases, verdict, tags))
            runs.append(SolverRun(ro, verdict, reward, tags))
        return runs

    def assemble(self, p: Proposal, v: Verification | None, solvers: list[SolverRun]) -> EpisodeResult:
        valid = not p.reasons and v is not None and v.passed
        correct = [s.verdict.correct for s in solvers]  # the judge's, whatever reward the solver is trained on
        accuracy = solver_accuracy(correct) if valid else None
        r_p = proposer_reward(valid, p.reasons, correct, self._cfg)
        common: dict[str, Any] = {"answer": list(p.seed.aliases), "question": p.question}
        group = [p.rollout.trajectory(role="proposer", group_id=p.group_id, reward=r_p, meta={
            **common, "hops": p.seed.hops, "answer_type": p.seed.type, "valid": valid, "invalid_reasons": p.reasons,
            "verify_fraction": v.fraction if v is not None else None, "solver_accuracy": accuracy})]
        for ro, verdict in v.samples if v is not None else []:
            group.append(ro.trajectory(role="verifier", group_id=p.group_id, reward=float(verdict.correct), meta={
                **common, "prediction": extract_answer(ro.generated_text), "judge": verdict.method.value}))
        for s in solvers:
            group.append(s.rollout.trajectory(role="solver", group_id=p.group_id, reward=s.reward, meta={
                **common, "prediction": extract_answer(s.rollout.generated_text), "judge": s.verdict.method.value,
                "answer_tags": s.answer_tags}))
        rollouts = [p.rollout, *(ro for ro, _ in (v.samples if v else [])), *(s.rollout for s in solvers)]
        return EpisodeResult(
            group_id=p.group_id, trajectories=group, valid=valid, reasons=list(p.reasons), solver_accuracy=accuracy,
            proposer_reward=r_p, zero_variance=bool(solvers) and zero_variance([s.reward for s in solvers]),
            generated_tokens=sum(r.generated_tokens for r in rollouts))
