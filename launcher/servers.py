"""Inference servers that a command starts for itself on this machine: `ssp model serve` on a free local port.

`ssp eval --model DIR` asks for one here; the evaluation itself (engine/evaluation.py) only ever talks to a URL, so
the engine never starts processes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from ssp.processes import ManagedProcess, free_port


@contextlib.contextmanager
def reference_server(model_dir: Path, *, config_path: Path, log_path: Path,
                     timeout_s: float) -> Iterator[tuple[str, ManagedProcess]]:
    """`ssp model serve --model DIR` with the config at `config_path`, on a free port of 127.0.0.1; yields its base
    URL and its process once /health answers, and stops it on exit."""
    port = free_port()
    argv = [sys.executable, "-m", "ssp.cli", "model", "serve", "--config", str(config_path), "--model",
            str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    with ManagedProcess("reference server", argv, log_path=log_path) as process:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(url=f"{url}/health", timeout_s=timeout_s)
        yield url, process
