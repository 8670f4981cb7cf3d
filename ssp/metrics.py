"""Metrics as JSONL (one object per line, appended and flushed so a killed run keeps every line) and PNG plots.

Every room logs through `MetricsLog`; `plot_metrics` turns a JSONL file into the curves a person wants to see.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ssp.trackers import Trackers


class MetricsLog:
    """Append-only JSONL writer. Each record gets `time_s` (seconds since the log was opened) unless given.

    `trackers` (ssp.trackers: TensorBoard, W&B) receive the numbers of every record that has a `step`, at that
    step, so a run's rows reach them without a second logging call anywhere. Their owner closes them (they may
    outlive the log)."""

    def __init__(self, path: Path | str, trackers: Trackers | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._start = time.monotonic()
        self._trackers = trackers

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file.closed:
            raise RuntimeError(f"metrics log {self.path} is closed; open a new MetricsLog to write more")
        line = {"time_s": round(time.monotonic() - self._start, 4), **record}
        self._file.write(json.dumps(line, default=_jsonable) + "\n")
        self._file.flush()
        if self._trackers is not None and isinstance(record.get("step"), int):
            self._trackers.log(line, step=record["step"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """All records of a JSONL file; a torn last line (the writer was killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(records: Iterable[Mapping[str, Any]], keys: Sequence[str], out_png: Path | str, *,
                 x_key: str = "step", title: str = "") -> Path:
    """One small panel per key (records lacking a key are skipped), x along `x_key`, saved as a PNG."""
    return plot_compared({"": list(records)}, keys, out_png, x_key=x_key, title=title)


def plot_compared(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str], out_png: Path | str, *,
                  x_key: str = "step", title: str = "") -> Path:
    """Like `plot_metrics`, with one line per run in every panel (e.g. a control arm and a trained arm), labelled
    by the run's name (an unnamed single run gets no legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(keys)))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in runs.items():
            points = [(r[x_key], r[key]) for r in rows if x_key in r and isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=name or None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.grid(alpha=0.3)
        if any(runs) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
