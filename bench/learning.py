"""`ssp bench learning`: does training move the policy, measured against a control on data training never saw?

The demo's setup (configs/demo.toml by default) for more steps, run twice with identical seeds (the same seed answers
drawn in the same order, the same held-out seeds and QA questions evaluated), one arm after the other:

    arm       what differs
    control   learner.lr = 0: the whole loop runs (rollouts, rewards, advantages, losses, gradients, pushes), but no
              weight ever moves, so whatever the evaluation sees is the base policy seen through the same pipeline
    trained   the config's learning rate

Each arm ends with the evaluation of its final policy (train.eval_datasets, train.eval_seeds: QA EM/F1 and the
proposer's stage rates, each with a 95% interval). For every score both arms have, one line:

    learning: <metric> control X [lo, hi] trained Y [lo, hi] -> rose | fell | within noise

A score "rose" when the trained arm's interval lies wholly above the control's (ssp.engine.intervals.separation: a
conservative test). The bench exits 1 when no score rose, so "nothing was learned" cannot pass silently. It writes
artifacts/bench/learning.json, learning.png (both arms' training curves, step by step, in one figure) and keeps both
run folders (artifacts/runs/<name>-control, -trained) with their metrics, samples and exported policies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir

ARMS = (("control", ["learner.lr=0"]), ("trained", []))
"""The two arms and the overrides that make them differ."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("configs/demo.toml"),
                   help="the training config both arms run (default: configs/demo.toml)")
    p.add_argument("--steps", type=int, default=12, help="learner steps per arm (default: 12)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in both arms, e.g. --set learner.lr=3e-5 (repeatable)")
    p.add_argument("--name", default=None,
                   help="run-folder prefix (default: learning-<date-time>; the arms add -control and -trained)")
    p.add_argument("--no-progress", action="store_true", help="plain lines instead of progress bars")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/learning.json)")


def arm_overrides(arm: list[str], common: list[str], *, name: str, steps: int) -> list[str]:
    """What one arm runs with: the common overrides, then the run's name and length, then what makes the arm. The
    initial policy is not evaluated: both arms start from it, and the control's final policy is that policy."""
    return [*common, f"train.name={json.dumps(name)}", f"train.steps={steps}", "train.eval_before=false", *arm]


def compare(control: Any, trained: Any) -> list[dict[str, Any]]:
    """Per score both evaluations have: the two values with their intervals and whether they separate."""
    from ssp.engine.evaluation import compared_metrics
    from ssp.engine.intervals import separation

    rows = []
    for c, t in compared_metrics(control, trained):
        assert c.ci is not None and t.ci is not None
        rows.append({"metric": c.label, "percent": c.percent, "control": c.value, "control_ci": c.ci.to_json(),
                     "control_n": c.n, "trained": t.value, "trained_ci": t.ci.to_json(), "trained_n": t.n,
                     "separation": separation(c.ci, t.ci)})
    return rows


def learning_line(row: dict[str, Any]) -> str:
    """`learning: <metric> control X [lo, hi] trained Y [lo, hi] -> verdict`, rates in percent."""
    scale = 100.0 if row["percent"] else 1.0

    def shown(value: float, ci: list[float]) -> str:
        return f"{scale * value:.2f} [{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]"

    verdict = {1: "rose", -1: "fell", 0: "within noise"}[row["separation"]]
    return (f"learning: {row['metric']} control {shown(row['control'], row['control_ci'])} trained "
            f"{shown(row['trained'], row['trained_ci'])} -> {verdict}")


def run(args: argparse.Namespace) -> int:
    from ssp.config import load_config
    from ssp.launcher.progress import PLOT_KEYS
    from ssp.launcher.run_summary import format_result
    from ssp.launcher.train import TrainError, train
    from ssp.metrics import plot_compared, read_metrics
    from ssp.run_config import SSPConfig

    if args.steps < 1:
        print(f"ssp bench learning: --steps {args.steps}: must be >= 1", file=sys.stderr)
        return 2
    prefix = args.name or time.strftime("learning-%Y%m%d-%H%M%S")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for arm, arm_sets in ARMS:
        overrides = arm_overrides(arm_sets, args.overrides, name=f"{prefix}-{arm}", steps=args.steps)
        cfg = load_config(SSPConfig, args.config, overrides)
        if not (cfg.train.eval_datasets or cfg.train.eval_seeds):
            print("ssp bench learning: the config evaluates nothing; set train.eval_seeds and/or "
                  "train.eval_datasets (configs/demo.toml sets both)", file=sys.stderr)
            return 2
        print(f"== arm {arm}: ssp train --config {args.config} " + " ".join(f"--set {o}" for o in overrides),
              flush=True)
        try:
            result = train(cfg, resume=False, progress=not args.no_progress, out=sys.stdout)
        except TrainError as e:
            print(f"ssp bench learning: {arm}: {e}", file=sys.stderr)
            return 2
        print(format_result(result), flush=True)
        results[arm] = result
        curves[arm] = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r.get("event") == "step"]
    rows = compare(results["control"].after, results["trained"].after)
    out_json = args.out or artifacts_dir() / "bench" / "learning.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_compared(curves, PLOT_KEYS, out_json.with_suffix(".png"),
                         title=f"ssp bench learning: {args.steps} steps, control (lr = 0) vs trained")
    report = {"args": {"config": str(args.config), "steps": args.steps, "overrides": args.overrides},
              "wall_s": round(time.perf_counter() - started, 1),
              "arms": {arm: {"run_dir": str(r.run_dir), "after": r.after.to_json(), "rows": r.rows}
                       for arm, r in results.items()},
              "comparison": rows, "plot": str(plot)}
    out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print()
    for row in rows:
        print(learning_line(row))
    rose = [row["metric"] for row in rows if row["separation"] > 0]
    print(f"\n{len(rose)} of {len(rows)} scores rose beyond their 95% intervals"
          f"{': ' + ', '.join(rose) if rose else ''}; {report['wall_s']:.0f} s; report {out_json}, curves {plot}")
    if not rose:
        print("ssp bench learning: FAIL: no score of the trained arm separates from the control's", file=sys.stderr)
        return 1
    return 0
