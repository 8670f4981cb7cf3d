"""The watchdog of a training run (`Monitor`): process deaths (with restarts of servers the run started), a broken
trajectory stream, the servers' weight version fed to the scheduler's staleness gate, and the learner's step records
turned into step rows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ssp.launcher.progress import ProgressDisplay, Snapshot, step_row
from ssp.launcher.run_folder import run_dir_of
from ssp.launcher.server_restarts import ServerRestarts
from ssp.metrics import MetricsLog, read_metrics
from ssp.processes import ManagedProcess, ProcessSet
from ssp.run_config import SSPConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class ComponentFailed(RuntimeError):
    """A piece of the run died or broke; `component` names it and `log_path` is where to look."""

    def __init__(self, component: str, message: str, log_path: Path | None) -> None:
        where = f"; its log is {log_path}" if log_path is not None and str(log_path) not in message else ""
        super().__init__(f"{component} failed: {message}{where}")
        self.component = component
        self.log_path = log_path


class Monitor:
    """The run's watchdog and clock: process deaths, a broken trajectory stream, the servers' weight version (fed to
    the scheduler's staleness gate), and the learner's step records (turned into step rows)."""

    def __init__(self, cfg: SSPConfig, *, procs: ProcessSet, learner: ManagedProcess | None,
                 start_step: int, learner_metrics: Path, display: ProgressDisplay, metrics: MetricsLog,
                 restarts: ServerRestarts | None = None) -> None:
        self.cfg = cfg
        self.procs = procs
        self.restarts = restarts
        self.learner = learner
        self.start_step = start_step
        self.learner_metrics = learner_metrics
        self.display = display
        self.metrics = metrics
        self.engine_log = run_dir_of(cfg) / "logs" / "engine.log"
        self.rows: list[dict[str, Any]] = []
        self.version = start_step
        self.last_step = start_step
        self.stream: Any = None
        self.scheduler: Any = None
        self._snapshot: Snapshot | None = None

    def check_processes(self) -> None:
        """Raise ComponentFailed for a dead process (unless it is a server `restarts` starts again); a learner that
        exited 0 is done, not failed."""
        for process in list(self.procs.processes):
            if process.alive() or (process is self.learner and process.proc.returncode == 0):
                continue
            if self.restarts is not None and self.restarts.try_restart(process):
                continue
            raise ComponentFailed(process.name, str(process.failure()), process.log_path)
        if self.learner is not None and not self.learner.alive() and self.last_step < self.cfg.train.steps:
            self._read_learner_steps()
            if self.last_step < self.cfg.train.steps:
                raise ComponentFailed("learner", f"exited at step {self.last_step}, before train.steps = "
                                      f"{self.cfg.train.steps}", self.learner.log_path)

    def check_stream(self) -> None:
        if self.stream is not None and self.stream.stats.error is not None:
            log_path = self.learner.log_path if self.learner is not None else None
            raise ComponentFailed("learner", f"the trajectory stream to {self.cfg.stream.host}:{self.cfg.stream.port}"
                                  f" broke ({self.stream.stats.error}); unsent groups are in "
                                  f"{self.stream.stats.spill_path}", log_path)

    async def guard(self, work: Awaitable[T]) -> T:
        """Await `work`, failing as soon as a process dies (e.g. while waiting for the learner to listen)."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                self.check_processes()
                await asyncio.wait({task}, timeout=self.cfg.train.poll_interval_s)
            return task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @staticmethod
    async def server_version(read: Callable[[], Awaitable[int]]) -> int | None:
        """The policy version every admitted server holds (the smallest); None while none answers."""
        try:
            return await read()
        except Exception as e:  # a dying server: the process check or the pool reports it
            log.debug("weight version poll failed: %s", e)
            return None

    def _read_learner_steps(self) -> None:
        """Turn the learner's new step records into rows (shown, logged)."""
        if self.scheduler is None or not self.learner_metrics.is_file():
            return
        for record in read_metrics(self.learner_metrics):
            if "trained" not in record or int(record["step"]) <= self.last_step:  # e.g. the initial push's line
                continue
            self._add_row(int(record["step"]), record)

    def _add_row(self, step: int, learner: dict[str, Any] | None) -> None:
        now = Snapshot.of(self.scheduler.counters)
        row = step_row(step, self._snapshot or now, now, learner)
        self._snapshot = now
        self.last_step = step
        self.rows.append(row)
        self.metrics.write(row)
        self.display.add(row)

    async def run(self, read_version: Callable[[], Awaitable[int]]) -> None:
        """Until the learner has pushed train.steps: check, feed the gate, show steps. Raises on a failure.
        `read_version` reads the servers' policy version (admitted_version)."""
        steps = self.cfg.train.steps
        self._snapshot = Snapshot.of(self.scheduler.counters)
        while True:
            self.check_processes()
            self.check_stream()
            version = await self.server_version(read_version)
            if version is not None and version > self.version:
                self.version = version
                await self.scheduler.set_policy_version(version - self.start_step)
            self._read_learner_steps()
            if not self.learner_metrics.is_file():  # attached learner, metrics not visible: steps = versions
                while self.last_step < min(self.version, steps):
                    self._add_row(self.last_step + 1, None)
            c = self.scheduler.counters
            self.display.status(version=self.version, episodes=c.finished, inflight=self.scheduler.gate.inflight,
                                failed=c.failed)
            if self.last_step >= steps and self.version >= steps:
                return
            await asyncio.sleep(self.cfg.train.poll_interval_s)


def check_alive(procs: ProcessSet, finished: ManagedProcess | None = None) -> None:
    """Raise ComponentFailed for a process that has exited, except `finished` (the learner, done after its last
    step)."""
    for process in procs.processes:
        if process is not finished and not process.alive():
            raise ComponentFailed(process.name, str(process.failure()), process.log_path)
