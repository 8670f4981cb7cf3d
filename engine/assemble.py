"""Builds the engine from the root config and runs it: the one place that knows every component.

    async with InferencePool(cfg.inference) as pool:          # generation
      retriever = make_retriever(cfg.retriever)                # search (+ SearchBatcher over it)
      Judge(cfg.game.judge), ChatTokenizer(cfg.rollout), Game(cfg.game), TrajectoryStream(cfg.stream)
      Scheduler(cfg.scheduler).run(episodes)

Each component still gets only its own section; this module is the composition root that hands them out.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

from engine.aio import freeze_startup_objects
from engine.chat import ChatTokenizer
from engine.game import Game
from engine.judge import Judge
from engine.pool import InferencePool
from engine.rollout import RolloutRunner
from engine.scheduler import Scheduler
from engine.search_batcher import SearchBatcher
from engine.seeds import load_seed_answers, seed_stream
from engine.stream import FileSink, FrameSink, TcpSink, TrajectoryStream
from retriever.registry import make_retriever
from ssp.metrics import MetricsLog
from ssp.paths import artifacts_dir, default_model_dir
from ssp.run_config import SSPConfig


def pool_summary(pool: InferencePool) -> dict[str, Any]:
    """Slot occupancy and queue depth of the pool, flattened for a metrics line."""
    m = pool.metrics()
    capacity = sum(s.capacity for s in m.servers)
    return {
        "slot_occupancy": round(sum(s.in_flight for s in m.servers) / capacity, 4) if capacity else 0.0,
        "slot_occupancy_mean": round(sum(s.mean_occupancy * s.capacity for s in m.servers) / capacity, 4)
        if capacity else 0.0,
        "pool_queue_depth": m.queue_depth,
        "pool_queue_depth_max": m.max_queue_depth,
        "pool_retries": m.retries,
        "servers_healthy": sum(s.healthy for s in m.servers),
    }


async def run_engine(cfg: SSPConfig, *, episodes: int | None, out: Path | None = None,
                     metrics_path: Path | None = None) -> dict[str, Any]:
    """Play `episodes` episodes (None: until stopped) and stream the groups to `out` (a frames file) or, when
    `out` is None, to the learner at stream.host:stream.port. Returns the run summary."""
    if out is None and cfg.stream.port == 0:
        raise ValueError("nowhere to send trajectories: pass an output file, or set stream.port to the learner's "
                         "trajectory port")
    sched_cfg = cfg.scheduler
    if out is not None:
        # No learner reads a file while it is written: there is no policy version to be stale against.
        sched_cfg = dataclasses.replace(sched_cfg, eta=None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spill = cfg.stream.spill_path or artifacts_dir() / "runs" / f"spill-{stamp}.frames"
    chat = ChatTokenizer.load(cfg.rollout.tokenizer_dir or default_model_dir())
    answers = load_seed_answers(cfg.scheduler.seeds_file)
    seeds = seed_stream(answers, hops_min=cfg.scheduler.hops_min, hops_max=cfg.scheduler.hops_max,
                        seed=cfg.scheduler.seed)
    sink: FrameSink = (FileSink(out) if out is not None else
                       await TcpSink.connect(cfg.stream.host, cfg.stream.port, cfg.stream.connect_timeout_s))
    stream = TrajectoryStream(sink, max_frame_bytes=cfg.stream.max_frame_bytes, queue_groups=cfg.stream.queue_groups,
                              spill_path=spill)
    retriever = make_retriever(cfg.retriever)
    batcher = SearchBatcher(retriever, cfg.search, k=cfg.retriever.topk)
    metrics = MetricsLog(metrics_path) if metrics_path is not None else None
    try:
        async with InferencePool(cfg.inference) as pool, Judge(cfg.game.judge) as judge:
            runner = RolloutRunner(pool, chat, batcher, cfg.rollout)
            game = Game(runner, chat, judge, cfg.game, random.Random(cfg.scheduler.seed))
            capacity = sum(s.capacity for s in pool.metrics().servers)
            scheduler = Scheduler(game, seeds, stream, sched_cfg, capacity=capacity,
                                  solver_group_size=cfg.game.solver_group_size, metrics=metrics,
                                  pool_stats=lambda: pool_summary(pool), search_stats=batcher.stats.summary)
            freeze_startup_objects()
            summary = await scheduler.run(episodes)
            summary["judge"] = dict(judge.counts)
            return summary
    finally:
        await batcher.close()
        await retriever.close()
        await sink.close()  # already closed by the stream after a normal run; closing again is harmless
        if metrics is not None:
            metrics.close()
