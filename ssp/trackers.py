"""Config section [metrics] and the experiment trackers beside the JSONL metrics: TensorBoard and Weights & Biases.

Why: RL users read their runs in TensorBoard or W&B (verl's `trainer.logger`, slime's `--use-wandb`, TRL's
`report_to`); the JSONL file stays the record `ssp` itself reads (plots, resume, summaries), and a tracker gets a
copy of every numeric value of the same rows, stepped by the policy version. Both libraries are optional
(`pip install 'ssp[tracking]'`); asking for one that is not installed fails before the run starts, with the fix.

W&B logs offline (files under the run folder, `wandb sync` uploads them later) unless WANDB_MODE says otherwise or
WANDB_API_KEY is set: a training node often has no internet, and a run must never hang on a login prompt.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "wandb")
"""The trackers `metrics.trackers` may name."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsConfig:
    trackers: tuple[str, ...] = ()
    """Experiment trackers that get every step row of <run>/metrics.jsonl at its step (the policy version), and the
    before/after evaluation scores: "tensorboard" (<run>/tensorboard; `tensorboard --logdir <run>/tensorboard`)
    and/or "wandb" (offline files under <run>/wandb unless WANDB_MODE or WANDB_API_KEY says otherwise; `wandb sync`
    uploads them). Keys are grouped as rollout/, train/, perf/ and eval/. JSONL is always written. Both need
    `pip install 'ssp[tracking]'` (`just setup` installs it). Example: --set 'metrics.trackers=["tensorboard"]'."""
    wandb_project: str = "ssp"
    """The W&B project (the W&B run id is the run name, so `ssp train --resume` continues the same W&B run)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.trackers) - set(TRACKERS))
        if unknown:
            raise ValueError(f"trackers = {list(self.trackers)}: unknown {unknown}; the trackers are {list(TRACKERS)}")


ROLLOUT_KEYS = frozenset({"episodes", "episodes_failed", "solver_accuracy", "proposer_reward", "valid_rate",
                          "question_rate", "checks_rate"})
"""Step-row keys about the episodes themselves (rollout/); the learner's go to train/, speeds and times to perf/."""
PERF_KEYS = frozenset({"episodes_per_s", "tokens_per_s", "learner_tokens_per_s", "engine_s", "step_s", "push_s",
                       "time_s"})


def grouped_key(key: str) -> str:
    """The tracker name of a step-row key: rollout/..., perf/... or train/..."""
    if key in ROLLOUT_KEYS:
        return f"rollout/{key}"
    if key in PERF_KEYS:
        return f"perf/{key}"
    return f"train/{key}"


class TrackerError(RuntimeError):
    """A tracker that cannot be opened (unknown name, library not installed)."""


class Tracker(Protocol):
    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (bools as 0/1); strings, lists and None are not scalars to a tracker."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Scalars in <run>/tensorboard (`tensorboard --logdir <run>/tensorboard`)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrackerError(f"metrics.trackers names 'tensorboard' but it is not installed ({e}); "
                               "pip install 'ssp[tracking]' (or tensorboard), or drop it from metrics.trackers") from None
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One W&B run per ssp run (its id is the run name, so `ssp train --resume` continues the same W&B run)."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise TrackerError(f"metrics.trackers names 'wandb' but it is not installed ({e}); "
                               "pip install 'ssp[tracking]' (or wandb), or drop it from metrics.trackers") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self._run = wandb.init(project=project, name=run_name, id=run_name, resume="allow", dir=str(run_dir),
                               config=dict(config), mode=mode)

    def log(self, values: Mapping[str, float], step: int) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Every tracker of a run behind one `log` / `close` (none: both do nothing)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self._trackers = trackers

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """A step row: its numbers under their groups (`grouped_key`); `step` itself is the x axis, not a value."""
        self.log_values({grouped_key(k): v for k, v in numeric(record).items() if k != "step"}, step)

    def log_values(self, values: Mapping[str, float], step: int) -> None:
        """Numbers already named as the trackers should show them (e.g. eval/...)."""
        for tracker in self._trackers:
            tracker.log(values, step)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


def open_trackers(cfg: MetricsConfig, run_dir: Path, *, run_name: str, config: Mapping[str, Any]) -> Trackers:
    """The trackers `cfg` asks for, writing under `run_dir`; `config` is the run's resolved configuration."""
    opened: list[Tracker] = []
    try:
        for name in cfg.trackers:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_dir / "tensorboard"))
            else:
                opened.append(WandbTracker(run_dir, project=cfg.wandb_project, run_name=run_name, config=config))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
