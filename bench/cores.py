"""Which cores a bench's processes run on: the engine alone on the first core, the simulated servers on the others,
so that an engine figure is one core's and the servers' simulation does not steal it (where the OS allows pinning).
"""

from __future__ import annotations

import os


def engine_and_server_cores() -> tuple[int | None, set[int] | None]:
    """(the engine's core, the servers' cores); None where there is no affinity API or only one core."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], (set(cpus[1:]) or None)


def pin(pid: int, cpus: set[int] | None) -> bool:
    """Restrict process `pid` (0 = this one) to `cpus`; False when not possible."""
    if not cpus:
        return False
    try:
        os.sched_setaffinity(pid, cpus)
        return True
    except (AttributeError, OSError):
        return False
