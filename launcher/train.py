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
from collections.abc import Awaitable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from ssp.config import to_dict, to_toml
from ssp.launcher.monitor import ComponentFailed, Monitor, check_alive
from ssp.launcher.progress import ProgressDisplay
from ssp.launcher.run_folder import checkpoint_step, learner_dir_of, run_dir_of, write_processes
from ssp.launcher.run_summary import TrainResult, eval_scalars, write_summary
from ssp.launcher.server_restarts import ServerRestarts
from ssp.launcher.training_engine import run_training_engine
from ssp.metrics import MetricsLog
from ssp.processes import ManagedProcess, ProcessFailed, ProcessSet, free_port
from ssp.run_config import SSPConfig, check_sampling_matches_learner, learner_staleness_bound
from ssp.run_key import RunKeyError, load_run_key, write_run_key
from ssp.trackers import Trackers, open_trackers

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainError(RuntimeError):
    """The run cannot start as configured (the message names the key or file and the fix)."""


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run."""


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
        from ssp.engine.seeds import SeedError, load_seed_answers, shared_answers

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
    write_processes(run_dir, procs, urls, cfg)

    before = None
    evaluated = bool(tc.eval_datasets or tc.eval_seeds)
    if evaluated and tc.eval_before:
        print(f"ssp train: evaluating the initial policy on {len(tc.eval_datasets)} QA dataset(s)"
              f"{' and the held-out seeds of ' + str(tc.eval_seeds[0]) if tc.eval_seeds else ''}", file=out)
        before = _evaluate(cfg, run_dir / "eval-before", progress)
        trackers.log_values(eval_scalars(before.to_json()), step=start_step)
        check_alive(procs)

    learner: ManagedProcess | None = None
    if tc.learner_address is None:
        learner = procs.start("learner", learner_argv(config_path, f"tcp://{stream_host}:{stream_port}", urls),
                              log_path=logs / "learner.log")
        write_processes(run_dir, procs, urls, cfg)
    print(f"ssp train: learner {'started' if learner else 'attached at ' + str(tc.learner_address)}, "
          f"{cfg.learner.tensor_parallel} x {cfg.learner.data_parallel} rank(s); engine streaming to "
          f"{stream_host}:{stream_port}", file=out)
    display = ProgressDisplay(total_steps=tc.steps, start_step=start_step, enabled=progress, out=out)
    metrics = MetricsLog(run_dir / "metrics.jsonl", trackers)
    restarts = None if tc.server_urls else ServerRestarts(
        procs, {f"server-{i}" for i in range(len(ports))}, budget=tc.max_server_restarts, out=out,
        on_restart=lambda: write_processes(run_dir, procs, urls, cfg))
    monitor = Monitor(cfg, procs=procs, learner=learner, start_step=start_step,
                      learner_metrics=learner_dir / "metrics.jsonl", display=display, metrics=metrics,
                      restarts=restarts)
    try:
        engine = _run_async(run_training_engine(cfg, monitor, run_dir))
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
        from ssp.learner.export import export_checkpoint

        print(f"ssp train: exporting the trained policy to {run_dir / 'policy'}", file=out)
        policy = export_checkpoint(learner_dir / "checkpoints", run_dir / "policy")

    after = None
    if evaluated:
        print("ssp train: evaluating the trained policy", file=out)
        after = _evaluate(cfg, run_dir / "eval-after", progress)
        trackers.log_values(eval_scalars(after.to_json()), step=tc.steps)
        check_alive(procs, finished=learner)
    result = TrainResult(run_dir=run_dir, start_step=start_step, steps=monitor.last_step, rows=monitor.rows,
                         engine=engine, before=before, after=after, policy=policy,
                         wall_s=time.perf_counter() - started)
    write_summary(result)
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


def _evaluate(cfg: SSPConfig, out_dir: Path, progress: bool) -> Any:
    from ssp.engine.evaluation import evaluate

    return evaluate(cfg.engine(), list(cfg.train.eval_datasets), out_dir=out_dir, progress=progress,
                    seeds=cfg.train.eval_seeds[0] if cfg.train.eval_seeds else None)
