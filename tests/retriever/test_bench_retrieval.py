"""`ssp bench retrieval` end to end on a small corpus: every layer answers, and the report has the issue's ratios."""

import json
from pathlib import Path

import pytest

from ssp.cli import main
from ssp.paths import DEMO_CORPORA


def test_bench_runs_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SSP_ARTIFACTS", str(tmp_path))
    args = ["bench", "retrieval", "--corpus", str(DEMO_CORPORA[0]), "--queries", "40", "--clients", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(c) HTTP server, 4 concurrent clients" in out and "(c)/(a) = " in out and "GIL: a " in out
    report = json.loads((tmp_path / "bench" / "retrieval.json").read_text())
    assert report["queries"] == 40 and report["corpus"] == [str(DEMO_CORPORA[0])]
    assert set(report["ratios"]) == {"gil_2t_over_1t", "b_over_a", "c_over_a"}
    assert all(m["qps"] > 0 and m["cpu_ms_per_query"] > 0 for m in report["best"].values())
    assert (tmp_path / "bench" / "retrieval.md").read_text().startswith("# ssp bench retrieval")


def test_bench_rejects_empty_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "retrieval", "--queries", "0"]) == 2
    assert "--queries 0: must be >= 1" in capsys.readouterr().err
