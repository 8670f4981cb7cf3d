"""The proposer evaluation (`ssp eval --seeds`): the held-out split, the game's phases over a scripted policy,
scoring and tables, and real evaluations (the simulated server, whose proposer writes questions its solver can
answer; SmolLM2 on the reference server, alone and through the CLI)."""

from __future__ import annotations

import collections
import importlib.util
import json
import random
import re
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from scripted_policy import QUESTION, ScriptedPolicy, TinyRetriever

from ssp.config import load_config
from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import EngineConfig, GameConfig, RolloutConfig, SchedulerConfig, SearchBatcherConfig
from ssp.engine.eval_config import HELDOUT_SEEDS
from ssp.engine.evaluation import EvalDataError, EvalResult, evaluate, format_comparison, format_table
from ssp.engine.game import Game, Proposal
from ssp.engine.intervals import Interval, wilson_interval
from ssp.engine.judge import Judge
from ssp.engine.proposer_eval import (
    EvalSeed,
    SeedRecord,
    _Episode,
    _share_distractors,
    eval_game_config,
    format_proposer_comparison,
    format_proposer_table,
    load_eval_seeds,
    run_seeds,
    summarize_seeds,
)
from ssp.engine.rollout import Rollout, RolloutRunner
from ssp.engine.search_batcher import SearchBatcher
from ssp.engine.seeds import Seed, SeedAnswer, load_seed_answers, shared_answers
from ssp.launcher.eval_cli import DEFAULT_DATASETS, qa_files
from ssp.retriever.protocol import Doc
from ssp.run_config import SSPConfig

SPLIT_SCRIPT = HELDOUT_SEEDS.parent / "split_heldout.py"
TYPES = {"person", "place", "event", "date", "year", "number", "entity"}


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(model_dir)


def _seeds_file(tmp_path: Path, n: int) -> Path:
    """The first n held-out seed answers, as a seeds file of their own."""
    lines = HELDOUT_SEEDS.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- the held-out split


def test_heldout_seeds_never_overlap_training_seeds() -> None:
    """Training draws from scheduler.seeds_file: no held-out answer may be there under any alias, compared
    case-insensitively and as the exact-match judge compares answers."""
    train = load_seed_answers(SchedulerConfig().seeds_file)
    held = load_seed_answers(HELDOUT_SEEDS)
    assert shared_answers(train, held) == []
    assert shared_answers(train, [SeedAnswer(("THE  " + train[5].aliases[0] + ".",), "x")]) != []  # as EM compares
    assert len(train) + len(held) == 18_620 and 300 <= len(held) <= 600
    types = collections.Counter(s.type for s in held)
    assert set(types) == TYPES and min(types.values()) >= 20  # stratified, every type readable on its own


def test_the_split_is_reproducible_from_the_two_files() -> None:
    spec = importlib.util.spec_from_file_location("split_heldout", SPLIT_SCRIPT)
    assert spec is not None and spec.loader is not None
    split_heldout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split_heldout)
    train = split_heldout.read_lines(split_heldout.TRAIN_FILE)
    held = split_heldout.read_lines(split_heldout.HELDOUT_FILE)
    assert split_heldout.split(train + held) == (train, held)


# ---------------------------------------------------------------- seeds and sampling


def test_hops_are_seeded_per_answer_and_stable_in_any_subset(tmp_path: Path) -> None:
    cfg = load_config(SSPConfig, None, ["scheduler.hops_min=2", "scheduler.hops_max=4"])
    seeds = load_eval_seeds(_seeds_file(tmp_path, 40), cfg)
    assert [s.index for s in seeds] == list(range(40)) and {s.seed.hops for s in seeds} == {2, 3, 4}
    assert seeds == load_eval_seeds(_seeds_file(tmp_path, 40), cfg)
    assert load_eval_seeds(_seeds_file(tmp_path, 10), cfg) == seeds[:10]
    other = load_eval_seeds(_seeds_file(tmp_path, 40), load_config(SSPConfig, None, ["eval.seed=1"]))
    assert [s.seed.hops for s in other] != [s.seed.hops for s in seeds]


def test_evaluation_game_is_greedy_and_keeps_trainings_rules() -> None:
    cfg = load_config(SSPConfig, None, ["game.verify_samples=4", "game.proposer_prefill=\"<search>\"",
                                        "game.solver_prefill=\"<think>\"", "game.solver_group_size=5"])
    game = eval_game_config(cfg)
    assert (game.proposer_temperature, game.verifier_temperature, game.solver_temperature) == (0.0, 0.0, 0.0)
    assert (game.verify_samples, game.solver_group_size, game.solver_prefill) == (1, 1, "")
    assert game.proposer_prefill == "<search>" and game.checks == cfg.game.checks and game.judge == cfg.game.judge
    sampled = eval_game_config(load_config(SSPConfig, None, ["eval.verifier_temperature=1.0",
                                                             "game.verify_samples=4"]))
    assert (sampled.verifier_temperature, sampled.verify_samples) == (1.0, 4)


