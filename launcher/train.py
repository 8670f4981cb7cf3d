"""`ssp train`: one run of Search Self-Play, every piece started (or attached to) and watched by one command.

    ssp train --config configs/demo.toml [--resume] [--set key=value ...]

    ┌ processes (ssp.processes.ProcessSet, logs in <run>/logs/) ──────────────────────────────────────────┐
    │ server-0..N-1   `ssp model serve` on free ports            (or attach: train.server_urls)                │
    │ retriever       `ssp retriever serve` (kind = "http" with train.start_retriever; "tantivy" is in-process)│
    │ learner         `ssp learner train` → torchrun, TP x DP ranks, listens on tcp://127.0.0.1:<free port>    │
    │                 (or attach: train.learner_address)                                                       │
    └──────────────────────────────────────────────────────────────────────────────────────────────────────────┘
    this process:  [eval before] → engine (Scheduler → TrajectoryStream → TCP → learner)  → [eval after]
                                     ▲                                        │ train step k, checkpoint,
                                     └── policy version k: the servers' weight version ◄── push "k" to servers

Staleness: the scheduler's gate needs the learner's policy version. The learner pushes weights after every step with
weight_version = str(step), so the version the engine may count on is the smallest weight version over its servers
(minus the step the run resumed from: the gate counts this run's episodes). The monitor polls it every
train.poll_interval_s, together with the processes' liveness and the learner's metrics (for the step table).

Ends: (1) the learner has pushed train.steps → the engine is stopped (episodes still in flight would train a step the
run does not take, so they are cancelled), the learner exits after its final checkpoint; (2) a process dies → its
name, exit code and log in one message, everything stopped, the last checkpoint stays resumable, except a server this
run started while another still runs: that one is restarted on its port (train.max_server_restarts in all; see
launcher/server_restarts.py) and the run goes on; (3) Ctrl-C or
SIGTERM → everything stopped, the same. `--resume` restarts every piece; the learner restores its latest checkpoint
(weights, optimizer, consumed group ids) and pushes those weights before the engine's new episodes count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from ssp.run_key import RunKeyError, load_run_key, write_run_key
from ssp.processes import ManagedProcess, ProcessFailed, ProcessSet, free_port
from launcher.progress import PLOT_KEYS, ProgressDisplay, Snapshot, format_summary, step_row
from launcher.server_restarts import ServerRestarts
from ssp.config import to_dict, to_toml
from ssp.metrics import MetricsLog, plot_metrics, read_metrics
from ssp.paths import artifacts_dir
from ssp.run_config import SSPConfig, check_sampling_matches_learner, learner_staleness_bound
from ssp.trackers import Trackers, open_trackers

if TYPE_CHECKING:
    from engine.pool import InferencePool
    from engine.stream import FileSink

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainError(RuntimeError):
    """The run cannot start as configured (the message names the key or file and the fix)."""


class ComponentFailed(RuntimeError):
    """A piece of the run died or broke; `component` names it and `log_path` is where to look."""

    def __init__(self, component: str, message: str, log_path: Path | None) -> None:
        where = f"; its log is {log_path}" if log_path is not None and str(log_path) not in message else ""
        super().__init__(f"{component} failed: {message}{where}")
        self.component = component
        self.log_path = log_path


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResult:
    """What a finished run did: the steps, the engine's totals, the evaluations and where everything is."""

    run_dir: Path
    start_step: int
    steps: int
    rows: list[dict[str, Any]]
    engine: dict[str, Any]
    before: Any
    """engine.evaluation.EvalResult before the first step (None without train.eval_datasets or eval_seeds)."""
    after: Any
    """engine.evaluation.EvalResult after the last step."""
    policy: Path | None
    """The trained policy as a Hugging Face directory (train.export_policy), None when not exported."""
    wall_s: float


def run_dir_of(cfg: SSPConfig) -> Path:
    return cfg.train.run_dir or artifacts_dir() / "runs" / cfg.train.name


def learner_dir_of(cfg: SSPConfig) -> Path:
    """The learner's out_dir: inside the run folder when ssp train starts it; the configured one when attached."""
    return run_dir_of(cfg) / "learner" if cfg.train.learner_address is None else cfg.learner.out_dir


