"""What `ssp train` shows and records per step: the engine's numbers over the step joined with the learner's.

Why a module of its own: the step row is computed from two sources that tick independently (the scheduler's
counters in this process, the learner's metrics JSONL written by rank 0 after each step and weight push), and the
same row feeds the live display, the run's metrics.jsonl, the plots and the final summary.

    engine counters at step k-1 ──┐
    engine counters now ──────────┼─► StepRow(step k): episodes/s, tokens/s, solver accuracy, proposer reward,
    learner record of step k ─────┘                    valid-question rate, staleness, logprob mismatch, loss
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ssp.engine.scheduler import Counters

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (row key, header, format)
    ("step", "step", "{:>4d}"),
    ("episodes", "eps", "{:>4d}"),
    ("episodes_per_s", "eps/s", "{:>6.3f}"),
    ("tokens_per_s", "tok/s", "{:>6.0f}"),
    ("solver_accuracy", "solve", "{:>5.2f}"),
    ("proposer_reward", "prop_r", "{:>6.2f}"),
    ("valid_rate", "valid", "{:>5.2f}"),
    ("staleness_max", "stale", "{:>5.0f}"),
    ("logprob_mismatch_mean", "mismatch", "{:>8.1e}"),
    ("loss", "loss", "{:>8.4f}"),
    ("step_s", "learn_s", "{:>7.1f}"),
)
"""The live table: one line per optimizer step."""

PLOT_KEYS = ("proposer_reward", "question_rate", "checks_rate", "valid_rate", "solver_accuracy", "samples_proposer",
             "samples_solver", "loss", "grad_norm", "logprob_mismatch_mean", "staleness_max", "tokens_per_s")
"""The curves of <run>/train.png: both roles' training signals (proposer reward and how far its proposals get, the
solver's accuracy, the samples each role trained), then the learner's and the engine's health."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The scheduler's cumulative counters at one moment."""

    at: float
    finished: int
    valid: int
    generated_tokens: int
    accuracy_sum: float
    proposer_reward_sum: float
    failed: int
    questions: int
    checked: int

    @classmethod
    def of(cls, c: Counters) -> Snapshot:
        return cls(time.perf_counter(), c.finished, c.valid, c.generated_tokens, c.accuracy_sum,
                   c.proposer_reward_sum, c.failed, c.questions, c.checked)


def step_row(step: int, before: Snapshot, now: Snapshot, learner: Mapping[str, Any] | None) -> dict[str, Any]:
    """One step's row: engine rates and means over [before, now], plus the learner's record of that step (loss,
    mismatch, staleness, ...) when it is readable. Means over no episodes are None, never 0."""
    dt = max(1e-9, now.at - before.at)
    episodes = now.finished - before.finished
    valid = now.valid - before.valid
    row: dict[str, Any] = {
        "event": "step", "step": step, "episodes": episodes, "episodes_failed": now.failed - before.failed,
        "episodes_per_s": episodes / dt, "tokens_per_s": (now.generated_tokens - before.generated_tokens) / dt,
        "solver_accuracy": (now.accuracy_sum - before.accuracy_sum) / valid if valid else None,
        "proposer_reward": (now.proposer_reward_sum - before.proposer_reward_sum) / episodes if episodes else None,
        "valid_rate": valid / episodes if episodes else None,
        "question_rate": (now.questions - before.questions) / episodes if episodes else None,
        "checks_rate": (now.checked - before.checked) / episodes if episodes else None,
        "engine_s": dt,
    }
    if learner is not None:
        for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "lr", "logprob_mismatch_mean",
                    "logprob_mismatch_max", "staleness_max", "samples", "loss_tokens", "step_s", "push_s",
                    "dropped_zero_variance_groups", "dropped_stale_groups", "unknown_version_tokens", "trained",
                    "samples_proposer", "samples_solver"):
            if key in learner:
                row[key] = learner[key]
        row["learner_tokens_per_s"] = learner.get("tokens_per_s")
    return row


def format_header() -> str:
    return "  ".join(header.rjust(len(fmt.format(0) if "d" in fmt else fmt.format(0.0)))
                     for _, header, fmt in COLUMNS)


def format_row(row: Mapping[str, Any]) -> str:
    """Fixed-width cells; a value missing (e.g. no valid question this step) prints as '-'."""
    cells = []
    for key, _, fmt in COLUMNS:
        value = row.get(key)
        width = len(fmt.format(0) if "d" in fmt else fmt.format(0.0))
        cells.append("-".rjust(width) if value is None else fmt.format(value))
    return "  ".join(cells)


class ProgressDisplay:
    """A tqdm bar over the run's steps with the step table printed above it (plain lines when disabled)."""

    def __init__(self, *, total_steps: int, start_step: int, enabled: bool, out: TextIO) -> None:
        from tqdm import tqdm

        self._out = out
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not enabled,
                         file=out, dynamic_ncols=True)
        self._header_done = False

    def write(self, line: str) -> None:
        self._bar.write(line, file=self._out)

    def add(self, row: Mapping[str, Any]) -> None:
        if not self._header_done:
            self.write(format_header())
            self._header_done = True
        self.write(format_row(row))
        self._bar.update(1)

    def status(self, **fields: Any) -> None:
        self._bar.set_postfix(fields, refresh=False)

    def close(self) -> None:
        self._bar.close()


def format_summary(items: Sequence[tuple[str, Any]]) -> str:
    """The end-of-run table: one `name  value` line each, floats to 4 significant digits."""
    width = max(len(name) for name, _ in items)
    lines = []
    for name, value in items:
        text = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)
