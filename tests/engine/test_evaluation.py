"""`ssp eval` on QA files: scoring (with intervals) on hand-made records, dataset validation, subsets, tables, and
real evaluations over sockets (the simulated server, whose solver searches; the SmolLM2 reference server; `--model
DIR`, which starts its own). The proposer evaluation is tested in test_proposer_eval.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssp.config import load_config
from ssp.engine.config import EngineConfig
from ssp.engine.evaluation import (
    EvalDataError,
    EvalQuestion,
    EvalResult,
    QuestionRecord,
    _unless_dead,
    average,
    describe_changes,
    evaluate,
    format_comparison,
    format_table,
    load_dataset,
    pick,
    score,
    summarize,
)
from ssp.engine.intervals import Interval, mean_interval, mean_of_rates_interval, separation, wilson_interval
from ssp.processes import ManagedProcess, ProcessFailed
from ssp.run_config import SSPConfig
from ssp.serving.server import READY_LINE

QA_DIR = Path(__file__).resolve().parents[2] / "data" / "qa"


def _record(dataset: str, prediction: str | None, golden: tuple[str, ...], searches: int = 0,
            error: str | None = None) -> QuestionRecord:
    em, f1 = score(prediction, golden)
    return QuestionRecord(dataset=dataset, id=f"q{searches}", question="?", golden_answers=golden,
                          prediction=prediction, em=em, f1=f1, searches=searches, queries=("x",) * searches, turns=1,
                          end="answer" if prediction is not None else "eos", generated_tokens=3, elapsed_s=0.1,
                          response="", error=error)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _line(qid: str, question: str, answers: list[str]) -> str:
    return json.dumps({"id": qid, "question": question, "golden_answers": answers})


# ---------------------------------------------------------------- scoring


def test_score_normalises_and_accepts_any_alias() -> None:
    assert score("The Eiffel Tower.", ["Eiffel tower"]) == (True, 1.0)
    assert score("  paris ", ["Lutetia", "Paris"]) == (True, 1.0)  # the second alias matches
    em, f1 = score("Chief of Protocol of the United States", ["Chief of Protocol"])
    # "chief of protocol of united states": 3 of its 6 normalised tokens are the gold's 3, so P = 1/2, R = 1.
    assert not em and f1 == pytest.approx(2 * 0.5 * 1.0 / (0.5 + 1.0))
    assert score("Berlin", ["Paris"]) == (False, 0.0)


@pytest.mark.parametrize("prediction", [None, "", "   "])
def test_no_answer_scores_zero(prediction: str | None) -> None:
    assert score(prediction, ["Paris"]) == (False, 0.0)
    assert not _record("d", prediction, ("Paris",)).answered


def test_per_dataset_scores_and_unweighted_average() -> None:
    a = summarize("a", [_record("a", "Paris", ("paris",), searches=2), _record("a", None, ("Rome",)),
                        _record("a", "Rome city", ("Rome",), searches=1), _record("a", "x", ("y",), error="boom")])
    assert (a.questions, a.em, a.answered, a.searches_per_question, a.errors) == (4, 0.25, 0.75, 0.75, 1)
    assert a.f1 == pytest.approx((1.0 + 0.0 + 2 / 3 + 0.0) / 4)
    assert a.em_ci == wilson_interval(1, 4) and a.f1_ci == mean_interval([1.0, 0.0, 2 / 3, 0.0], low=0.0, high=1.0)
    b = summarize("b", [_record("b", "yes", ("yes",))])
    assert b.f1_ci == Interval(0.0, 1.0) and b.f1_sd is None  # one question: its spread is unknown
    avg = average([a, b])
    # Each dataset counts once (the paper's Avg column), whatever its size; counts are totals.
    assert avg.em == pytest.approx((0.25 + 1.0) / 2) and avg.f1 == pytest.approx((a.f1 + 1.0) / 2)
    assert (avg.questions, avg.errors, avg.name) == (5, 1, "average")
    assert avg.em_ci == mean_of_rates_interval([0.25, 1.0], [4, 1]) and avg.f1_ci == Interval(0.0, 1.0)
    assert average([a]).em_ci == a.em_ci and average([a]).f1_ci == a.f1_ci


def _result(correct: int, n: int = 10) -> EvalResult:
    s = summarize("hotpot", [_record("hotpot", "Paris" if i < correct else "Rome", ("Paris",), searches=1)
                             for i in range(n)])
    return EvalResult(model="m", datasets=(s,), average=average([s]), wall_s=1.0, out_dir=Path("."))


def test_tables_show_every_dataset_the_change_and_the_intervals() -> None:
    table = format_table(_result(1))
    ci = wilson_interval(1, 10)
    assert "hotpot" in table and "average" in table and f" 10.0 [{100 * ci.low:>5.1f}, {100 * ci.high:>5.1f}]" in table
    assert "proposer" not in table
    comparison = format_comparison(_result(1), _result(3))
    assert "+20.0" in comparison and comparison.count("hotpot") == 1 and "95% interval" in comparison
    with pytest.raises(ValueError, match="different datasets"):
        format_comparison(_result(1), dataclasses.replace(_result(1), datasets=()))
    json.dumps(_result(1).to_json())  # intervals are plain lists in summary.json


def test_what_moved_is_what_separates_beyond_its_interval() -> None:
    """1 -> 3 of 10 is within noise; 0 -> 9 of 10 is not (Wilson [0, 28] vs [60, 98])."""
    assert describe_changes(_result(1), _result(3)).startswith("What moved (95% intervals apart): nothing.")
    words = describe_changes(_result(0), _result(9, n=10))
    assert "QA exact match rose, 0.0 [  0.0,  27.8] -> 90.0 [ 59.6,  98.2]" in words
    assert "fell" in describe_changes(_result(9), _result(0)) and "What moved" in format_comparison(_result(0), _result(9))
    assert separation(Interval(0.1, 0.2), Interval(0.2, 0.3)) == 0  # touching intervals overlap


# ---------------------------------------------------------------- data


def test_load_dataset_reads_the_shipped_files() -> None:
    questions = load_dataset(QA_DIR / "hotpotqa_dev300_questions.jsonl")
    assert len(questions) == 300 and questions[0].golden_answers == ("yes",) and questions[0].line == 1


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "b", "question": "Who?", "golden_answers": "Paris"}), "a bare string is not accepted"),
    (json.dumps({"id": "b", "question": "Who?", "golden_answers": []}), "non-empty list"),
    (json.dumps({"id": "b", "golden_answers": ["x"]}), "'question' is None"),
    (json.dumps({"question": "Who?", "golden_answers": ["x"]}), "'id' is None"),
    (json.dumps(["a", "list"]), "expected a JSON object"),
    (_line("a", "Again?", ["x"]), "id 'a' already used on line 1"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    path = _write(tmp_path / "qa.jsonl", [_line("a", "Who?", ["x"]), "", bad])
    with pytest.raises(EvalDataError, match=rf"qa\.jsonl:3: .*{message}"):
        load_dataset(path)


def test_missing_or_clashing_files_fail_before_anything_starts(tmp_path: Path) -> None:
    cfg = EngineConfig()
    with pytest.raises(EvalDataError, match="does not exist"):
        evaluate(cfg, [tmp_path / "nope.jsonl"], server_url="http://127.0.0.1:9", out_dir=tmp_path / "o")
    (tmp_path / "x").mkdir()
    one = _write(tmp_path / "qa.jsonl", [_line("a", "Who?", ["x"])])
    two = _write(tmp_path / "x" / "qa.jsonl", [_line("a", "Who?", ["x"])])
    with pytest.raises(EvalDataError, match="share a file name"):
        evaluate(cfg, [one, two], server_url="http://127.0.0.1:9", out_dir=tmp_path / "o")


def test_pick_is_a_seeded_subset_in_file_order() -> None:
    questions = [EvalQuestion(id=str(i), question="?", golden_answers=("x",), line=i + 1) for i in range(50)]
    a, b = pick(questions, 10, seed=3), pick(questions, 10, seed=3)
    assert a == b and len(a) == 10 and [q.line for q in a] == sorted(q.line for q in a)
    assert pick(questions, 10, seed=4) != a
    assert pick(questions, 0, seed=3) == questions and pick(questions, 99, seed=3) == questions


# ---------------------------------------------------------------- server lifetime


async def test_a_dead_server_stops_the_evaluation(tmp_path: Path) -> None:
    process = ManagedProcess("reference server", [sys.executable, "-c", "print('loading'); raise SystemExit(3)"],
                             log_path=tmp_path / "server.log")
    try:
        with pytest.raises(ProcessFailed, match=r"reference server .* exited with code 3.*server\.log"):
            await asyncio.wait_for(_unless_dead(asyncio.sleep(3600), process), timeout=10)
    finally:
        process.stop()


# ---------------------------------------------------------------- real evaluations


def _small_sets(tmp_path: Path) -> list[Path]:
    """Two tiny datasets cut from the shipped demo sets (answerable from the demo index)."""
    out = []
    for name in ("hotpotqa_dev300_questions", "2wikimultihopqa_dev_subset_questions"):
        lines = (QA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:2]
        out.append(_write(tmp_path / f"{name}.jsonl", lines))
    return out


def _cfg(index: Path, *extra: str) -> EngineConfig:
    return load_config(SSPConfig, None, [f'retriever.index_dir="{index}"', "search.window_ms=1", *extra]).engine()


def _check_outputs(result: EvalResult, datasets: list[Path]) -> tuple[dict, list[dict]]:
    summary = json.loads((result.out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (result.out_dir / "records.jsonl").read_text().splitlines()]
    assert [d["name"] for d in summary["datasets"]] == [p.stem for p in datasets]
    assert summary["average"]["questions"] == len(records) == 4
    assert {r["dataset"] for r in records} == {p.stem for p in datasets}
    for r in records:
        assert set(r) >= {"id", "question", "golden_answers", "prediction", "em", "f1", "searches", "queries",
                          "turns", "end", "response", "error", "answered"}
        assert r["error"] is None and r["searches"] == len(r["queries"])
    for d in result.datasets:
        mine = [r for r in records if r["dataset"] == d.name]
        assert d.searches_per_question == pytest.approx(sum(r["searches"] for r in mine) / len(mine))
        assert d.em == pytest.approx(sum(r["em"] for r in mine) / len(mine))
    assert (result.out_dir / "config.toml").exists()
    assert summary["protocol"]["temperature"] == 0.0 and summary["protocol"]["topk"] == 3
    for d in summary["datasets"]:
        assert d["em_ci"][0] <= d["em"] <= d["em_ci"][1] and d["f1_ci"][0] <= d["f1"] <= d["f1_ci"][1]
    assert summary["proposer"] is None and not (result.out_dir / "proposer_records.jsonl").exists()
    return summary, records


@pytest.mark.slow
def test_eval_against_a_server_counts_searches(sim_server: str, demo_index: Path, tmp_path: Path) -> None:
    """The simulated server's solver outputs search (real tokenizer ids); every executed search reaches the real
    Tantivy index through the batcher and is counted per question."""
    datasets = _small_sets(tmp_path)
    result = evaluate(_cfg(demo_index, "eval.max_turns=2"), datasets, server_url=sim_server, out_dir=tmp_path / "out",
                      progress=False)
    summary, records = _check_outputs(result, datasets)
    searches = sum(r["searches"] for r in records)
    assert searches > 0 and summary["search"]["search_queries"] >= searches
    assert all("<information>" in r["response"] for r in records if r["searches"])


@pytest.mark.slow
def test_eval_of_smollm2_on_the_reference_server(ref_server: str, demo_index: Path, tmp_path: Path) -> None:
    datasets = _small_sets(tmp_path)
    cfg = _cfg(demo_index, "eval.max_turns=2", "eval.max_new_tokens_per_turn=16")
    result = evaluate(cfg, datasets, server_url=ref_server, out_dir=tmp_path / "out", progress=False)
    summary, records = _check_outputs(result, datasets)
    assert all(r["generated_tokens"] <= 2 * 16 and r["turns"] <= 2 for r in records)
    assert sum(summary["end_reasons"].values()) == 4


@pytest.mark.slow
def test_cli_starts_and_stops_a_server_for_a_model_dir(model_dir: Path, demo_index: Path, tmp_path: Path) -> None:
    dataset = _write(tmp_path / "tiny.jsonl", [_line("q1", "What is the capital of France?", ["Paris"])])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ssp.cli", "eval", "--model", str(model_dir), "--dataset", str(dataset),
         "--no-progress", "--set", f'retriever.index_dir="{demo_index}"', "--set", f'eval.out_dir="{out}"',
         "--set", "eval.max_turns=1", "--set", "eval.max_new_tokens_per_turn=8"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny" in proc.stdout and "average" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(model_dir) and summary["datasets"][0]["questions"] == 1
    log = (out / "logs" / "server.log").read_text()
    url = log.split(READY_LINE, 1)[1].split()[0]  # the server it started logged its address
    with pytest.raises(OSError):  # ... and is gone once the command returns
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()