def checkpoint_step(learner_dir: Path) -> int | None:
    """Step of the learner's latest complete checkpoint, None when there is none."""
    from learner import checkpoint

    path = checkpoint.latest(learner_dir / "checkpoints")
    if path is None:
        return None
    return int(json.loads((path / "state.json").read_text())["step"])


def check_config(cfg: SSPConfig) -> None:
    """Rules that tie sections together (each section checks its own keys)."""
    check_sampling_matches_learner(cfg)
    if cfg.scheduler.episodes_per_step != cfg.learner.groups_per_step:
        raise TrainError(f"scheduler.episodes_per_step = {cfg.scheduler.episodes_per_step} but learner."
                         f"groups_per_step = {cfg.learner.groups_per_step}: the engine's staleness gate counts "
                         "episodes per policy version, the learner consumes groups per step; set both to the same "
                         "number")
    eta, bound = cfg.scheduler.eta, cfg.learner.max_staleness
    if bound is not None and (eta is None or bound < eta):
        raise TrainError(f"learner.max_staleness = {bound} but scheduler.eta = {eta}: the engine lets groups be up to "
                         "eta versions old when trained, and the learner would drop those; leave "
                         "learner.max_staleness unset (ssp train sets it to eta) or raise it to eta")
    missing = [str(p) for p in cfg.train.eval_datasets if not p.is_file()]
    if missing:
        raise TrainError(f"train.eval_datasets: {', '.join(missing)} not found (relative paths are read from the "
                         "current directory); run from the checkout or give absolute paths")
    for heldout in cfg.train.eval_seeds:
        from engine.seeds import SeedError, load_seed_answers, shared_answers

        try:
            shared = shared_answers(load_seed_answers(cfg.scheduler.seeds_file), load_seed_answers(heldout))
        except SeedError as e:
            raise TrainError(f"train.eval_seeds / scheduler.seeds_file: {e}") from None
        if shared:
            raise TrainError(f"train.eval_seeds = {heldout} shares {len(shared)} answer(s) with "
                             f"scheduler.seeds_file = {cfg.scheduler.seeds_file} (e.g. {shared[:3]}): the proposer "
                             "would be evaluated on answers it trained on; split them (data/seeds/split_heldout.py "
                             "shows how)")
    if cfg.learner.checkpoint_every != 1:
        log.warning("learner.checkpoint_every = %d: not every step is checkpointed (0: only the last one); a run "
                    "stopped in between resumes from its last checkpoint and redoes the steps since on new episodes",
                    cfg.learner.checkpoint_every)


# ------------------------------------------------------------------------------------------------ the processes


