"""`ssp bench learner`'s transformers arm: the ratio's arithmetic, and one real run on the tiny shape that checks
both arms trained on the same batch (identical warm-up loss) and that the report carries the ratio line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssp.bench.learner import ratio_line, summarize_comparison
from ssp.paths import PROJECT_ROOT


def test_ratio_compares_median_steps_and_forward_backward_separately() -> None:
    # (forward+backward s, whole step s) per timed step; medians: learner (2, 3), transformers (1.5, 2)
    c = summarize_comparison(learner=[(2.0, 3.0), (2.2, 3.1), (1.9, 2.9)],
                             transformers=[(1.5, 2.0), (1.4, 2.1), (1.6, 1.9)],
                             tokens=600, params=1_000_000, gemm_gflops=10.0)
    ours, theirs = c["learner"], c["transformers"]
    assert ours["step_s"] == 3.0 and ours["fwd_bwd_s"] == 2.0 and ours["optimizer_s"] == pytest.approx(1.0)
    assert ours["tokens_per_s"] == 200.0 and theirs["tokens_per_s"] == 300.0
    assert c["ratio"] == pytest.approx(2 / 3)  # < 1: the learner is slower
    assert c["fwd_bwd_ratio"] == pytest.approx(1.5 / 2.0)
    assert ours["gflops"] == pytest.approx(6 * 1e6 * 200 / 1e9)  # 6 x params x tokens/s
    assert theirs["of_gemm_bound"] == pytest.approx(6 * 1e6 * 300 / 1e9 / 10.0)
    line = ratio_line(c)
    assert line.startswith("learner/transformers tokens/s ratio: 0.67 (learner 200.0 tokens/s")
    assert "transformers 300.0 tokens/s" in line


def test_both_arms_train_on_the_same_batch(tmp_path: Path) -> None:
    out = tmp_path / "learner.json"
    # A learner test earlier in this pytest process may have set torch.distributed's variables for its own group
    # (whose port it still holds); the bench must start its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "ssp.cli", "bench", "learner", "--tp", "--steps", "1", "--groups",
                           "1", "--seq-len", "24", "--threads", "1", "--warmup-steps", "1", "--out", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.loads(out.read_text())["vs_transformers"]
    assert c["first_loss"]["learner"] == pytest.approx(c["first_loss"]["transformers"], rel=1e-4, abs=1e-6)
    assert c["tokens_per_step"] == 5 * 24 and c["micro_batches"] >= 1
    assert "learner/transformers tokens/s ratio: " in proc.stdout
    assert ratio_line(c) in out.with_suffix(".md").read_text()
