"""Proposer evaluation: for held-out seed answers, how often the proposer writes a valid question, and how hard the
valid questions are for the solver. Run by `ssp eval --seeds FILE` (ssp.engine.evaluation.evaluate(..., seeds=FILE)).

    seed answers (data/seeds schema; eval_config.HELDOUT_SEEDS by default, which training never draws)
      └─ load_eval_seeds: hops per seed from [scheduler.hops_min, hops_max], seeded by eval.seed and its position
    run_seeds: the game's own phases (ssp.engine.game.Game), phase by phase over all seeds like the "sync" scheduler
      1. Game.propose   every seed: the proposer rollout as training plays it (game prefill, [rollout] budgets,
                        retriever.topk documents per search), eval.proposer_temperature; question extracted, rule checks
      2. Game.verify    questions that passed the checks: RAG verification at eval.verifier_temperature (one greedy
                        answer, or game.verify_samples sampled ones); the distractors are the document sets of the
                        game.distractor_pool_size proposals before this one (cyclically, in seed order), drawn by a
                        generator seeded per seed, so the verification prompt is the same on every run
      3. Game.solve     valid questions: one solver rollout under the [eval] protocol (solver prompt, no prefill,
                        eval.temperature, eval.max_turns of eval.max_new_tokens_per_turn, eval.topk), judged by the
                        game's judge as a solver reward is
      └─ each seed's SeedRecord goes to `on_done` as soon as its last phase is over (proposer_records.jsonl)
    summarize_seeds → ProposerScore: the stage rates and the solver's accuracy with Wilson intervals, searches per
    proposer rollout with a t interval, invalid reasons counted

Valid = a question was extracted AND it passed the rule checks AND the RAG verification (the game's definition);
1 - the solver's accuracy on the valid questions is the proposer's mean reward on them. A seed whose rollouts failed
for infrastructure reasons (server, retriever) is recorded with its error, counted in `errors` and scored as
invalid with reason "error" (fail closed: no credit for an episode the game would have dropped).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ssp.engine.chat import ChatTokenizer
from ssp.engine.checks import extract_answer
from ssp.engine.config import EngineConfig, GameConfig
from ssp.engine.game import Game, Proposal, SolverRun
from ssp.engine.intervals import Interval, mean_interval, wilson_interval
from ssp.engine.judge import Judge
from ssp.engine.rollout import RolloutError, RolloutRunner
from ssp.engine.seeds import Seed, load_seed_answers
from ssp.engine.verify import Verification

T = TypeVar("T")

ERROR_REASON = "error"
"""The invalid reason of a seed whose rollouts failed on infrastructure (the game's own reasons are the checks')."""


# ---------------------------------------------------------------- seeds


@dataclass(frozen=True, slots=True)
class EvalSeed:
    """One seed answer to evaluate the proposer on."""

    index: int
    """0-based position among the file's seed answers (blank lines skipped): its id in records."""
    seed: Seed
    """The answer's aliases and type, and the hop count asked of the proposer."""


def load_eval_seeds(path: Path, cfg: EngineConfig) -> list[EvalSeed]:
    """Every seed answer of a seeds file, each with its hop count drawn from [scheduler.hops_min, hops_max] by a
    generator seeded with eval.seed and the answer's position, so an answer keeps its hop count in any subset.
    Raises ssp.engine.seeds.SeedError naming the file and line of a malformed line."""
    answers = load_seed_answers(path)
    hops_min, hops_max = cfg.scheduler.hops_min, cfg.scheduler.hops_max
    return [EvalSeed(i, Seed(a.aliases, a.type, random.Random(f"hops:{cfg.eval.seed}:{i}").randint(hops_min, hops_max)))
            for i, a in enumerate(answers)]