def start_retriever(procs: ProcessSet, cfg: SSPConfig, *, key_file: Path, logs: Path, timeout_s: float) -> str:
    """Start `ssp retriever serve` on a free loopback port, keyed with `key_file`; its base URL once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "ssp.cli", "retriever", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--set", f"retrieval_server.api_key_file={json.dumps(str(key_file))}"]
    if cfg.retrieval_server.index_dir is not None:
        argv += ["--index", str(cfg.retrieval_server.index_dir)]
    process = procs.start("retriever", argv, log_path=logs / "retriever.log")
    url = f"http://127.0.0.1:{port}"
    process.wait_ready(url=f"{url}/health", timeout_s=timeout_s)
    return url


def learner_argv(config_path: Path, trajectories: str, server_urls: list[str]) -> list[str]:
    """The learner as `ssp learner train` runs it (torchrun with TP x DP ranks from [learner])."""
    argv = [sys.executable, "-m", "ssp.cli", "learner", "train", "--config", str(config_path), "--trajectories",
            trajectories]
    for url in server_urls:
        argv += ["--server", url]
    return argv


# ------------------------------------------------------------------------------------------------ the engine


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


async def admitted_version(pool: InferencePool) -> int:
    """The policy version of the servers the pool routes to: the lowest among them. A server that is down, or
    restarted and waiting for the learner's weights (not re-admitted yet), does not hold the run's version back:
    with it counted, the staleness gate would stop new episodes, the learner would wait for groups, and the push
    that brings the restarted server its weights would never come."""
    from engine.rollout import parse_version

    versions = await pool.weight_versions()
    admitted = pool.admitted_urls()
    live = [parse_version(v) for url, v in versions.items()
            if v is not None and (admitted is None or url in admitted)]
    if not live:
        raise RuntimeError(f"no admitted inference server answers /model_info (versions: {versions})")
    return min(live)


async def run_engine(cfg: SSPConfig, monitor: Monitor, run_dir: Path) -> dict[str, Any]:
    """The engine of a training run: the same pieces as `ssp rollout` (engine.assemble), streaming to the learner,
    with the monitor feeding the scheduler the learner's policy version. Returns the scheduler's summary."""
    from engine.assemble import build_scheduler, open_engine
    from engine.stream import FileSink, TcpSink, TrajectoryStream
    from engine.wire import HandshakeError, terms_of

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
        async with open_engine(cfg.engine()) as parts:
            scheduler = build_scheduler(cfg.engine(), parts, stream, metrics=engine_metrics)
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


# ------------------------------------------------------------------------------------------------ the run


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C (KeyboardInterrupt), so every child is stopped and the message printed."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Every log record of the run goes to `path`; the console keeps only errors (the step table owns it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    console = [(h, h.level) for h in root.handlers]
    for h, _ in console:
        h.setLevel(logging.ERROR)
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        for h, level in console:
            h.setLevel(level)


def _run_async(coro: Awaitable[T]) -> T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def train(cfg: SSPConfig, *, resume: bool, progress: bool = True, out: Any = None) -> TrainResult:
    """Run (or with `resume`, continue) the training run described by `cfg`; see the module docstring.

    Raises TrainError (bad setup), ComponentFailed (a piece died; names it and its log) or Interrupted."""
    started = time.perf_counter()
    out = out or sys.stderr
    tc = cfg.train
    check_config(cfg)
    run_dir = run_dir_of(cfg)
    learner_dir = learner_dir_of(cfg)
    start_step = checkpoint_step(learner_dir) or 0
    if tc.learner_address is None:
        if start_step and not resume:
            raise TrainError(f"{run_dir} already holds a run at step {start_step}; continue it with --resume, or "
                             "start a new one under another name (--set train.name=NAME)")
        if resume and not run_dir.is_dir():
            raise TrainError(f"nothing to resume: {run_dir} does not exist; start the run without --resume")
    if start_step >= tc.steps:
        raise TrainError(f"the run in {run_dir} is already at step {start_step} >= train.steps = {tc.steps}; "
                         f"raise it (--set train.steps={start_step + tc.steps}) to train further")
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Trackers open first: a missing tracker library fails the run before anything starts.
    with contextlib.closing(open_trackers(cfg.metrics, run_dir, run_name=run_dir.name,
                                          config=to_dict(cfg))) as trackers, \
            _signals_as_interrupt(), _log_to(logs / "engine.log"), ProcessSet() as procs:
        try:
            return _train(cfg, procs, trackers, run_dir=run_dir, learner_dir=learner_dir, start_step=start_step,
                          progress=progress, out=out, started=started)
        except ProcessFailed as e:  # a process that died or never answered while starting
            name = next((p.name for p in procs.processes if str(e).startswith(p.name)), "a process")
            raise ComponentFailed(name, str(e), None) from None
        except KeyboardInterrupt as e:
            raise Interrupted(f"stopped by {e.args[0] if e.args else 'SIGINT'}") from None
        finally:
            procs.stop_all(timeout_s=10.0)


def _train(cfg: SSPConfig, procs: ProcessSet, trackers: Trackers, *, run_dir: Path, learner_dir: Path,
           start_step: int, progress: bool, out: Any, started: float) -> TrainResult:
    tc = cfg.train
    logs = run_dir / "logs"
    config_path = run_dir / "config.toml"
    # Resolve every address before anything starts, so every process reads the same config file.
    if tc.server_urls:
        urls = list(tc.server_urls)
        ports: list[int] = []
    else:
        ports = [free_port() for _ in range(tc.servers)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
    stream = dataclasses.replace(cfg.stream, spill_path=cfg.stream.spill_path or run_dir / "spill.frames")
    if tc.learner_address is None:
        # Both ends are ours: a fresh key for this run (also on --resume), read by the learner from its file.
        key_file = write_run_key(run_dir / "stream.key")
        stream = dataclasses.replace(stream, host="127.0.0.1", port=free_port(),
                                     run_id=stream.run_id or run_dir.name, key_file=key_file)
    else:  # attached: the learner's key and run id come from the config (stream.key_file or $SSP_RUN_KEY)
        host, _, port = tc.learner_address.rpartition(":")
        try:
            key = load_run_key(stream.key_file)  # before any server starts: the engine cannot stream without it
        except RunKeyError as e:
            raise TrainError(f"train.learner_address is set: {e}") from None
        # $SSP_RUN_KEY goes into a file (mode 0600): a file is the one way the servers below take a key.
        key_file = stream.key_file or write_run_key(run_dir / "stream.key", key.decode())
        stream = dataclasses.replace(stream, host=host, port=int(port), key_file=key_file)
    stream_host, stream_port = stream.host, stream.port
    # One secret per run: the servers and the retriever started here take the run key as their API key (admin
    # routes included), and their clients (the engine's pool, the evaluation, the learner's pusher) read the same
    # file.
    inference = dataclasses.replace(cfg.inference, server_urls=tuple(urls))
    if not tc.server_urls:  # attached servers keep the config's key
        inference = dataclasses.replace(inference, api_key=None, api_key_file=key_file)
    cfg = dataclasses.replace(
        cfg,
        inference=inference,
        serving=dataclasses.replace(cfg.serving, api_key=None, admin_api_key=None, api_key_file=key_file),
        stream=stream,
        learner=dataclasses.replace(cfg.learner, out_dir=learner_dir, max_steps=tc.steps,
                                    max_staleness=learner_staleness_bound(cfg),
                                    push_api_key_file=cfg.learner.push_api_key_file or inference.api_key_file),
    )
    if cfg.retriever.kind == "http" and tc.start_retriever:
        url = start_retriever(procs, cfg, key_file=key_file, logs=logs, timeout_s=tc.server_start_timeout_s)
        cfg = dataclasses.replace(cfg, retriever=dataclasses.replace(cfg.retriever, url=url, api_key_file=key_file))
    config_path.write_text(to_toml(cfg), encoding="utf-8")
    print(f"ssp train: run folder {run_dir} ({'resuming at step ' + str(start_step) if start_step else 'new run'}, "
          f"{tc.steps} steps of {cfg.scheduler.episodes_per_step} episodes)", file=out)
    if not tc.server_urls:
        print(f"ssp train: starting {tc.servers} reference server(s); logs in {logs}", file=out)
        _start_known_ports(procs, ports, config_path=config_path, logs=logs, timeout_s=tc.server_start_timeout_s)
    _write_processes(run_dir, procs, urls, cfg)

    before = None
    evaluated = bool(tc.eval_datasets or tc.eval_seeds)
    if evaluated and tc.eval_before:
        print(f"ssp train: evaluating the initial policy on {len(tc.eval_datasets)} QA dataset(s)"
              f"{' and the held-out seeds of ' + str(tc.eval_seeds[0]) if tc.eval_seeds else ''}", file=out)
        before = _evaluate(cfg, run_dir / "eval-before", progress)
        trackers.log_values(eval_scalars(before.to_json()), step=start_step)
        _check_alive(procs)

    learner: ManagedProcess | None = None
    if tc.learner_address is None:
        learner = procs.start("learner", learner_argv(config_path, f"tcp://{stream_host}:{stream_port}", urls),
                              log_path=logs / "learner.log")
        _write_processes(run_dir, procs, urls, cfg)
    print(f"ssp train: learner {'started' if learner else 'attached at ' + str(tc.learner_address)}, "
          f"{cfg.learner.tensor_parallel} x {cfg.learner.data_parallel} rank(s); engine streaming to "
          f"{stream_host}:{stream_port}", file=out)
    display = ProgressDisplay(total_steps=tc.steps, start_step=start_step, enabled=progress, out=out)
    metrics = MetricsLog(run_dir / "metrics.jsonl", trackers)
    restarts = None if tc.server_urls else ServerRestarts(
        procs, {f"server-{i}" for i in range(len(ports))}, budget=tc.max_server_restarts, out=out,
        on_restart=lambda: _write_processes(run_dir, procs, urls, cfg))
    monitor = Monitor(cfg, procs=procs, learner=learner, start_step=start_step,
                      learner_metrics=learner_dir / "metrics.jsonl", display=display, metrics=metrics,
                      restarts=restarts)
    try:
        engine = _run_async(run_engine(cfg, monitor, run_dir))
    finally:
        display.close()
        metrics.close()
    if learner is not None:  # it exits by itself after its last checkpoint
        try:
            learner.proc.wait(tc.stop_timeout_s)
        except subprocess.TimeoutExpired:  # still writing its last checkpoint, or hung: the run is not done
            raise ComponentFailed("learner", f"still running {tc.stop_timeout_s:g} s after the last step, so its last "
                                  "checkpoint may be cut off; raise train.stop_timeout_s on a slow disk and resume "
                                  "the run (--resume)", learner.log_path) from None
        if learner.proc.returncode != 0:
            raise ComponentFailed("learner", f"exited with code {learner.proc.returncode} after the last step",
                                  learner.log_path)
    policy = None
    if learner is not None and tc.export_policy:
        from learner.export import export_checkpoint

        print(f"ssp train: exporting the trained policy to {run_dir / 'policy'}", file=out)
        policy = export_checkpoint(learner_dir / "checkpoints", run_dir / "policy")

    after = None
    if evaluated:
        print("ssp train: evaluating the trained policy", file=out)
        after = _evaluate(cfg, run_dir / "eval-after", progress)
        trackers.log_values(eval_scalars(after.to_json()), step=tc.steps)
        _check_alive(procs, finished=learner)
    result = TrainResult(run_dir=run_dir, start_step=start_step, steps=monitor.last_step, rows=monitor.rows,
                         engine=engine, before=before, after=after, policy=policy,
                         wall_s=time.perf_counter() - started)
    _finish(result)
    return result


def _start_known_ports(procs: ProcessSet, ports: list[int], *, config_path: Path, logs: Path,
                       timeout_s: float) -> None:
    started = []
    for i, port in enumerate(ports):
        argv = [sys.executable, "-m", "ssp.cli", "model", "serve", "--config", str(config_path), "--host",
                "127.0.0.1", "--port", str(port)]
        started.append((procs.start(f"server-{i}", argv, log_path=logs / f"server-{i}.log"), port))
    for process, port in started:  # they load in parallel; wait for each
        process.wait_ready(url=f"http://127.0.0.1:{port}/health", timeout_s=timeout_s)


def _check_alive(procs: ProcessSet, finished: ManagedProcess | None = None) -> None:
    """Raise ComponentFailed for a process that has exited, except `finished` (the learner, done after its last
    step)."""
    for process in procs.processes:
        if process is not finished and not process.alive():
            raise ComponentFailed(process.name, str(process.failure()), process.log_path)


def _write_processes(run_dir: Path, procs: ProcessSet, urls: list[str], cfg: SSPConfig) -> None:
    """<run>/processes.json: what runs where (pids, logs, URLs), for a person debugging the run."""
    (run_dir / "processes.json").write_text(json.dumps({
        "processes": [{"name": p.name, "pid": p.pid, "log": str(p.log_path), "argv": p.argv}
                      for p in procs.processes],
        "server_urls": urls, "stream": f"{cfg.stream.host}:{cfg.stream.port}", "retriever": cfg.retriever.kind,
    }, indent=1) + "\n")


def _evaluate(cfg: SSPConfig, out_dir: Path, progress: bool) -> Any:
    from engine.evaluation import evaluate

    return evaluate(cfg.engine(), list(cfg.train.eval_datasets), out_dir=out_dir, progress=progress,
                    seeds=cfg.train.eval_seeds[0] if cfg.train.eval_seeds else None)


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


def _finish(result: TrainResult) -> None:
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
        from engine.evaluation import format_comparison

        parts.append(format_comparison(result.before, result.after))
    elif result.after is not None:
        from engine.evaluation import format_table

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

