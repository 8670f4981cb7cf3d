"""Metrics JSONL survives a torn last line; plots are written as real PNG files."""

from pathlib import Path

import pytest

from ssp.metrics import MetricsLog, plot_compared, plot_metrics, read_metrics


def test_jsonl_round_trip_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": 1, "loss": 0.5})
        log.write({"step": 2, "loss": 0.25})
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # a writer killed mid-line
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 0.25
    with pytest.raises(RuntimeError, match="is closed"):
        log.write({"step": 4})


def test_plot_writes_png(tmp_path: Path) -> None:
    records = [{"step": i, "loss": 1 / (i + 1), "acc": i / 10} for i in range(5)]
    out = plot_metrics(records, ["loss", "acc", "missing"], tmp_path / "p.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compared_plot_draws_one_labelled_line_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"control": [{"step": i, "loss": 1.0} for i in range(4)],
            "trained": [{"step": i, "loss": 1 / (i + 1)} for i in range(4)]}
    drawn: list[list[str]] = []
    real_savefig = plt.Figure.savefig

    def spy(fig: plt.Figure, *args: object, **kwargs: object) -> None:
        drawn.extend([[line.get_label() for line in ax.get_lines()] for ax in fig.axes if ax.get_visible()])
        real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    out = plot_compared(runs, ["loss"], tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and drawn == [["control", "trained"]]
