"""Evaluation: the solver on QA benchmarks with the Search-R1 protocol (EM, token F1, answer rate, searches per
question), and the proposer on held-out seed answers (engine/proposer_eval.py); every score with a 95% interval.

    dataset files ({id, question, golden_answers} JSONL)      load_dataset: every line checked, errors name file:line
      └─ pick(limit, seed): the same seeded subset every run, so before/after scores compare like with like
    seed answers (data/seeds schema, optional)                 load_eval_seeds, then pick(seeds_limit, seed)
    evaluate(cfg, datasets, server_url=URL|None, seeds=FILE|None)
      ├─ InferencePool([inference] or the URL; a server started for the evaluation, `ssp eval --model DIR`, is
      │    the launcher's: its death stops the evaluation), make_retriever([retriever]) + SearchBatcher(k = eval.topk), and
      │    for the proposer a SearchBatcher(k = retriever.topk) and the game's Judge
      ├─ seeds: proposer_eval.run_seeds, the game's propose → verify → solve per seed → SeedRecord, appended to
      │    proposer_records.jsonl at once
      ├─ run_questions: eval.concurrency workers, each takes the next question and runs one solver rollout
      │    (solver prompt, greedy, eval.max_turns turns of eval.max_new_tokens_per_turn tokens) → QuestionRecord,
      │    appended to records.jsonl at once, so a killed run keeps every finished question
      └─ score per dataset and their unweighted mean (the "Avg" column of the paper's Table 1), and the proposer's
         rates → summary.json

A question's prediction is the last <answer>...</answer> of the model's own text (the block SSP grades). EM is true
when the SQuAD-normalised prediction equals any normalised golden answer; F1 is the best token F1 over the golden
answers; no answer scores 0 on both. A question whose rollout failed for infrastructure reasons (server or
retriever) is recorded with its error, scored 0 (fail closed) and counted in `errors`. Intervals (engine/intervals.py):
Wilson for EM, Student t for F1, and for the average over datasets the same at their pooled uncertainty; an interval
says how far the score could move on another sample of questions like these.

`evaluate` is synchronous and owns its event loop; from async code call it with `asyncio.to_thread(evaluate, ...)`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import random
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

from ssp.config import to_toml
from ssp.engine.chat import ChatTokenizer
from ssp.engine.checks import extract_answer
from ssp.engine.config import EngineConfig
from ssp.engine.eval_config import HELDOUT_SEEDS, EvalConfig
from ssp.engine.intervals import (
    Interval,
    mean_interval,
    mean_of_means_interval,
    mean_of_rates_interval,
    separation,
    wilson_interval,
)
from ssp.engine.judge import Judge, exact_match, token_f1
from ssp.engine.pool import InferencePool
from ssp.engine.prompts import ANSWER_CLOSE, ANSWER_OPEN, solver_messages
from ssp.engine.proposer_eval import (
    EvalSeed,
    Metric,
    ProposerScore,
    SeedRecord,
    eval_game_config,
    format_proposer_comparison,
    format_proposer_table,
    load_eval_seeds,
    proposer_metrics,
    run_seeds,
    summarize_seeds,
)
from ssp.engine.rollout import RolloutError, RolloutRunner, RolloutSpec
from ssp.engine.search_batcher import SearchBatcher
from ssp.engine.seeds import SeedError
from ssp.metrics import MetricsLog
from ssp.paths import artifacts_dir, default_model_dir
from ssp.processes import ManagedProcess
from ssp.retriever.registry import make_retriever

T = TypeVar("T")


class EvalDataError(ValueError):
    """An evaluation file (QA or seeds) is missing or has a malformed line; the message names the file, the line
    and the fix."""


# ---------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalQuestion:
    """One benchmark question, as read from its file."""

    id: str
    question: str
    golden_answers: tuple[str, ...]
    """Every accepted answer (aliases); a prediction matching any of them is correct."""
    line: int
    """1-based line number in its file, for messages."""


def load_dataset(path: Path) -> list[EvalQuestion]:
    """All questions of a `{id, question, golden_answers}` JSONL file. Blank lines are skipped; anything else that
    is not such an object (bad JSON, a missing or empty field, answers that are not a list of strings, a repeated
    id) raises EvalDataError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"dataset file {path} does not exist; pass an existing JSONL file to --dataset") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e}); eval files are JSONL, one JSON object per line") from None
    questions: list[EvalQuestion] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                'object like {"id": "q1", "question": "...", "golden_answers": ["..."]}') from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{where}: expected a JSON object with id, question and golden_answers, got "
                                f"{type(obj).__name__}")
        qid, question, answers = obj.get("id"), obj.get("question"), obj.get("golden_answers")
        if isinstance(qid, bool) or not isinstance(qid, str | int) or str(qid).strip() == "":
            raise EvalDataError(f"{where}: 'id' is {qid!r}; every question needs a non-empty string (or integer) id")
        if not isinstance(question, str) or not question.strip():
            raise EvalDataError(f"{where}: 'question' is {question!r}; it must be a non-empty string")
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise EvalDataError(f"{where}: 'golden_answers' is {answers!r}; it must be a non-empty list of "
                                'non-empty strings, e.g. ["Paris"] (a bare string is not accepted)')
        qid = str(qid)
        if qid in seen:
            raise EvalDataError(f"{where}: id {qid!r} already used on line {seen[qid]}; ids must be unique in a file")
        seen[qid] = number
        questions.append(EvalQuestion(id=qid, question=question.strip(), golden_answers=tuple(answers), line=number))
    if not questions:
        raise EvalDataError(f"{path}: no questions (the file is empty); pass a JSONL file with at least one line")
    return questions