# ---------------------------------------------------------------- the phases over a scripted policy


async def _run_scripted(chat: ChatTokenizer, policy: ScriptedPolicy, seeds: list[EvalSeed], *overrides: str
                        ) -> tuple[list[SeedRecord], list[SeedRecord]]:
    cfg = load_config(SSPConfig, None, ["eval.concurrency=2", *overrides])
    batcher = SearchBatcher(TinyRetriever(), SearchBatcherConfig(window_ms=1), k=2)
    done: list[SeedRecord] = []
    try:
        async with Judge(cfg.game.judge) as judge:
            runner = RolloutRunner(policy, chat, batcher, RolloutConfig())
            return await run_seeds(runner, runner, chat, judge, seeds, cfg, done.append), done
    finally:
        await batcher.close()


async def test_every_seed_goes_through_the_games_phases(chat: ChatTokenizer) -> None:
    """The scripted proposer always writes QUESTION; its verifier answers "Danube"; its one-rollout solver answers
    "Rhine". So Danube is valid but unsolved, Paris fails verification, and "river" leaks into the question."""
    policy = ScriptedPolicy(chat)
    seeds = [EvalSeed(0, Seed(("Danube", "Donau"), "place", 2)), EvalSeed(1, Seed(("Paris",), "place", 2)),
             EvalSeed(2, Seed(("river",), "entity", 3))]
    records, done = await _run_scripted(chat, policy, seeds)
    assert [r.index for r in records] == [0, 1, 2] and sorted(done, key=lambda r: r.index) == records
    danube, paris, river = records
    assert danube.valid and danube.question == QUESTION and danube.checks_passed and danube.verified
    assert danube.verify_predictions == ("Danube",) and "About step 0" in (danube.verify_documents or "")
    assert (danube.solved, danube.solver_prediction, danube.solver_judge) == (False, "Rhine", "none")
    assert danube.queries == ("step 0 towards the answer", "step 1 towards the answer") and danube.searches == 2
    assert danube.response.count("<information>") == 2 and danube.solver_response
    assert paris.reasons == ("failed_verification",) and paris.checks_passed and paris.verified is False
    assert paris.solved is None and paris.solver_response is None
    assert "answer_leak" in river.reasons and not river.checks_passed and river.verified is None
    # Greedy everywhere; one verification answer per checked question, one solver rollout per valid one.
    assert {s.temperature for _, s, _ in policy.calls} == {0.0}
    roles = collections.Counter(role for role, _, _ in policy.calls)
    assert roles["verifier"] == 2 and roles["solver"] == 2  # the solver searches once, then answers

    score = summarize_seeds(records, max_searches=10)
    assert (score.seeds, score.question_rate, score.checks_rate, score.valid_rate) == (3, 1.0, 2 / 3, 1 / 3)
    assert (score.verified, score.verify_pass_rate, score.valid, score.solved, score.solver_accuracy) == (
        2, 0.5, 1, 0, 0.0)
    assert score.invalid_reasons == {"failed_verification": 1, "answer_leak": 1} and score.errors == 0
    assert score.searches_per_rollout == 2.0 and score.searches_ci == Interval(2.0, 2.0)
    assert score.valid_ci == wilson_interval(1, 3) and score.by_type["place"]["seeds"] == 2


async def test_a_failing_server_counts_as_invalid_with_its_error(chat: ChatTokenizer) -> None:
    seeds = [EvalSeed(i, Seed(("Danube",), "place", 2)) for i in range(3)]
    records, _ = await _run_scripted(chat, ScriptedPolicy(chat, fail_every=1), seeds)
    assert all(r.reasons == ("error",) and r.end == "error" and "unreachable" in (r.error or "") for r in records)
    score = summarize_seeds(records, max_searches=10)
    assert (score.errors, score.valid, score.proposals, score.invalid_reasons) == (3, 0, 0, {"error": 3})
    assert score.searches_ci == Interval(0.0, 10.0) and score.solver_accuracy is None


