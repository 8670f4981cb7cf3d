"""Bounded dedup: checkpoints keep only the recent window of group ids, and the engine's resend is still recognised."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
from learner_tiny import make_groups

from ssp.engine.stream import TrajectoryStream
from ssp.learner.config import LearnerConfig
from ssp.learner.dedup import RecentGroups


def test_the_default_window_covers_the_engines_resend_window() -> None:
    resend = inspect.signature(TrajectoryStream).parameters["resend_window_bytes"].default
    assert LearnerConfig().dedup_window_bytes >= resend


def test_recent_groups_keep_the_last_window_bytes_and_always_the_newest() -> None:
    recent = RecentGroups(100)
    for i, size in enumerate([40, 30, 20, 60]):
        recent.add(f"g{i}", size)
    assert recent.ids() == ["g2", "g3"] and "g1" not in recent and "g3" in recent  # 20 + 60 <= 100 < 30 + 20 + 60
    recent.add("big", 500)  # larger than the window on its own: kept, as the engine keeps its newest frame
    assert recent.ids() == ["big"] and recent.sizes() == [500]
    assert RecentGroups(100, recent.ids(), recent.sizes()).ids() == ["big"]
    with pytest.raises(ValueError, match="2 group ids but 1 frame sizes"):
        RecentGroups(100, ["a", "b"], [1])


class BreakingSink:
    """An engine FrameSink whose connection breaks after `ok` frames (those reach the learner's file)."""

    def __init__(self, path: Path, ok: int) -> None:
        self.path, self.ok = path, ok

    async def write(self, frame: bytes) -> None:
        if self.ok == 0:
            raise ConnectionResetError("connection reset by peer")
        self.ok -= 1
        with self.path.open("ab") as f:
            f.write(frame)

    async def close(self) -> None:
        pass


def _states(out_dir: Path) -> list[dict]:
    return [json.loads((d / "state.json").read_text()) for d in sorted((out_dir / "checkpoints").glob("step-*"))]


async def test_resent_groups_are_skipped_with_a_bounded_checkpoint(tiny_llama: Path, tmp_path: Path,
                                                                   par1: object) -> None:
    """The real engine stream breaks after 8 frames and spills its resend window plus 4 unsent groups; the learner
    (window as small as the engine's) trains all 12 groups exactly once and never stores more than the window."""
    from ssp.learner.trainer import run

    groups = make_groups(12, seed=21)
    window = 3000  # bytes: about 3 of these frames (~0.9-1 kB each); the engine and the learner use the same
    stream_file, spill = tmp_path / "stream.frames", tmp_path / "spill.frames"
    stream = TrajectoryStream(BreakingSink(stream_file, ok=8), max_frame_bytes=1 << 20, queue_groups=16,
                              spill_path=spill, resend_window_bytes=window)
    for g in groups:
        await stream.put(g)
    await stream.finish()
    stats = await stream.run()
    assert stats.frames_sent == 8 and stats.frames_resent_to_spill >= 3 and stats.frames_spilled == 4

    cfg = LearnerConfig(model_dir=tiny_llama, out_dir=tmp_path / "run", groups_per_step=2, lr=1e-3, warmup_steps=0,
                        vocab_divisor=8, micro_batch_tokens=48, drop_zero_variance_groups=False,
                        keep_checkpoints=100, dedup_window_bytes=window)
    assert run(cfg, str(stream_file), []) == 0  # the learner read everything sent before the break
    # the resumed learner gets the spill file after what it read (it resumes at the checkpoint's offset)
    stream_file.write_bytes(stream_file.read_bytes() + spill.read_bytes())
    assert run(replace(cfg), str(stream_file), []) == 0

    lines = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6] and sum(r["groups"] for r in lines) == 12
    states = _states(cfg.out_dir)
    assert states[-1]["groups_consumed"] == 12
    for state in states:
        ids, sizes = state["consumed_group_ids"], state["consumed_group_bytes"]
        assert len(ids) == len(sizes) and (sum(sizes[1:]) <= window or len(ids) == 1)
        assert len(ids) < state["groups_consumed"] or state["step"] == 1  # bounded: never the whole history
    final = states[-1]["consumed_group_ids"]
    assert final == [g[0].group_id for g in groups[len(groups) - len(final):]]  # the newest, in stream order