def pick(items: Sequence[T], limit: int, seed: int) -> list[T]:
    """A seeded random subset of `limit` items (questions, seed answers) in file order (all of them when limit is 0
    or covers the file)."""
    if limit == 0 or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def dataset_name(path: Path) -> str:
    """A dataset's name in tables and JSON: its file name without the extension."""
    return path.name.removesuffix(".jsonl")


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True, kw_only=True, slots=True)
class QuestionRecord:
    """What happened on one question: the prediction, its scores, the searches, and the full response text."""

    dataset: str
    id: str
    question: str
    golden_answers: tuple[str, ...]
    prediction: str | None
    """The last <answer> block, stripped; None when the model gave none."""
    em: bool
    f1: float
    searches: int
    """Searches executed (a search asked for in the last allowed turn is not executed, so not counted)."""
    queries: tuple[str, ...]
    turns: int
    end: str
    """Why the rollout ended (ssp.engine.rollout.EndReason), or "error"."""
    generated_tokens: int
    elapsed_s: float
    response: str
    """The whole response as the model saw it: its own turns and the <information> blocks, decoded."""
    error: str | None = None
    """The infrastructure failure that cut this question short (it then scores 0)."""

    @property
    def answered(self) -> bool:
        return self.prediction is not None and self.prediction.strip() != ""

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["answered"] = self.answered
        return out


def score(prediction: str | None, golden_answers: Sequence[str]) -> tuple[bool, float]:
    """(EM, F1) of a prediction against any golden answer; no answer (None or blank) scores (False, 0.0)."""
    if prediction is None or not prediction.strip():
        return False, 0.0
    return exact_match(prediction, golden_answers), token_f1(prediction, golden_answers)


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetScore:
    """Scores of one dataset (or their average). Rates are fractions in [0, 1]; tables show them as percentages."""

    name: str
    questions: int
    em: float
    """Share of questions whose prediction exactly matches a golden answer (after normalisation)."""
    em_ci: Interval
    """95% interval of `em` (Wilson)."""
    f1: float
    """Mean over questions of the best token F1 against the golden answers."""
    f1_ci: Interval
    """95% interval of `f1` (Student t, within [0, 1])."""
    f1_sd: float | None
    """Sample standard deviation of F1 over the questions (None for one question); the average's interval needs
    it."""
    answered: float
    """Share of questions with a non-empty <answer>."""
    searches_per_question: float
    errors: int
    """Questions cut short by an infrastructure failure (scored 0)."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: (v.to_json() if isinstance(v := getattr(self, f.name), Interval) else v)
                for f in dataclasses.fields(self)}


def summarize(name: str, records: Sequence[QuestionRecord]) -> DatasetScore:
    """The scores of one dataset's records, with their intervals."""
    n = len(records)
    if n == 0:
        raise ValueError(f"dataset {name!r} has no records to score")
    f1s = [r.f1 for r in records]
    return DatasetScore(
        name=name,
        questions=n,
        em=sum(r.em for r in records) / n,
        em_ci=wilson_interval(sum(r.em for r in records), n),
        f1=sum(f1s) / n,
        f1_ci=mean_interval(f1s, low=0.0, high=1.0),
        f1_sd=statistics.stdev(f1s) if n > 1 else None,
        answered=sum(r.answered for r in records) / n,
        searches_per_question=sum(r.searches for r in records) / n,
        errors=sum(r.error is not None for r in records),
    )


