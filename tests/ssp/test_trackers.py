"""ssp.trackers: the rows a run logs reach TensorBoard and W&B (offline) as their own readers see them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssp.trackers import MetricsConfig, numeric, open_trackers

ROWS = [{"step": 1, "loss": 0.5, "valid_rate": 0.0, "note": "warm-up", "grad_norm": float("nan"), "trained": True},
        {"step": 2, "loss": 0.25, "valid_rate": 0.125, "note": None, "grad_norm": 1.5, "trained": False}]


def test_only_finite_numbers_are_scalars() -> None:
    assert numeric(ROWS[0]) == {"step": 1.0, "loss": 0.5, "valid_rate": 0.0, "trained": 1.0}


def test_tensorboard_holds_every_row(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = open_trackers(MetricsConfig(trackers=("tensorboard",)), tmp_path, run_name="t", config={})
    for row in ROWS:
        trackers.log(row, step=row["step"])
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("train/grad_norm")] == [(2, 1.5)]  # the NaN is left out
    assert [(e.step, e.value) for e in events.Scalars("rollout/valid_rate")] == [(1, 0.0), (2, 0.125)]
    assert not {"note", "step", "train/note", "train/step"} & set(events.Tags()["scalars"])


def test_wandb_logs_offline_under_the_run_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    trackers = open_trackers(MetricsConfig(trackers=("wandb",)), tmp_path, run_name="t-1", config={"lr": 5e-5})
    for row in ROWS:
        trackers.log(row, step=row["step"])
    trackers.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*-t-1"))
    assert len(runs) == 1 and list(runs[0].glob("run-t-1.wandb")), list((tmp_path / "wandb").iterdir())
    # W&B's own end-of-run summary: the last value of each key it received.
    out = capfd.readouterr()
    summary = out.out + out.err
    assert re.search(r"train/loss 0\.25\b", summary) and re.search(r"rollout/valid_rate 0\.125\b", summary), summary


def test_unknown_tracker_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown \['mlflow'\]; the trackers are \['tensorboard', 'wandb'\]"):
        MetricsConfig(trackers=("mlflow",))


def test_metrics_log_mirrors_step_rows_to_its_trackers(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssp.metrics import MetricsLog, read_metrics

    trackers = open_trackers(MetricsConfig(trackers=("tensorboard",)), tmp_path, run_name="t", config={})
    with MetricsLog(tmp_path / "metrics.jsonl", trackers) as log:
        log.write({"event": "start"})  # no step: JSONL only
        for row in ROWS:
            log.write(row)
    trackers.close()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("rollout/valid_rate")] == [(1, 0.0), (2, 0.125)]