def eval_game_config(cfg: EngineConfig) -> GameConfig:
    """The [game] section with the evaluation's sampling: proposer and verifier at eval.proposer_temperature and
    eval.verifier_temperature (one verification answer when greedy: more would be identical), the solver as in the
    QA protocol (eval.temperature, no prefill, one rollout per question). Everything else is training's."""
    greedy_verifier = cfg.eval.verifier_temperature == 0
    return dataclasses.replace(
        cfg.game, proposer_temperature=cfg.eval.proposer_temperature,
        verifier_temperature=cfg.eval.verifier_temperature,
        verify_samples=1 if greedy_verifier else cfg.game.verify_samples,
        solver_temperature=cfg.eval.temperature, solver_prefill="", solver_group_size=1)


# ---------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True, slots=True)
class SeedRecord:
    """What happened on one seed answer: the proposer's question and rollout, the checks, the verification, and
    the solver's answer."""

    index: int
    answer: tuple[str, ...]
    """The seed's aliases; answer[0] is the one shown to the proposer."""
    type: str
    hops: int
    question: str | None
    """The first <question> block of the proposer's text; None when it wrote none."""
    reasons: tuple[str, ...]
    """Why the question is invalid: the game's rule-check names, "no_question", "failed_verification", or "error";
    empty for a valid question."""
    checks_passed: bool
    """A question was extracted and passed every rule check."""
    verified: bool | None
    """The RAG verification passed; None when the question did not reach it (none, or a failed check)."""
    verify_fraction: float | None
    verify_predictions: tuple[str | None, ...]
    """The verification answers (the last <answer> of each), in sample order."""
    verify_documents: str | None
    """The numbered documents the verification answered from: the proposer's own and the distractors, shuffled."""
    searches: int
    """Searches the proposer's rollout executed."""
    queries: tuple[str, ...]
    turns: int
    end: str
    """Why the proposer's rollout ended (ssp.engine.rollout.EndReason), or "error"."""
    generated_tokens: int
    """Tokens the proposer generated."""
    text: str
    """The proposer's text its tags were read from: the prefill that opened its turn (part of the prompt), then its
    turns, without the <information> blocks."""
    response: str
    """The proposer's whole response as it saw it: its turns and the <information> blocks, decoded."""
    solved: bool | None
    """The judge found the solver's answer to the valid question correct (the game's rule for solver accuracy,
    ssp.engine.rewards.solver_accuracy); None when there was no valid question."""
    solver_prediction: str | None
    solver_judge: str | None
    """Which rule decided the solver's verdict (ssp.engine.judge.Method)."""
    solver_searches: int | None
    solver_queries: tuple[str, ...]
    solver_end: str | None
    solver_response: str | None
    elapsed_s: float
    """Seconds this seed's own phases took (proposal, verification, solver), waits between phases excluded."""
    error: str | None = None
    """The infrastructure failure that cut this seed short (it then counts as invalid, reason "error")."""

    @property
    def question_written(self) -> bool:
        return self.question is not None

    @property
    def valid(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["question_written"], out["valid"] = self.question_written, self.valid
        return out


@dataclass(slots=True)
class _Episode:
    """One seed's state between the phases."""

    seed: EvalSeed
    game: Game
    proposal: Proposal | None = None
    verification: Verification | None = None
    solver: SolverRun | None = None
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def group_id(self) -> str:
        return f"eval-seed-{self.seed.index}"


def _record(ep: _Episode, chat: ChatTokenizer) -> SeedRecord:
    p, v, s = ep.proposal, ep.verification, ep.solver
    ro = p.rollout if p is not None else None
    reasons = [*(p.reasons if p is not None else []), *([ERROR_REASON] if ep.error is not None else [])]
    return SeedRecord(
        index=ep.seed.index, answer=ep.seed.seed.aliases, type=ep.seed.seed.type, hops=ep.seed.seed.hops,
        question=p.question if p is not None else None, reasons=tuple(dict.fromkeys(reasons)),
        checks_passed=p is not None and p.question is not None and not (set(p.reasons) - {"failed_verification"}),
        verified=v.passed if v is not None else None, verify_fraction=v.fraction if v is not None else None,
        verify_predictions=tuple(extract_answer(r.generated_text) for r, _ in v.samples) if v is not None else (),
        verify_documents=v.documents if v is not None else None,
        searches=len(ro.searches) if ro else 0, queries=tuple(q.query for q in ro.searches) if ro else (),
        turns=ro.turns if ro else 0, end=str(ro.end) if ro else "error",
        generated_tokens=ro.generated_tokens if ro else 0,
        text=ro.generated_text if ro else "", response=chat.decode(ro.response_ids) if ro else "",
        solved=s.verdict.correct if s is not None else None,
        solver_prediction=extract_answer(s.rollout.generated_text) if s is not None else None,
        solver_judge=s.verdict.method.value if s is not None else None,
        solver_searches=len(s.rollout.searches) if s is not None else None,
        solver_queries=tuple(q.query for q in s.rollout.searches) if s is not None else (),
        solver_end=str(s.rollout.end) if s is not None else None,
        solver_response=chat.decode(s.rollout.response_ids) if s is not None else None,
        elapsed_s=round(ep.elapsed_s, 3), error=ep.error)


# ---------------------------------------------------------------- the phases


async def run_seeds(game_runner: RolloutRunner, solver_runner: RolloutRunner, chat: ChatTokenizer, judge: Judge,
                    seeds: Sequence[EvalSeed], cfg: EngineConfig, on_done: Callable[[SeedRecord], None]
                    ) -> list[SeedRecord]:
    """Play every seed through propose → verify → solve (see the module docstring) with at most eval.concurrency
    seeds in flight per phase. `game_runner` runs proposer and verifier with training's budgets, `solver_runner`
    the solver with the [eval] protocol's. Records come back in seed order; each is passed to `on_done` as soon as
    it is final."""
    game_cfg = eval_game_config(cfg)
    episodes = [_Episode(s, Game(game_runner, chat, judge, game_cfg,
                                 random.Random(f"verify:{cfg.eval.seed}:{s.index}"))) for s in seeds]
    solving_game = Game(solver_runner, chat, judge, game_cfg, random.Random(cfg.eval.seed))
    records: dict[int, SeedRecord] = {}

    def finish(ep: _Episode) -> None:
        records[ep.seed.index] = record = _record(ep, chat)
        on_done(record)

    async def phase(ep: _Episode, step: Callable[[], Awaitable[bool]]) -> None:
        """Run one phase of one seed; its record is final when the phase fails or the question goes no further."""
        started = time.perf_counter()
        try:
            go_on = await step()
        except RolloutError as e:
            ep.error, go_on = str(e), False
        ep.elapsed_s += time.perf_counter() - started
        if not go_on:
            finish(ep)

    async def propose(ep: _Episode) -> bool:
        ep.proposal = await ep.game.propose(ep.group_id, ep.seed.seed)
        return ep.proposal.question is not None and not ep.proposal.reasons

    async def verify(ep: _Episode) -> bool:
        assert ep.proposal is not None
        ep.verification = await ep.game.verify(ep.proposal)
        return ep.verification is not None and ep.verification.passed

    async def solve(ep: _Episode) -> bool:
        assert ep.proposal is not None
        (ep.solver,) = await solving_game.solve(ep.proposal)
        return False  # the last phase: the record is final

    concurrency = cfg.eval.concurrency
    await _each(episodes, lambda ep: phase(ep, lambda: propose(ep)), concurrency)
    proposed = [ep for ep in episodes if ep.seed.index not in records]
    _share_distractors(episodes, game_cfg.distractor_pool_size)
    await _each(proposed, lambda ep: phase(ep, lambda: verify(ep)), concurrency)
    verified = [ep for ep in proposed if ep.seed.index not in records]
    await _each(verified, lambda ep: phase(ep, lambda: solve(ep)), concurrency)
    assert len(records) == len(episodes), "every seed's record is final after the last phase"
    return [records[s.index] for s in seeds]


def _share_distractors(episodes: Sequence[_Episode], pool_size: int) -> None:
    """Give each seed's game the document sets of the `pool_size` proposals before it in seed order (wrapping
    around), as training's pool holds the recent episodes' — the same sets on every run, whatever order the
    proposals finished in."""
    proposals = [ep.proposal for ep in episodes]
    n = len(episodes)
    for i, ep in enumerate(episodes):
        for back in range(min(pool_size, n - 1), 0, -1):
            other = proposals[(i - back) % n]
            if other is not None:
                ep.game.distractors.add(other.group_id, [d for docs in other.rollout.docs for d in docs])


async def _each(items: Sequence[T], work: Callable[[T], Awaitable[None]], concurrency: int) -> None:
    """`work(item)` for every item, at most `concurrency` at once."""
    todo = iter(items)  # shared by the workers: each item is taken exactly once

    async def worker() -> None:
        for item in todo:
            await work(item)

    async with asyncio.TaskGroup() as tg:
        for w in range(min(concurrency, len(items))):
            tg.create_task(worker(), name=f"proposer-eval-worker-{w}")


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True, kw_only=True, slots=True)
class ProposerScore:
    """The proposer's scores over the evaluated seeds. Rates are fractions in [0, 1]; each has its 95% interval.

    Stage rates are of all seeds and cumulative: question written ≥ passed the rule checks ≥ valid."""

    seeds: int
    question_rate: float
    """Seeds for which a <question> was extracted."""
    question_ci: Interval
    checks_rate: float
    """Seeds whose question also passed the rule checks."""
    checks_ci: Interval
    valid_rate: float
    """Seeds whose question also passed the RAG verification (and no rollout failed): the valid-question rate."""
    valid_ci: Interval
    valid: int
    verified: int
    """Questions whose RAG verification ran (they had passed the rule checks)."""
    verify_pass_rate: float | None
    """Of those, the share that passed it; None when none was verified."""
    verify_pass_ci: Interval | None
    proposals: int
    """Seeds whose proposer rollout finished (not cut short by an infrastructure failure)."""
    searches_per_rollout: float
    """Mean searches executed per finished proposer rollout."""
    searches_ci: Interval
    solved: int
    """Valid questions the solver answered correctly (one rollout each, [eval] protocol)."""
    solver_accuracy: float | None
    """solved / valid: how easy the proposer's valid questions are (1 - it is the proposer's mean reward on them);
    None without valid questions."""
    solver_ci: Interval | None
    invalid_reasons: dict[str, int]
    """How many seeds failed for each reason, most frequent first (a question can break several rules)."""
    by_type: dict[str, dict[str, Any]]
    """Per seed type: seeds, valid rate and its interval."""
    errors: int
    """Seeds cut short by an infrastructure failure (counted invalid, reason "error")."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if isinstance(value, Interval) else value
        return out


def summarize_seeds(records: Sequence[SeedRecord], *, max_searches: int) -> ProposerScore:
    """The proposer's scores from its seed records; `max_searches` bounds a rollout's searches (their interval is
    clipped to [0, max_searches])."""
    n = len(records)
    if n == 0:
        raise ValueError("no seed records to score; evaluate at least one seed answer")
    written = sum(r.question_written for r in records)
    checked = sum(r.checks_passed for r in records)
    valid = [r for r in records if r.valid]
    verified = [r for r in records if r.verified is not None]
    passed = sum(bool(r.verified) for r in verified)
    solved = sum(bool(r.solved) for r in valid)
    searches = [float(r.searches) for r in records if r.end != "error"]  # "error": the rollout never finished
    by_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.type for r in records}):
        mine = [r for r in records if r.type == kind]
        ok = sum(r.valid for r in mine)
        by_type[kind] = {"seeds": len(mine), "valid_rate": ok / len(mine),
                         "valid_ci": wilson_interval(ok, len(mine)).to_json()}
    return ProposerScore(
        seeds=n,
        question_rate=written / n, question_ci=wilson_interval(written, n),
        checks_rate=checked / n, checks_ci=wilson_interval(checked, n),
        valid_rate=len(valid) / n, valid_ci=wilson_interval(len(valid), n), valid=len(valid),
        verified=len(verified),
        verify_pass_rate=passed / len(verified) if verified else None,
        verify_pass_ci=wilson_interval(passed, len(verified)) if verified else None,
        proposals=len(searches),
        searches_per_rollout=sum(searches) / len(searches) if searches else 0.0,
        searches_ci=(mean_interval(searches, low=0.0, high=float(max_searches)) if searches
                     else Interval(0.0, float(max_searches))),
        solved=solved,
        solver_accuracy=solved / len(valid) if valid else None,
        solver_ci=wilson_interval(solved, len(valid)) if valid else None,
        invalid_reasons=dict(collections.Counter(reason for r in records for reason in r.reasons).most_common()),
        by_type=by_type,
        errors=sum(r.error is not None for r in records),
    )


# ---------------------------------------------------------------- tables


@dataclass(frozen=True, slots=True)
class Metric:
    """One score with its 95% interval: a row of the proposer tables, and what before/after comparisons compare."""

    label: str
    n: int
    """What the value is measured over (seeds, verified questions, valid questions, rollouts)."""
    value: float | None
    ci: Interval | None
    percent: bool

    def shown(self) -> str:
        """"value [low, high]", in percent for rates; "-" when there is nothing to measure."""
        if self.value is None or self.ci is None:
            return f"{'-':>5}{'':<16}"
        if self.percent:
            return f"{100 * self.value:>5.1f} [{100 * self.ci.low:>5.1f}, {100 * self.ci.high:>5.1f}]"
        return f"{self.value:>5.2f} [{self.ci.low:>5.2f}, {self.ci.high:>5.2f}]"

    def delta(self, after: Metric) -> str:
        if self.value is None or after.value is None:
            return f"{'-':>6}"
        return f"{100 * (after.value - self.value):>+6.1f}" if self.percent else f"{after.value - self.value:>+6.2f}"


def proposer_metrics(s: ProposerScore) -> list[Metric]:
    """The proposer's scores in table order."""
    return [
        Metric("question written %", s.seeds, s.question_rate, s.question_ci, True),
        Metric("passed rule checks %", s.seeds, s.checks_rate, s.checks_ci, True),
        Metric("valid (passed verification) %", s.seeds, s.valid_rate, s.valid_ci, True),
        Metric("verification pass % of checked", s.verified, s.verify_pass_rate, s.verify_pass_ci, True),
        Metric("solver accuracy % on valid", s.valid, s.solver_accuracy, s.solver_ci, True),
        Metric("searches per proposer rollout", s.proposals, s.searches_per_rollout, s.searches_ci, False),
    ]


