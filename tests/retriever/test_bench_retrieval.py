"""`ssp bench retrieval` end to end on a small corpus, and its goal: every arm answers, hit rates are comparable, the
exit code says whether the goal was met."""

import json
from pathlib import Path

import pytest

from ssp.bench.retrieval import REPEATS, goal_met
from ssp.cli import main
from ssp.paths import DEMO_CORPORA


def test_bench_runs_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SSP_ARTIFACTS", str(tmp_path))
    args = ["bench", "retrieval", "--corpus", str(DEMO_CORPORA[0]), "--queries", "40", "--clients", "4",
            "--rollouts", "8"]
    code = main(args)
    out = capsys.readouterr().out
    assert "(c) HTTP server, 4 concurrent clients, one query per request" in out and "GIL: a " in out
    assert "(d) HTTP server, 8 rollouts through the engine's search batcher" in out
    assert "HTTP/raw = " in out and "through the engine's search batcher (one query per request: " in out
    report = json.loads((tmp_path / "bench" / "retrieval.json").read_text())
    assert code == (0 if report["goal"]["met"] else 1)  # a 3k-passage corpus may well miss it: then exit 1
    assert report["queries"] == 40 and report["questions"] == 500 and report["corpus"] == [str(DEMO_CORPORA[0])]
    assert report["threads"] == {"raw_1thread": 1, "raw_2threads": 2, "ssp_1thread": 1, "ssp_2threads": 2,
                                 "http_per_query": 2, "http_engine": 2}
    assert all(m["qps"] > 0 and m["cpu_ms_per_query"] > 0 for m in report["best"].values())
    hits = report["answer_hits_at_3"]
    # One searcher behind the in-process and the HTTP arms: the same passages, so the same hit rate.
    assert hits["ssp_1thread"] == hits["ssp_2threads"] == hits["http_per_query"] == hits["http_engine"]
    # (d) goes through the batcher: 8 rollouts waiting together share requests (1.0 would be one query per request).
    batches = report["engine_batches"]
    assert batches["search_batch_mean"] > 2 and batches["search_failed_batches"] == 0
    assert batches["search_queries"] == 500 + REPEATS * 40  # the quality pass over every question, then the timed runs
    assert report["ratios"]["http_engine_over_raw"] == report["best"]["http_engine"]["qps"] / report["best"][
        "raw_1thread"]["qps"]
    assert hits["raw_1thread"] == hits["raw_2threads"] and 0 < hits["raw_1thread"] < 500
    assert (tmp_path / "bench" / "retrieval.md").read_text().startswith("# ssp bench retrieval")


def test_goal_needs_the_speedup_and_the_hit_rate() -> None:
    assert goal_met(4.0, raw_hits=70, http_hits=65, questions=500)  # 4x, exactly 1 point worse: met
    assert goal_met(6.0, raw_hits=70, http_hits=90, questions=500)  # better hits never miss
    assert not goal_met(3.99, raw_hits=70, http_hits=70, questions=500)
    assert not goal_met(9.0, raw_hits=70, http_hits=64, questions=500)  # 1.2 points worse


def test_bench_rejects_empty_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "retrieval", "--queries", "0"]) == 2
    assert "--queries 0: must be >= 1" in capsys.readouterr().err
