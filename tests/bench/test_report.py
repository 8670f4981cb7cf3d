"""The report builder on a small real run of one part (`ssp bench search` against the demo index)."""

import argparse
import json
from pathlib import Path

import pytest

from bench import report, search


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