def test_each_seed_verifies_against_the_proposals_before_it(chat: ChatTokenizer) -> None:
    """Distractors come from the distractor_pool_size proposals before a seed, in seed order (wrapping around), so
    they are the same whatever order the proposals finished in."""
    cfg = GameConfig(distractors=2, distractor_pool_size=2)
    runner = RolloutRunner(ScriptedPolicy(chat), chat, None, RolloutConfig())

    def episode(i: int, with_docs: bool = True) -> _Episode:
        seed = EvalSeed(i, Seed(("x",), "entity", 2))
        ep = _Episode(seed, Game(runner, chat, Judge(cfg.judge), cfg, random.Random(i)))
        rollout = Rollout(prompt_ids=array("l"), docs=[[Doc(f"doc-{i}", "T", "text", 1.0)]] if with_docs else [])
        ep.proposal = Proposal(ep.group_id, seed.seed, rollout, "q", [])
        return ep

    episodes = [episode(0), episode(1), episode(2, with_docs=False), episode(3)]
    _share_distractors(episodes, pool_size=2)

    def drawn(ep: _Episode) -> set[str]:
        return {d.id for docs in ep.game.distractors.draw(2, exclude=ep.group_id) for d in docs}

    assert [drawn(ep) for ep in episodes] == [{"doc-3"}, {"doc-0", "doc-3"}, {"doc-0", "doc-1"}, {"doc-1"}]


# ---------------------------------------------------------------- tables and errors


def _score(valid: int, seeds: int = 8):  # type: ignore[no-untyped-def]
    records = [SeedRecord(index=i, answer=("a",), type="entity", hops=2, question="q" if i < seeds - 1 else None,
                          reasons=() if i < valid else ("no_question",) if i == seeds - 1 else ("too_short",),
                          checks_passed=i < valid, verified=True if i < valid else None,
                          verify_fraction=1.0 if i < valid else None, verify_predictions=(), verify_documents=None,
                          searches=i % 3, queries=(), turns=1, end="question", generated_tokens=5, text="", response="",
                          solved=(i == 0) if i < valid else None, solver_prediction=None, solver_judge=None,
                          solver_searches=None, solver_queries=(), solver_end=None, solver_response=None,
                          elapsed_s=0.1) for i in range(seeds)]
    return summarize_seeds(records, max_searches=4)


def test_proposer_tables_show_each_metric_with_its_interval() -> None:
    before, after = _score(valid=2), _score(valid=5)
    table = format_proposer_table(before)
    assert "valid (passed verification) %" in table and " 25.0 [" in table and "too_short 5" in table
    assert "solver accuracy % on valid" in table and "50.0" in table
    comparison = format_proposer_comparison(before, after)
    assert "+37.5" in comparison and "before: invalid reasons" in comparison and "after:  invalid" in comparison
    empty = format_proposer_table(_score(valid=0))
    assert re.search(r"solver accuracy % on valid +0 +-\n", empty)  # no valid question: nothing to measure
    json.dumps(before.to_json())  # summary.json can hold it


def test_comparison_needs_the_proposer_on_both_sides() -> None:
    def result(valid: int | None) -> EvalResult:
        return EvalResult(model="m", datasets=(), average=None, wall_s=1.0, out_dir=Path("."),
                          proposer=_score(valid) if valid is not None else None)

    assert "proposer" in format_comparison(result(1), result(3)) and "dataset" not in format_table(result(1))
    with pytest.raises(ValueError, match="same seeds"):
        format_comparison(result(1), result(None))


def test_seed_file_problems_fail_before_anything_starts(tmp_path: Path) -> None:
    cfg = EngineConfig()
    with pytest.raises(EvalDataError, match="nothing to evaluate"):
        evaluate(cfg, [], server_url="http://127.0.0.1:9", out_dir=tmp_path / "o")
    with pytest.raises(EvalDataError, match=r"seed file .*nope\.jsonl does not exist.*heldout_seed_answers"):
        evaluate(cfg, [], server_url="http://127.0.0.1:9", seeds=tmp_path / "nope.jsonl", out_dir=tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "Paris", "type": "place"}\n{"type": "place"}\n', encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"bad\.jsonl:2: 'answer' must be a non-empty string"):
        evaluate(cfg, [], server_url="http://127.0.0.1:9", seeds=bad, out_dir=tmp_path / "o")
    with pytest.raises(EvalDataError, match="seeds_limit = -1"):
        evaluate(cfg, [], server_url="http://127.0.0.1:9", seeds=bad, seeds_limit=-1, out_dir=tmp_path / "o")


def test_cli_needs_no_qa_file_for_the_proposer() -> None:
    seeds, mine = HELDOUT_SEEDS, [Path("mine.jsonl")]
    assert qa_files(None, seeds=None, limit=None) == list(DEFAULT_DATASETS)
    assert qa_files(None, seeds=seeds, limit=None) == []
    assert qa_files(None, seeds=seeds, limit=20) == list(DEFAULT_DATASETS)  # --limit asks for QA too
    assert qa_files(mine, seeds=seeds, limit=None) == mine


# ---------------------------------------------------------------- real evaluations