def average(scores: Sequence[DatasetScore]) -> DatasetScore:
    """Unweighted mean over datasets (each dataset counts once, whatever its size), as in the paper's Avg column.
    `questions` and `errors` are totals; the intervals combine the datasets' (ssp.engine.intervals), and for one
    dataset are its own."""
    if not scores:
        raise ValueError("no dataset scores to average")
    n = len(scores)
    sizes = [s.questions for s in scores]
    return DatasetScore(
        name="average",
        questions=sum(sizes),
        em=sum(s.em for s in scores) / n,
        em_ci=mean_of_rates_interval([s.em for s in scores], sizes),
        f1=sum(s.f1 for s in scores) / n,
        f1_ci=mean_of_means_interval([s.f1 for s in scores], [s.f1_sd for s in scores], sizes, low=0.0, high=1.0),
        f1_sd=None,
        answered=sum(s.answered for s in scores) / n,
        searches_per_question=sum(s.searches_per_question for s in scores) / n,
        errors=sum(s.errors for s in scores),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalResult:
    """The outcome of `evaluate`: per-dataset scores in the order the files were given and their average (when QA
    files were given), the proposer's scores (when seeds were given), and where the files went."""

    model: str
    """The model directory or server URL(s) evaluated."""
    datasets: tuple[DatasetScore, ...]
    """Empty when only the proposer was evaluated."""
    average: DatasetScore | None
    """None when only the proposer was evaluated."""
    wall_s: float
    out_dir: Path
    """Holds summary.json, records.jsonl and/or proposer_records.jsonl, config.toml (and logs/server.log when a
    server was started)."""
    proposer: ProposerScore | None = None
    """None when no seeds were evaluated."""

    @property
    def errors(self) -> int:
        """Questions and seeds cut short by infrastructure failures (they are scored 0 / invalid)."""
        return (self.average.errors if self.average else 0) + (self.proposer.errors if self.proposer else 0)

    def score(self, name: str) -> DatasetScore:
        """The scores of the dataset called `name` (its file name without .jsonl)."""
        for s in self.datasets:
            if s.name == name:
                return s
        raise KeyError(f"no dataset {name!r} in this result; it has {[s.name for s in self.datasets]}")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "datasets": [s.to_json() for s in self.datasets],
                "average": self.average.to_json() if self.average else None,
                "proposer": self.proposer.to_json() if self.proposer else None,
                "wall_s": round(self.wall_s, 3), "out_dir": str(self.out_dir)}


# ---------------------------------------------------------------- the loop


def solver_spec(cfg: EvalConfig) -> RolloutSpec:
    """The Search-R1 solver rollout: searches run, </answer> ends it, eval.temperature (0 = greedy)."""
    return RolloutSpec(final_open=ANSWER_OPEN, final_close=ANSWER_CLOSE, search=True, temperature=cfg.temperature)


async def answer_one(runner: RolloutRunner, chat: ChatTokenizer, spec: RolloutSpec, dataset: str,
                     q: EvalQuestion) -> QuestionRecord:
    """One solver rollout on one question, scored."""
    started = time.perf_counter()
    prompt = await chat.render(solver_messages(q.question))
    common: dict[str, Any] = {"dataset": dataset, "id": q.id, "question": q.question,
                              "golden_answers": q.golden_answers}
    try:
        ro = await runner.run(prompt, spec, affinity=f"eval/{dataset}/{q.id}")
    except RolloutError as e:
        return QuestionRecord(**common, prediction=None, em=False, f1=0.0, searches=0, queries=(), turns=0,
                              end="error", generated_tokens=0, elapsed_s=round(time.perf_counter() - started, 3),
                              response="", error=str(e))
    prediction = extract_answer(ro.generated_text)
    em, f1 = score(prediction, q.golden_answers)
    return QuestionRecord(**common, prediction=prediction, em=em, f1=f1, searches=len(ro.searches),
                          queries=tuple(s.query for s in ro.searches), turns=ro.turns, end=str(ro.end),
                          generated_tokens=ro.generated_tokens, elapsed_s=round(time.perf_counter() - started, 3),
                          response=chat.decode(ro.response_ids))


