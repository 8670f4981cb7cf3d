"""ssp.learner.checkpoint never deletes the checkpoint `latest` names before its replacement is in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ssp.learner import checkpoint
from ssp.learner.config import LearnerConfig
from ssp.learner.optimizer import build_optimizer


def _save(root: Path, step: int, keep: int = 2) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer, scheduler = build_optimizer(list(model.named_parameters()), LearnerConfig())
    checkpoint.save(root, checkpoint.StreamState(step=step), model, optimizer, scheduler, tp_rank=0, dp_rank=0,
                    keep=keep)


def test_saving_a_step_again_keeps_the_old_checkpoint_until_latest_names_the_new(par1: Any, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 7)
    first = checkpoint.latest(tmp_path)
    assert first is not None and first.name == "step-000007"

    # A crash as the new folder is moved into place: the checkpoint `latest` names must still be there, whole.
    real_rename = os.rename

    def crash_on_publish(src: Any, dst: Any) -> None:
        if Path(src).name == "step-000007.tmp":
            raise OSError("simulated crash while publishing")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_publish)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 7)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path) == first and (first / "tp0.pt").is_file()

    # Saved again without a crash: the new one is `latest`, kept beside the old one (keep = 2), then pruned (keep = 1).
    _save(tmp_path, 7)
    again = checkpoint.latest(tmp_path)
    assert again is not None and again != first and (again / "state.json").is_file()
    _save(tmp_path, 8, keep=1)
    kept = sorted(p.name for p in tmp_path.glob("step-*"))
    assert kept == ["step-000008"], kept
