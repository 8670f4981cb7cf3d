"""The engine of a training run: the same pieces as `ssp rollout` (ssp.engine.assemble), streaming to the learner over
TCP, keeping a copy of every n-th group in the run folder, with the monitor feeding the scheduler the policy version
of the servers the pool routes to."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssp.launcher.monitor import ComponentFailed, Monitor
from ssp.metrics import MetricsLog
from ssp.run_config import SSPConfig

if TYPE_CHECKING:
    from ssp.engine.pool import InferencePool
    from ssp.engine.stream import FileSink

log = logging.getLogger(__name__)


class SamplesWriteFailed(RuntimeError):
    """The run's copy of its trajectory groups could not be written (a full disk, most often)."""


class SampleSink:
    """A FrameSink that forwards every frame to the learner and keeps a copy of every `every`-th one in a file
    (the run's trajectory samples, readable with `ssp inspect`).

    A failed copy raises SamplesWriteFailed, not the OSError itself: the stream takes an OSError for a broken
    learner connection, and a full disk must be reported as what it is."""

    def __init__(self, inner: Any, samples: FileSink, every: int) -> None:
        self._inner = inner
        self._samples = samples
        self._every = every
        self._n = 0
        self._failed = False

    async def write(self, frame: bytes) -> None:
        await self._inner.write(frame)
        if self._every and self._n % self._every == 0 and not self._failed:
            try:
                await self._samples.write(frame)
            except OSError as e:
                self._failed = True
                raise SamplesWriteFailed(
                    f"keeping a copy of the trajectory groups in {self._samples.path} failed ({e}); the learner got "
                    "the group. Free disk space there, or keep no copies (train.sample_every = 0), and continue "
                    "with --resume") from e
        self._n += 1

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            if self._failed:  # closing flushes what the full disk refused: it would fail the same way again
                with contextlib.suppress(OSError):
                    await self._samples.close()
            else:
                await self._samples.close()


async def admitted_version(pool: InferencePool) -> int:
    """The policy version of the servers the pool routes to: the lowest among them. A server that is down, or
    restarted and waiting for the learner's weights (not re-admitted yet), does not hold the run's version back:
    with it counted, the staleness gate would stop new episodes, the learner would wait for groups, and the push
    that brings the restarted server its weights would never come."""
    from ssp.engine.rollout import parse_version

    versions = await pool.weight_versions()
    admitted = pool.admitted_urls()
    live = [parse_version(v) for url, v in versions.items()
            if v is not None and (admitted is None or url in admitted)]
    if not live:
        raise RuntimeError(f"no admitted inference server answers /model_info (versions: {versions})")
    return min(live)


async def run_training_engine(cfg: SSPConfig, monitor: Monitor, run_dir: Path) -> dict[str, Any]:
    """The engine of a training run: the same pieces as `ssp rollout` (ssp.engine.assemble), streaming to the learner,
    with the monitor feeding the scheduler the learner's policy version. Returns the scheduler's summary."""
    from ssp.engine.assemble import build_scheduler, open_engine
    from ssp.engine.stream import FileSink, TcpSink, TrajectoryStream
    from ssp.engine.wire import HandshakeError, terms_of

    # A resumed run draws new seeds and distractors instead of replaying the first run's.
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler,
                                                                 seed=cfg.scheduler.seed + monitor.start_step))
    try:
        tcp = await monitor.guard(TcpSink.connect(cfg.stream.host, cfg.stream.port,
                                                  cfg.train.learner_start_timeout_s, terms_of(cfg.stream)))
    except HandshakeError as e:
        raise ComponentFailed("trajectory stream", f"{cfg.stream.host}:{cfg.stream.port}: {e}",
                              monitor.learner.log_path if monitor.learner is not None else None) from None
    sink = SampleSink(tcp, FileSink(run_dir / "samples.frames"), cfg.train.sample_every)
    stream = TrajectoryStream(sink, max_frame_bytes=cfg.stream.max_frame_bytes, queue_groups=cfg.stream.queue_groups,
                              spill_path=cfg.stream.spill_path or run_dir / "spill.frames")
    monitor.stream = stream
    engine_metrics = MetricsLog(run_dir / "engine.jsonl")
    try:
        engine_cfg = cfg.engine()
        async with open_engine(engine_cfg) as parts:
            scheduler = build_scheduler(engine_cfg, parts, stream, metrics=engine_metrics)
            monitor.scheduler = scheduler
            engine = asyncio.create_task(scheduler.run(None), name="engine")
            watch = asyncio.create_task(monitor.run(lambda: admitted_version(parts.pool)), name="monitor")
            try:
                done, _ = await asyncio.wait({engine, watch}, return_when=asyncio.FIRST_COMPLETED)
                if engine in done:
                    error = engine.exception()
                    message = (f"{type(error).__name__}: {error}" if error is not None else
                               "the scheduler returned before the learner reached train.steps")
                    if error is not None:
                        log.error("engine failed", exc_info=error)
                    raise ComponentFailed("engine", message, monitor.engine_log)
                watch.result()  # raises the monitor's ComponentFailed
            finally:
                for task in (engine, watch):
                    task.cancel()
                await asyncio.wait({engine, watch}, timeout=cfg.train.stop_timeout_s)
            summary = scheduler.summary()
            summary["judge"] = dict(parts.judge.counts)
            return summary
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            await sink.close()
        engine_metrics.close()
