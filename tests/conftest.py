"""Session fixtures shared across rooms: real components, started once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct HF directory (`ssp model prepare`; converted once, then cached)."""
    from ssp.serving.model_prep import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Tantivy index over the shipped demo corpora (data/corpus/, about 19k passages), built once per session."""
    from ssp.paths import DEMO_CORPORA
    from ssp.retriever.index_build import build_index

    return build_index(DEMO_CORPORA, tmp_path_factory.mktemp("index") / "demo", progress=False).out


class ServerProcess:
    """A server started as its own process (`ssp model serve ...`), for tests that must kill or restart it."""

    def __init__(self, args: list[str], log_path: Path, *, timeout_s: float = 120.0) -> None:
        import select
        import subprocess
        import sys
        import time

        from ssp.serving.server import READY_LINE

        self.args = args
        self._log = log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ssp.cli", "model", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while True:  # the server prints its URL once the port is open
            remaining = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(remaining, 0))[0] if remaining > 0 else []
            line = self.proc.stdout.readline() if ready else ""
            if line.startswith(READY_LINE):
                self.url = line[len(READY_LINE):].strip()
                break
            if not line:  # end of output (it exited) or the deadline passed
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"server {args} did not start listening within {timeout_s:g} s; "
                                   f"log: {log_path.read_text()[-2000:]}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed GPU server would."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def server_launcher(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start `ssp model serve ARGS...` processes for one test: launch(args, timeout_s=300) -> ServerProcess, each
    stopped when the test ends (for servers a test configures itself, e.g. with a key)."""
    started: list[ServerProcess] = []

    def launch(args: list[str], timeout_s: float = 300.0) -> ServerProcess:
        server = ServerProcess(args, tmp_path / f"server{len(started)}.log", timeout_s=timeout_s)
        started.append(server)
        return server

    yield launch
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def sim_launcher(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Start simulated servers (`ssp model serve --sim`) as processes: launch(time_scale=20.0, port=0,
    profile_toml="", base_profile=True, extra_args=()) -> ServerProcess. `profile_toml` is appended to the 7B
    profile (e.g. "[sim]\\nseed = 3"), or is the whole profile with base_profile=False (unset keys: defaults).
    Every server started is stopped at the end of the session."""
    from ssp.serving.sim_profile import DEFAULT_PROFILE

    started: list[ServerProcess] = []
    root = tmp_path_factory.mktemp("sim")

    def launch(*, time_scale: float = 20.0, port: int = 0, profile_toml: str = "", base_profile: bool = True,
               extra_args: tuple[str, ...] = ()) -> ServerProcess:
        n = len(started)
        profile = root / f"profile{n}.toml"
        profile.write_text((DEFAULT_PROFILE.read_text() if base_profile else "") + "\n" + profile_toml)
        server = ServerProcess(["--sim", "--sim-profile", str(profile), "--sim-time-scale", str(time_scale),
                                "--port", str(port), *extra_args], root / f"server{n}.log")
        started.append(server)
        return server

    yield launch
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def sim_server(sim_launcher) -> str:  # type: ignore[no-untyped-def]
    """Base URL of one simulated server (7B profile, 20x faster than real time), shared by the session."""
    return sim_launcher().url


@pytest.fixture(scope="session")
def ref_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Base URL of one reference server (`ssp model serve`: SmolLM2-135M-Instruct, fp32 on CPU) for the session.

    Context length 2048 keeps the over-long-prompt checks cheap. Tests that change weights restore them."""
    server = ServerProcess(["--model", str(model_dir), "--port", "0", "--set", "serving.context_length=2048"],
                           tmp_path_factory.mktemp("ref_server") / "server.log", timeout_s=300)
    yield server.url
    server.stop()
