"""Child processes: readiness over a real socket, death reported with the log, stop kills the whole group."""

import socket
import sys
from pathlib import Path

import pytest

from ssp.processes import ManagedProcess, ProcessFailed, ProcessSet, free_port

SERVE = "import http.server, sys; http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), " \
        "http.server.SimpleHTTPRequestHandler).serve_forever()"


def test_ready_then_stopped(tmp_path: Path) -> None:
    port = free_port()
    with ManagedProcess("web", [sys.executable, "-c", SERVE, str(port)], log_path=tmp_path / "web.log",
                        cwd=tmp_path) as proc:
        proc.wait_ready(url=f"http://127.0.0.1:{port}/", timeout_s=20)
        assert proc.alive()
    assert not proc.alive()


def test_death_is_reported_with_log(tmp_path: Path) -> None:
    code = "import sys; print('loading weights failed: disk full', flush=True); sys.exit(3)"
    with ProcessSet() as group:
        proc = group.start("server-1", [sys.executable, "-c", code], log_path=tmp_path / "logs" / "s1.log")
        with pytest.raises(ProcessFailed, match=r"server-1 \(pid \d+\) exited with code 3; its log is .*s1\.log"
                                                r"(.|\n)*disk full"):
            proc.wait_ready(url=f"http://127.0.0.1:{free_port()}/health", timeout_s=20)
        with pytest.raises(ProcessFailed, match="server-1"):
            group.check()


def test_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    proc = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                          log_path=tmp_path / "sleep.log")
    with pytest.raises(ProcessFailed, match="did not answer .* within 1 s"):
        proc.wait_ready(url=f"http://127.0.0.1:{free_port()}/health", timeout_s=1)
    assert not proc.alive()


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A parent SIGKILLed (no cleanup runs) still takes its child server down: no orphans."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ssp.processes import ManagedProcess\n"
        f"p = ManagedProcess('child', [sys.executable, '-c', 'import time; time.sleep(60)'], "
        f"log_path=Path({str(tmp_path / 'c.log')!r}))\n"
        f"Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its SIGKILLed parent")


def test_free_ports_come_from_below_the_ephemeral_range_and_bind() -> None:
    """Outgoing connections take their local ports from the ephemeral range; a server port picked there can be
    taken before the server binds it (seen in bench async-vs-sync with 16 sim servers)."""
    from ssp.processes import EPHEMERAL_RANGE_FILE

    low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0]) if EPHEMERAL_RANGE_FILE.exists() else 32768
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
