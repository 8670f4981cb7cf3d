"""Child processes of a run (servers, learner ranks): start with a log file, wait until ready, watch, stop.

Why one module: `ssp train` and `ssp eval` start the same kinds of processes, and every one of them must end up
either healthy or reported with the path of its log, and none may outlive the command that started it.

    with ManagedProcess("server-0", [sys.executable, "-m", "ssp.cli", "model", "serve", "--port", str(port)],
                        log_path=run_dir / "logs" / "server-0.log") as server:
        server.wait_ready(url=f"http://127.0.0.1:{port}/health", timeout_s=120)
        ...
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


class ProcessFailed(RuntimeError):
    """A child process exited or never became ready; the message names it, its exit code and its log file."""


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a server that binds it shortly after.

    NOTE: it is drawn below the OS's ephemeral range, not from it: outgoing connections take their local ports from
    that range, and a bench opening thousands of them took a port picked there before its server could bind it.
    """
    ephemeral_low = 32768
    if EPHEMERAL_RANGE_FILE.exists():
        ephemeral_low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    candidates = range(max(1024, ephemeral_low - 16384), ephemeral_low)
    if len(candidates) < 64:  # the OS leaves no room below its ephemeral range
        candidates = range(1024, 65536)
    for port in random.sample(candidates, 64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port among 64 tried in [{candidates.start}, {candidates.stop}) on {host}")


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


_PR_SET_PDEATHSIG = 1  # prctl(2) option: signal to receive when the parent dies


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies (Linux), so a SIGKILLed `ssp train` or
    `ssp eval` leaves no server behind even though children run in their own sessions.

    NOTE: Linux sends it when the *thread* that started the child ends, so start long-lived children from the main
    thread (as ssp train and ssp eval do), never from a short-lived worker thread."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup is all there is
        pass


class ManagedProcess:
    """One child process in its own process group, its stdout and stderr appended to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self) -> ProcessFailed:
        """The error to raise when this process died unexpectedly."""
        return ProcessFailed(
            f"{self.name} (pid {self.pid}) exited with code {self.proc.returncode}; its log is {self.log_path}:\n"
            f"{tail(self.log_path)}"
        )

    def wait_ready(self, *, url: str, timeout_s: float) -> None:
        """Poll `url` until it answers 200; raise if the process dies or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.failure()
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ProcessFailed(f"{self.name} did not answer {url} within {timeout_s:g} s; its log is {self.log_path}:\n"
                            f"{tail(self.log_path)}")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; returns the exit code."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ProcessSet:
    """The processes of one run, stopped together (in reverse start order) and watched for unexpected exits."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
              ) -> ManagedProcess:
        process = ManagedProcess(name, argv, log_path=log_path, env=env)
        self.processes.append(process)
        return process

    def restart(self, process: ManagedProcess) -> ManagedProcess:
        """Start an exited `process`'s command again, under its name and log file (appended to), in its place."""
        if process.alive():
            raise RuntimeError(f"{process.name} (pid {process.pid}) is still running; only an exited process restarts")
        process.stop()  # closes its log
        again = ManagedProcess(process.name, process.argv, log_path=process.log_path, env=process.env,
                               cwd=process.cwd)
        self.processes[self.processes.index(process)] = again
        return again

    def check(self) -> None:
        """Raise ProcessFailed for the first process that has exited."""
        for process in self.processes:
            if not process.alive():
                raise process.failure()

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for process in reversed(self.processes):
            process.stop(timeout_s)

    def __enter__(self) -> "ProcessSet":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()
