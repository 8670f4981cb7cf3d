"""Builds the engine from its config sections (EngineConfig) and runs it: the one place that knows every component.

    async with InferencePool(cfg.inference) as pool:          # generation
      retriever = make_retriever(cfg.retriever)                # search (+ SearchBatcher over it)
      Judge(cfg.game.judge), ChatTokenizer(cfg.rollout), Game(cfg.game), TrajectoryStream(cfg.stream)
      Scheduler(cfg.scheduler).run(episodes)

Each component still gets only its own section; this module is the composition root that hands them out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import EngineConfig, SchedulerConfig
from ssp.engine.game import Game
from ssp.engine.judge import Judge
from ssp.engine.pool import InferencePool
from ssp.engine.rollout import RolloutRunner, parse_version
from ssp.engine.scheduler import Scheduler
from ssp.engine.search_batcher import SearchBatcher
from ssp.engine.seeds import Seed, load_seed_answers, seed_stream
from ssp.engine.stream import FileSink, FrameSink, TcpSink, TrajectoryStream
from ssp.engine.wire import terms_of
from ssp.metrics import MetricsLog
from ssp.paths import artifacts_dir, default_model_dir
from ssp.retriever.protocol import Retriever
from ssp.retriever.registry import make_retriever


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


async def served_version(pool: InferencePool) -> int:
    """The policy version every server has: the lowest weight version among them (SGLang "default" = 0)."""
    infos = await pool.model_infos()
    return min(parse_version(str(info.get("weight_version", "default"))) for info in infos.values())


def scheduler_seeds(cfg: SchedulerConfig) -> Iterator[Seed]:
    """The endless shuffled seed answers a scheduler with this config plays."""
    return seed_stream(load_seed_answers(cfg.seeds_file), hops_min=cfg.hops_min, hops_max=cfg.hops_max,
                       seed=cfg.seed)


def build_scheduler(cfg: EngineConfig, parts: EngineParts, stream: TrajectoryStream, *,
                    metrics: MetricsLog | None = None,
                    policy_version: Callable[[], Awaitable[int]] | None = None,
                    on_episode: Callable[[bool], None] | None = None) -> Scheduler:
    """A Scheduler over the engine's game, sized to the pool's capacity, reporting pool and search statistics."""
    capacity = sum(s.capacity for s in parts.pool.metrics().servers)
    return Scheduler(parts.game, scheduler_seeds(cfg.scheduler), stream, cfg.scheduler, capacity=capacity,
                     solver_group_size=cfg.game.solver_group_size, metrics=metrics,
                     pool_stats=lambda: pool_summary(parts.pool), search_stats=parts.batcher.summary,
                     policy_version=policy_version, on_episode=on_episode)


@dataclass(slots=True)
class EngineParts:
    """The engine's components, built from one config (see `open_engine`)."""

    chat: ChatTokenizer
    pool: InferencePool
    retriever: Retriever
    batcher: SearchBatcher
    judge: Judge
    game: Game


@contextlib.asynccontextmanager
async def open_engine(cfg: EngineConfig) -> AsyncIterator[EngineParts]:
    """Open the pool, retriever, search batcher and judge, and build the game on them; closes them all on exit."""
    chat = ChatTokenizer.load(cfg.rollout.tokenizer_dir or default_model_dir())
    retriever = make_retriever(cfg.retriever)
    batcher = SearchBatcher(retriever, cfg.search, k=cfg.retriever.topk, prepare=chat.cache_documents)
    try:
        async with InferencePool(cfg.inference) as pool, Judge(cfg.game.judge) as judge:
            runner = RolloutRunner(pool, chat, batcher, cfg.rollout)
            game = Game(runner, chat, judge, cfg.game, random.Random(cfg.scheduler.seed))
            yield EngineParts(chat, pool, retriever, batcher, judge, game)
    finally:
        await batcher.close()
        await retriever.close()


async def run_engine(cfg: EngineConfig, *, episodes: int | None, out: Path | None = None,
                     metrics_path: Path | None = None,
                     on_episode: Callable[[bool], None] | None = None) -> dict[str, Any]:
    """Play `episodes` episodes (None: until stopped) and stream the groups to `out` (a frames file) or, when
    `out` is None, to the learner at stream.host:stream.port. Returns the run summary."""
    if out is None and cfg.stream.port == 0:
        raise ValueError("nowhere to send trajectories: pass an output file, or set stream.port to the learner's "
                         "trajectory port")
    if out is not None:
        # No learner reads a file while it is written: there is no policy version to be stale against.
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, eta=None))
    spill = cfg.stream.spill_path or artifacts_dir() / "runs" / f"spill-{time.strftime('%Y%m%d-%H%M%S')}.frames"
    metrics = MetricsLog(metrics_path) if metrics_path is not None else None
    try:
        async with open_engine(cfg) as parts:
            sink: FrameSink = (FileSink(out) if out is not None else
                               await TcpSink.connect(cfg.stream.host, cfg.stream.port, cfg.stream.connect_timeout_s,
                                                     terms_of(cfg.stream)))
            stream = TrajectoryStream(sink, max_frame_bytes=cfg.stream.max_frame_bytes,
                                      queue_groups=cfg.stream.queue_groups, spill_path=spill)
            try:
                scheduler = build_scheduler(
                    cfg, parts, stream, metrics=metrics, on_episode=on_episode,
                    policy_version=None if out is not None else lambda: served_version(parts.pool))
                summary = await scheduler.run(episodes)
            finally:
                await sink.close()  # already closed by the stream after a normal run; closing again is harmless
            summary["judge"] = dict(parts.judge.counts)
            return summary
    finally:
        if metrics is not None:
            metrics.close()