def _reasons(s: ProposerScore) -> str:
    listed = ", ".join(f"{reason} {count}" for reason, count in s.invalid_reasons.items()) or "none"
    return f"invalid reasons: {listed}"


_WIDTH = len("searches per proposer rollout") + 2


def format_proposer_table(s: ProposerScore) -> str:
    """The proposer's scores, one metric a row with what it is measured over (n) and its 95% interval, then the
    invalid reasons counted."""
    head = f"{'proposer':<{_WIDTH}}  {'n':>5}  value [95% CI]"
    lines = [head, "-" * len(head)]
    lines += [f"{m.label:<{_WIDTH}}  {m.n:>5}  {m.shown()}".rstrip() for m in proposer_metrics(s)]
    return "\n".join([*lines, _reasons(s)])


def format_proposer_comparison(before: ProposerScore, after: ProposerScore) -> str:
    """Before/after table of the proposer's scores, each with its n and 95% interval, and the change (points for
    rates), then both runs' invalid reasons."""
    head = (f"{'proposer':<{_WIDTH}}  {'n':>5}  {'before [95% CI]':<21}  {'n':>5}  {'after [95% CI]':<21}  "
            f"{'Δ':>6}")
    lines = [head, "-" * len(head)]
    for b, a in zip(proposer_metrics(before), proposer_metrics(after)):
        lines.append(f"{b.label:<{_WIDTH}}  {b.n:>5}  {b.shown()}  {a.n:>5}  {a.shown()}  {b.delta(a)}")
    return "\n".join([*lines, f"before: {_reasons(before)}", f"after:  {_reasons(after)}"])
