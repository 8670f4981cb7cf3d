"""What a finished training run reports: `TrainResult`, the end-of-run numbers, the evaluation scalars for the
trackers, summary.json and the plots, the final screen, and the hint printed after a failure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssp.launcher.progress import PLOT_KEYS, format_summary
from ssp.launcher.run_folder import checkpoint_step
from ssp.metrics import plot_metrics, read_metrics


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResult:
    """What a finished run did: the steps, the engine's totals, the evaluations and where everything is."""

    run_dir: Path
    start_step: int
    steps: int
    rows: list[dict[str, Any]]
    engine: dict[str, Any]
    before: Any
    """ssp.engine.evaluation.EvalResult before the first step (None without train.eval_datasets or eval_seeds)."""
    after: Any
    """ssp.engine.evaluation.EvalResult after the last step."""
    policy: Path | None
    """The trained policy as a Hugging Face directory (train.export_policy), None when not exported."""
    wall_s: float


def summary_items(result: TrainResult) -> list[tuple[str, Any]]:
    """The end-of-run numbers (the rows are this run's steps; a resumed run's earlier steps are in metrics.jsonl)."""
    rows = result.rows
    e = result.engine

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    items: list[tuple[str, Any]] = [
        ("steps", f"{result.start_step} -> {result.steps}"),
        ("episodes finished", e.get("episodes_finished")),
        ("episodes failed", e.get("episodes_failed")),
        ("valid-question rate", e.get("validity_rate")),
        ("solver accuracy", e.get("solver_accuracy")),
        ("proposer reward", e.get("proposer_reward_mean")),
        ("episodes/s", e.get("episodes_per_s")),
        ("tokens/s (generated)", e.get("tokens_per_s")),
        ("logprob mismatch (mean)", mean("logprob_mismatch_mean")),
        ("staleness (max)", max((r["staleness_max"] for r in rows if "staleness_max" in r), default=None)),
        ("learner step (s, mean)", mean("step_s")),
        ("weight push (s, mean)", mean("push_s")),
        ("wall time (s)", round(result.wall_s, 1)),
    ]
    return items


def eval_scalars(scores: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's headline numbers for the trackers: eval/<dataset>/em and /f1 (and the average), and
    eval/proposer/<rate> on the held-out seeds. Rates that are undefined (no valid question) are left out."""
    out: dict[str, float] = {}
    for entry in [*scores.get("datasets", []), *([scores["average"]] if scores.get("average") else [])]:
        for key in ("em", "f1"):
            if isinstance(entry.get(key), (int, float)):
                out[f"eval/{entry['name']}/{key}"] = float(entry[key])
    proposer = scores.get("proposer") or {}
    for key in ("question_rate", "checks_rate", "valid_rate", "verify_pass_rate", "searches_per_rollout",
                "solver_accuracy"):
        if isinstance(proposer.get(key), (int, float)):
            out[f"eval/proposer/{key}"] = float(proposer[key])
    return out


def write_summary(result: TrainResult) -> None:
    """Plots and summary.json in the run folder."""
    run_dir = result.run_dir
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"]
    if steps:
        plot_metrics(steps, PLOT_KEYS, run_dir / "train.png", title=f"ssp train: {run_dir.name}")
    summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": result.start_step, "steps": result.steps,
                               "wall_s": round(result.wall_s, 3), "engine": result.engine}
    for name in ("before", "after"):
        value = getattr(result, name)
        if value is not None:
            summary[f"eval_{name}"] = value.to_json()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def format_result(result: TrainResult) -> str:
    """The final screen: the before/after table (when evaluated) and the run's numbers."""
    parts = []
    if result.before is not None and result.after is not None:
        from ssp.engine.evaluation import format_comparison

        parts.append(format_comparison(result.before, result.after))
    elif result.after is not None:
        from ssp.engine.evaluation import format_table

        parts.append("the trained policy:\n" + format_table(result.after))
    parts.append(format_summary(summary_items(result)))
    files = [f"{result.run_dir}/{name}" for name in ("metrics.jsonl", "train.png", "summary.json", "samples.frames",
                                                     "tensorboard", "wandb") if (result.run_dir / name).exists()]
    parts.append("files: " + ", ".join(files) + f", {result.run_dir}/learner/ (checkpoints, learner metrics)"
                 + (f", {result.policy} (the trained policy, Hugging Face format)" if result.policy else ""))
    return "\n\n".join(parts)


def failure_hint(run_dir: Path, resume_cmd: str) -> str:
    """Where the run stands after a failure, and how to continue it."""
    step = checkpoint_step(run_dir / "learner") if (run_dir / "learner").is_dir() else None
    where = f"the latest checkpoint is step {step}" if step else "no checkpoint was written yet"
    return f"{where} ({run_dir}/learner/checkpoints); continue with `{resume_cmd}`"