def _cfg(index: Path, *extra: str) -> EngineConfig:
    return load_config(SSPConfig, None, [f'retriever.index_dir="{index}"', "search.window_ms=1", *extra]).engine()


def _check_outputs(result: EvalResult, seeds: int) -> tuple[dict, list[dict]]:
    summary = json.loads((result.out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (result.out_dir / "proposer_records.jsonl").read_text().splitlines()]
    assert result.proposer is not None and len(records) == summary["proposer"]["seeds"] == seeds
    p = summary["proposer"]
    assert p["valid"] == sum(r["valid"] for r in records) and p["errors"] == 0
    assert p["question_rate"] == sum(r["question_written"] for r in records) / seeds
    assert p["checks_rate"] == sum(r["checks_passed"] for r in records) / seeds
    assert p["verified"] == sum(r["verified"] is not None for r in records)
    assert p["searches_per_rollout"] == pytest.approx(sum(r["searches"] for r in records) / seeds)
    assert p["invalid_reasons"] == dict(collections.Counter(x for r in records for x in r["reasons"]))
    for r in records:
        assert r["valid"] == (r["question_written"] and r["checks_passed"] and r["verified"] is True)
        assert r["searches"] == len(r["queries"]) and (r["solved"] is None) == (not r["valid"])
        assert (r["verify_documents"] is None) == (r["verified"] is None)
    assert summary["protocol"]["proposer"]["proposer_temperature"] == 0.0
    assert summary["files"]["seeds"].endswith("seeds.jsonl")
    return summary, records


@pytest.mark.slow
def test_proposer_eval_on_the_sim_server_reaches_every_stage(  # type: ignore[no-untyped-def]
        sim_launcher, demo_index: Path, tmp_path: Path) -> None:
    """The simulated proposer searches the real index and writes questions that pass the checks; with
    correct_answer_p = 1 its verifier and solver answer them, so verification and the solver run for real."""
    server = sim_launcher(profile_toml="[sim]\ncorrect_answer_p = 1.0")
    seeds = _seeds_file(tmp_path, 10)  # about 60% pass the checks: all 10 failing has odds of 1 in 10^4
    result = evaluate(_cfg(demo_index), [], server_url=server.url, seeds=seeds, out_dir=tmp_path / "out", progress=False)
    summary, records = _check_outputs(result, 10)
    assert result.average is None and not (result.out_dir / "records.jsonl").exists()
    valid = [r for r in records if r["valid"]]
    assert valid and all(r["solver_response"] and r["verify_predictions"] for r in valid)
    assert summary["proposer_search"]["search_queries"] >= sum(r["searches"] for r in records) > 0
    assert "proposer" in format_table(result)


@pytest.mark.slow
def test_proposer_and_qa_eval_of_smollm2_on_the_reference_server(ref_server: str, demo_index: Path,
                                                                  tmp_path: Path) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q1", "question": "What is the capital of France?", "golden_answers": ["Paris"]})
                  + "\n", encoding="utf-8")
    cfg = _cfg(demo_index, "rollout.max_turns=2", "rollout.max_new_tokens_per_turn=16", "eval.max_turns=2",
               "eval.max_new_tokens_per_turn=16", "game.verify_max_new_tokens=16", 'game.proposer_prefill="<search>"')
    result = evaluate(cfg, [qa], server_url=ref_server, seeds=_seeds_file(tmp_path, 2), out_dir=tmp_path / "out",
                      progress=False)
    summary, records = _check_outputs(result, 2)
    assert all(r["turns"] <= 2 and r["generated_tokens"] <= 2 * 16 for r in records)
    assert all(r["text"].startswith("<search>") for r in records)  # the game's prefill, as in training
    assert result.average is not None and summary["average"]["questions"] == 1
    assert summary["average"]["em_ci"][1] > 0  # even 0 of 1 leaves an interval
    table = format_table(result)
    assert "qa" in table and "proposer" in table and "[95% CI]" in table


@pytest.mark.slow
def test_cli_evaluates_only_the_proposer_with_seeds(ref_server: str, demo_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ssp.cli", "eval", "--model", ref_server, "--seeds", str(_seeds_file(tmp_path, 3)),
         "--seeds-limit", "1", "--no-progress", "--set", f'retriever.index_dir="{demo_index}"',
         "--set", f'eval.out_dir="{out}"', "--set", "rollout.max_turns=1",
         "--set", "rollout.max_new_tokens_per_turn=8"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "proposer" in proc.stdout and "valid (passed verification) %" in proc.stdout
    assert "dataset" not in proc.stdout and "proposer_records.jsonl" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["proposer"]["seeds"] == 1 and summary["datasets"] == [] and summary["average"] is None
    assert not (out / "records.jsonl").exists()
