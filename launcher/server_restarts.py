"""Restarting an inference server that `ssp train` started and that died, while the run goes on with the others.

What makes a restarted server useful again is elsewhere: the learner's next weight push re-forms its update group
over the servers that answer (learner/push_recovery.py), which brings the restarted one the current weights, and the
engine's pool routes to it only once it serves the weight version the others serve (engine/pool.py). Here: whether
to restart at all, and doing it on the same port, so every client's URL stays valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ssp.processes import ManagedProcess, ProcessSet

log = logging.getLogger(__name__)


class ServerRestarts:
    """The run's restart budget over the servers named `server_names` (train.max_server_restarts)."""

    def __init__(self, procs: ProcessSet, server_names: set[str], *, budget: int, out: Any,
                 on_restart: Callable[[], None]) -> None:
        self.procs = procs
        self.server_names = server_names
        self.budget = budget
        self.used = 0
        self._out = out
        self._on_restart = on_restart

    def try_restart(self, dead: ManagedProcess) -> bool:
        """Start `dead` again if it is one of the servers, the budget is not spent and another server still runs;
        False means the run must stop (the caller reports `dead` as it always has)."""
        if dead.name not in self.server_names or self.used >= self.budget:
            return False
        others = [p for p in self.procs.processes if p.name in self.server_names and p is not dead and p.alive()]
        if not others:
            return False
        self.used += 1
        code = dead.proc.returncode
        fresh = self.procs.restart(dead)
        message = (f"{dead.name} (pid {dead.pid}) exited with code {code}; restarted it as pid {fresh.pid} on the same "
                   f"port (restart {self.used} of train.max_server_restarts = {self.budget}). The other server(s) "
                   f"serve meanwhile; it serves again once the learner's next push brought it the current weights. "
                   f"Its log is {dead.log_path}")
        log.warning(message)
        print(f"ssp train: {message}", file=self._out)
        self._on_restart()
        return True
