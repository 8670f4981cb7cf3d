"""The report builder on a small real run of one part (`ssp bench search` against the demo index)."""

import argparse
import json
from pathlib import Path

import pytest

from ssp.bench import report, search


def test_report_from_a_real_search_run(demo_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    args = argparse.Namespace(queries=120, clients=16, rounds=1, index=demo_index, out=out)
    assert search.run(args) == 0
    result = json.loads(out.read_text())
    assert result["per_query"]["search_batch_max"] == 1  # one retriever call per query
    assert result["coalesced"]["search_queries"] == 120
    assert result["coalesced"]["search_batches"] < 120  # concurrent searches were coalesced

    text = report.build(tmp_path, tmp_path / "REPORT.md")
    assert (tmp_path / "REPORT.md").read_text() == text
    assert f"coalesced/per-query throughput ratio {result['ratio']}" in text
    assert "![search](search.png)" in text and (tmp_path / "search.png").stat().st_size > 1000
    # Parts without results are listed, never invented.
    assert "not run" in text and "async_vs_sync" in text.split("not run")[1].splitlines()[0]


def test_report_rejects_a_corrupt_part(tmp_path: Path) -> None:
    (tmp_path / "push.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"push\.json.*ssp bench push"):
        report.build(tmp_path, tmp_path / "REPORT.md")


def test_the_scale_section_carries_loop_lag_and_end_to_end_turn_latency(tmp_path: Path) -> None:
    row = {"episodes_in_flight": 10000, "launch_s": 9.0, "rollouts_in_flight_p50": 9990, "turns_measured": 900,
           "turn_overhead_p50_ms": 0.15, "turn_overhead_p99_ms": 0.7, "turn_cpu_p50_ms": 0.15, "turn_cpu_p99_ms": 0.6,
           "turn_latency_p50_ms": 31.5, "turn_latency_p99_ms": 812.25, "search_wait_p50_ms": 29.5,
           "search_wait_p99_ms": 790.5, "slot_wait_p50_ms": 4000.0, "slot_wait_p99_ms": 9000.0,
           "loop_lag_p50_ms": 0.41, "loop_lag_p99_ms": 5.52, "loop_lag_max_ms": 9.9, "slot_occupancy_mean": 1.0,
           "memory_per_rollout_kb": 7.1, "server_ejections": 0}
    args = {"servers": "2", "time_scale": "2.0", "capacity": "2048", "ramp": "6.0", "duration": "8.0"}
    (tmp_path / "scale.json").write_text(json.dumps({"args": args, "sizes": [row]}))
    text = report.build(tmp_path, tmp_path / "REPORT.md")
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "event-loop lag p50/p99 0.41/5.52 ms - goal <= 5 ms" in summary
    assert "end-to-end turn p50/p99 31.5/812.25 ms" in summary
    header = next(line for line in text.splitlines() if line.startswith("| episodes in flight"))
    assert "end-to-end turn p50 ms" in header and "of which search p50 ms" in header and "loop lag p50 ms" in header
    assert "| 31.5 | 812.25 | 29.5 | 790.5 | 4000.0 | 9000.0 | 0.41 | 5.52 | 9.9 |" in text


def test_the_summary_carries_the_retrieval_goal(tmp_path: Path) -> None:
    result = {"corpus": ["/data/a.jsonl", "/data/b.jsonl"], "questions": 500,
              "answer_hits_at_3": {"raw_1thread": 70, "http_engine": 71},
              "ratios": {"http_engine_over_raw": 4.61, "http_per_query_over_raw": 4.39},
              "goal": {"speedup": 4.0, "hit_tolerance_points": 1.0, "met": True}}
    (tmp_path / "retrieval.json").write_text(json.dumps(result))
    summary = report.build(tmp_path, tmp_path / "REPORT.md").split("## Summary")[1].split("\n## ")[0]
    assert ("- retrieval: HTTP/raw = 4.61x through the engine's search batcher (one query per request: 4.39x) at "
            "answer-hit@3 14.2% vs raw 14.0% (71 vs 70 of 500 questions; goal >= 4x, within 1 point): met; corpus "
            "a.jsonl, b.jsonl") in summary
    (tmp_path / "retrieval.json").write_text(json.dumps({**result, "goal": {**result["goal"], "met": False}}))
    assert "within 1 point): NOT met; corpus" in report.build(tmp_path, tmp_path / "REPORT.md")