async def run_questions(runner: RolloutRunner, chat: ChatTokenizer, work: Sequence[tuple[str, EvalQuestion]],
                        cfg: EvalConfig, on_done: Callable[[QuestionRecord], None]) -> list[QuestionRecord]:
    """Answer every (dataset, question) with at most cfg.concurrency in flight; records come back in input order
    and each is passed to `on_done` as soon as it is finished."""
    spec = solver_spec(cfg)
    records: list[QuestionRecord | None] = [None] * len(work)
    todo = iter(range(len(work)))  # shared by the workers: each index is taken exactly once

    async def worker() -> None:
        for i in todo:
            dataset, question = work[i]
            record = await answer_one(runner, chat, spec, dataset, question)
            records[i] = record
            on_done(record)

    async with asyncio.TaskGroup() as tg:
        for w in range(min(cfg.concurrency, len(work))):
            tg.create_task(worker(), name=f"eval-worker-{w}")
    assert all(r is not None for r in records), "every question is answered once the workers finish"
    return [r for r in records if r is not None]


async def _unless_dead(work: Coroutine[Any, Any, T], process: ManagedProcess) -> T:
    """Run `work`, but fail with ProcessFailed (naming the log) as soon as `process` dies, instead of letting every
    remaining question fail slowly against a dead server."""

    async def watch() -> None:
        while process.alive():
            await asyncio.sleep(0.5)
        raise process.failure()

    work_task = asyncio.create_task(work, name="eval-work")
    watch_task = asyncio.create_task(watch(), name="eval-watch-server")
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if watch_task in done:
            watch_task.result()  # raises ProcessFailed
        return work_task.result()
    finally:
        for task in (work_task, watch_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


async def _run_all(cfg: EngineConfig, questions: Sequence[tuple[str, EvalQuestion]], seeds: Sequence[EvalSeed], *,
                   urls: tuple[str, ...] | None, chat: ChatTokenizer, server: ManagedProcess | None,
                   on_question: Callable[[QuestionRecord], None], on_seed: Callable[[SeedRecord], None]
                   ) -> tuple[list[QuestionRecord], list[SeedRecord], dict[str, Any]]:
    """The async part of `evaluate`: pool, retriever, batchers and judge around `run_seeds` (the proposer, first)
    and `run_questions`. The solver runs with the [eval] protocol's budgets and eval.topk documents per search; the
    proposer and its verification with training's ([rollout], retriever.topk)."""
    inference = cfg.inference if urls is None else dataclasses.replace(cfg.inference, server_urls=urls,
                                                                       router_url=None)
    rollout = dataclasses.replace(cfg.rollout, max_turns=cfg.eval.max_turns,
                                  max_new_tokens_per_turn=cfg.eval.max_new_tokens_per_turn)
    retriever = make_retriever(cfg.retriever)
    batcher = SearchBatcher(retriever, cfg.search, k=cfg.eval.topk, prepare=chat.cache_documents)
    game_batcher = SearchBatcher(retriever, cfg.search, k=cfg.retriever.topk, prepare=chat.cache_documents)
    try:
        async with InferencePool(inference) as pool, Judge(cfg.game.judge) as judge:
            runner = RolloutRunner(pool, chat, batcher, rollout)

            async def both() -> tuple[list[QuestionRecord], list[SeedRecord]]:
                seed_records = await run_seeds(RolloutRunner(pool, chat, game_batcher, cfg.rollout), runner, chat,
                                               judge, seeds, cfg, on_seed) if seeds else []
                question_records = await run_questions(runner, chat, questions, cfg.eval, on_question)
                return question_records, seed_records

            question_records, seed_records = await (both() if server is None else _unless_dead(both(), server))
            stats: dict[str, Any] = {"pool": pool.metrics().to_json(), "search": batcher.stats.summary()}
            if seeds:
                stats |= {"proposer_search": game_batcher.stats.summary(), "judge": dict(judge.counts)}
            return question_records, seed_records, stats
    finally:
        await batcher.close()
        await game_batcher.close()
        await retriever.close()


def eval_out_dir(cfg: EvalConfig, out_dir: Path | None = None) -> Path:
    """Where an evaluation writes (created): `out_dir`, else eval.out_dir, else artifacts/eval/<time>/. The launcher
    asks for it before `evaluate` to put the log of a server it starts for the evaluation beside the results."""
    out = out_dir or cfg.out_dir or artifacts_dir() / "eval" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(cfg: EngineConfig, datasets: Sequence[Path], *, server_url: str | None = None,
             server_process: ManagedProcess | None = None, tokenizer_dir: Path | None = None,
             model_label: str | None = None, limit: int | None = None, out_dir: Path | None = None,
             progress: bool = True, seeds: Path | None = None, seeds_limit: int | None = None) -> EvalResult:
    """Score a model on QA files with the Search-R1 protocol and/or its proposer on seed answers (see the module
    docstring), and write the results.

    server_url: one server's base URL "http://host:port", or None for the servers of cfg.inference (e.g. the ones
    `ssp train` runs). server_process: the process behind server_url when the caller started it (the launcher does
    for `ssp eval --model DIR`): its death fails the evaluation at once, naming its log, instead of every remaining
    question failing slowly. tokenizer_dir: the served model's tokenizer (default cfg.rollout.tokenizer_dir, else
    the prepared default model). model_label: how the summary names the model (default: the URL or servers).
    datasets: QA files, one dataset each; may be empty when `seeds` is given.
    limit: questions per file, overriding cfg.eval.limit (0 = all). out_dir overrides cfg.eval.out_dir.
    seeds: a seed-answer file (data/seeds schema, e.g. eval_config.HELDOUT_SEEDS) to evaluate the proposer on;
    seeds_limit: how many of its answers, overriding cfg.eval.seeds_limit (0 = all).
    """
    if not datasets and seeds is None:
        raise EvalDataError("nothing to evaluate: no QA files and no seed answers given; pass QA files (--dataset) "
                            "and/or a seed-answer file (--seeds)")
    names = [dataset_name(p) for p in datasets]
    if len(set(names)) != len(names):
        raise EvalDataError(f"dataset files {[str(p) for p in datasets]} share a file name; each dataset is named "
                            "after its file, so give them distinct names")
    limit = cfg.eval.limit if limit is None else limit
    if limit < 0:
        raise EvalDataError(f"limit = {limit}: must be >= 0 (0 = every question)")
    seeds_limit = cfg.eval.seeds_limit if seeds_limit is None else seeds_limit
    if seeds_limit < 0:
        raise EvalDataError(f"seeds_limit = {seeds_limit}: must be >= 0 (0 = every seed answer)")
    # Read every file before starting anything, so a bad line fails in a second, not after a server start.
    work = [(name, q) for name, path in zip(names, datasets)
            for q in pick(load_dataset(path), limit, cfg.eval.seed)]
    seed_work = pick(_load_seeds(seeds, cfg), seeds_limit, cfg.eval.seed) if seeds is not None else []
    if server_url is not None and not server_url.startswith(("http://", "https://")):
        raise EvalDataError(f"server URL {server_url!r}: not an http(s) URL; pass a server's base URL "
                            "http://host:port")
    out = eval_out_dir(cfg.eval, out_dir)
    (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8")

    started = time.perf_counter()
    chat = ChatTokenizer.load(tokenizer_dir or cfg.rollout.tokenizer_dir or default_model_dir())
    for name in ("records.jsonl", "proposer_records.jsonl"):  # this run's records only, even in a reused out_dir
        (out / name).unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        urls = None if server_url is None else (server_url.rstrip("/"),)
        label = model_label or (server_url if server_url is not None else
                                cfg.inference.router_url or ", ".join(cfg.inference.server_urls))
        # A part with no work writes no records file and shows no bar (its callback is never called).
        on_question = _progress(stack, out / "records.jsonl", len(work), "eval", "q", progress,
                                lambda r: r.em, "em") if work else lambda r: None
        on_seed = _progress(stack, out / "proposer_records.jsonl", len(seed_work), "proposer", "seed", progress,
                            lambda r: r.valid, "valid") if seed_work else lambda r: None
        records, seed_records, stats = asyncio.run(_run_all(cfg, work, seed_work, urls=urls, chat=chat,
                                                            server=server_process, on_question=on_question,
                                                            on_seed=on_seed))
    scores = tuple(summarize(name, [r for r in records if r.dataset == name]) for name in names)
    proposer = summarize_seeds(seed_records, max_searches=cfg.rollout.max_turns) if seed_records else None
    result = EvalResult(model=label, datasets=scores, average=average(scores) if scores else None,
                        proposer=proposer, wall_s=time.perf_counter() - started, out_dir=out)
    summary = {
        **result.to_json(),
        "protocol": {"max_turns": cfg.eval.max_turns, "max_new_tokens_per_turn": cfg.eval.max_new_tokens_per_turn,
                     "topk": cfg.eval.topk, "temperature": cfg.eval.temperature, "limit": limit,
                     "seed": cfg.eval.seed, "concurrency": cfg.eval.concurrency},
        "files": {name: str(path) for name, path in zip(names, datasets)},
        "end_reasons": dict(sorted(collections.Counter(r.end for r in records).items())),
        **stats,
    }
    if seeds is not None:
        game = eval_game_config(cfg)
        summary["protocol"]["proposer"] = {
            "seeds_limit": seeds_limit, "proposer_temperature": game.proposer_temperature,
            "verifier_temperature": game.verifier_temperature, "verify_samples": game.verify_samples,
            "verify_threshold": game.verify_threshold, "proposer_prefill": game.proposer_prefill,
            "max_turns": cfg.rollout.max_turns, "max_new_tokens_per_turn": cfg.rollout.max_new_tokens_per_turn,
            "topk": cfg.retriever.topk, "hops": [cfg.scheduler.hops_min, cfg.scheduler.hops_max]}
        summary["files"]["seeds"] = str(seeds)
        summary["proposer_end_reasons"] = dict(sorted(collections.Counter(r.end for r in seed_records).items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result


def _load_seeds(path: Path, cfg: EngineConfig) -> list[EvalSeed]:
    """The seed answers of `path` for the proposer evaluation; a missing file or bad line is an EvalDataError."""
    if not path.is_file():
        raise EvalDataError(f"seed file {path} does not exist; pass a JSONL of {{\"answer\": ..., \"type\": ...}} "
                            f"lines to --seeds (the held-out one is {HELDOUT_SEEDS})")
    try:
        return load_eval_seeds(path, cfg)
    except SeedError as e:
        raise EvalDataError(str(e)) from None


class _Record(Protocol):
    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Record)


def _progress(stack: contextlib.ExitStack, path: Path, total: int, desc: str, unit: str, show: bool,
              hit: Callable[[R], bool], hit_name: str) -> Callable[[R], None]:
    """A callback that appends each finished record to `path` at once (a killed run keeps them) and advances a
    progress bar showing the share of records for which `hit` holds."""
    log = stack.enter_context(MetricsLog(path))
    bar = stack.enter_context(tqdm(total=total, desc=desc, unit=unit, disable=not show))
    done = hits = 0

    def on_done(record: R) -> None:
        nonlocal done, hits
        log.write(record.to_json())
        done += 1
        hits += hit(record)
        bar.update(1)
        bar.set_postfix({hit_name: f"{100 * hits / done:.1f}%"}, refresh=False)

    return on_done


# ---------------------------------------------------------------- tables


def _with_ci(value: float, ci: Interval) -> str:
    """A rate or mean in [0, 1] as "value [low, high]" in percent."""
    return f"{100 * value:>5.1f} [{100 * ci.low:>5.1f}, {100 * ci.high:>5.1f}]"


_CI_WIDTH = len(_with_ci(0.0, Interval(0.0, 0.0)))


def format_table(result: EvalResult) -> str:
    """The scores as fixed-width tables: one row per dataset and the average last (rates in percent, EM and F1
    with their 95% intervals), then the proposer's table when seeds were evaluated."""
    parts = []
    if result.average is not None:
        rows = [*result.datasets, result.average]
        width = max(len("dataset"), *(len(s.name) for s in rows))
        head = (f"{'dataset':<{width}}  {'n':>5}  {'EM % [95% CI]':<{_CI_WIDTH}}  {'F1 % [95% CI]':<{_CI_WIDTH}}  "
                f"{'answered %':>10}  {'searches/q':>10}  errors")
        lines = [head, "-" * len(head)]
        for s in rows:
            if s is result.average:
                lines.append("-" * len(head))
            lines.append(f"{s.name:<{width}}  {s.questions:>5}  {_with_ci(s.em, s.em_ci)}  {_with_ci(s.f1, s.f1_ci)}  "
                         f"{100 * s.answered:>10.1f}  {s.searches_per_question:>10.2f}  {s.errors:>6}")
        parts.append("\n".join(lines))
    if result.proposer is not None:
        parts.append(format_proposer_table(result.proposer))
    return "\n\n".join(parts)


def compared_metrics(before: EvalResult, after: EvalResult) -> list[tuple[Metric, Metric]]:
    """The scores two results share, as (before, after) pairs with their intervals: the QA average's EM and F1, then
    the proposer's metrics; a metric with nothing to measure on either side (no valid question) is left out."""
    pairs: list[tuple[Metric, Metric]] = []
    if before.average is not None and after.average is not None:
        for label, get in (("QA exact match %", lambda s: (s.em, s.em_ci)), ("QA token F1 %", lambda s: (s.f1, s.f1_ci))):
            pairs.append(tuple(Metric(label, s.questions, *get(s), True)  # type: ignore[misc]
                               for s in (before.average, after.average)))
    if before.proposer is not None and after.proposer is not None:
        pairs += list(zip(proposer_metrics(before.proposer), proposer_metrics(after.proposer)))
    return [(b, a) for b, a in pairs if b.ci is not None and a.ci is not None]


def describe_changes(before: EvalResult, after: EvalResult) -> str:
    """In plain words, which scores moved between the two results (their 95% intervals do not overlap: see
    ssp.engine.intervals.separation) and which did not."""
    moved, still = [], []
    for b, a in compared_metrics(before, after):
        assert b.ci is not None and a.ci is not None
        direction = separation(b.ci, a.ci)
        if direction:
            moved.append(f"{b.label.rstrip(' %')} {'rose' if direction > 0 else 'fell'}, {b.shown().strip()} -> "
                         f"{a.shown().strip()}")
        else:
            still.append(b.label.rstrip(" %"))
    lines = ["What moved (95% intervals apart): " + ("; ".join(moved) if moved else "nothing.")]
    if still:
        lines.append("What did not move (intervals overlap, the change is within noise): " + ", ".join(still) + ".")
    return "\n".join(lines)


def format_comparison(before: EvalResult, after: EvalResult) -> str:
    """Before/after tables (e.g. around training): EM and F1 per dataset and averaged, each with its 95% interval,
    and the change in points; then the proposer's scores likewise when both results have them. Both results must
    cover the same datasets, and both or neither the proposer."""
    if [s.name for s in before.datasets] != [s.name for s in after.datasets]:
        raise ValueError(f"cannot compare results over different datasets: {[s.name for s in before.datasets]} vs "
                         f"{[s.name for s in after.datasets]}; evaluate both on the same files")
    if (before.proposer is None) != (after.proposer is None):
        raise ValueError("cannot compare a result with proposer scores to one without: evaluate both with the same "
                         "seeds (or both without)")
    parts = []
    if before.average is not None and after.average is not None:
        pairs = [*zip(before.datasets, after.datasets), (before.average, after.average)]
        width = max(len("dataset"), *(len(b.name) for b, _ in pairs))
        head = (f"{'dataset':<{width}}  {'n':>5}  {'EM before':<{_CI_WIDTH}}  {'EM after':<{_CI_WIDTH}}  "
                f"{'Δ EM':>6}  {'F1 before':<{_CI_WIDTH}}  {'F1 after':<{_CI_WIDTH}}  {'Δ F1':>6}  {'searches/q':>12}")
        lines = [head, "-" * len(head)]
        for b, a in pairs:
            if b is before.average:
                lines.append("-" * len(head))
            lines.append(f"{b.name:<{width}}  {b.questions:>5}  {_with_ci(b.em, b.em_ci)}  {_with_ci(a.em, a.em_ci)}  "
                         f"{100 * (a.em - b.em):>+6.1f}  {_with_ci(b.f1, b.f1_ci)}  {_with_ci(a.f1, a.f1_ci)}  "
                         f"{100 * (a.f1 - b.f1):>+6.1f}  "
                         f"{b.searches_per_question:>5.2f}→{a.searches_per_question:<5.2f}")
        lines.append("EM and F1 in percent, each with its 95% interval [low, high]; Δ in points")
        parts.append("\n".join(lines))
    if before.proposer is not None and after.proposer is not None:
        parts.append(format_proposer_comparison(before.proposer, after.proposer))
    parts.append(describe_changes(before, after))
    return "\n\n".join(parts)
