"""Which cores a bench's processes run on: the engine alone on the first core, the simulated servers on the others,
so that an engine figure is one core's and the servers' simulation does not steal it (where the OS allows pinning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    cores: int
    """Cores this process could use before it was pinned."""
    engine_pinned: bool
    """Whether this process (the engine) now runs on one core only."""
    server_cpus: set[int] | None
    """Cores for the simulated servers (pass to `pin`); None where there is no affinity API or only one core."""


def place_engine() -> Placement:
    """Pin this process, the engine, to the first core it may use and leave the others to the servers; says so."""
    if not hasattr(os, "sched_getaffinity"):
        print("engine not pinned (no CPU affinity on this OS)")
        return Placement(cores=os.cpu_count() or 1, engine_pinned=False, server_cpus=None)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = set(cpus[1:]) or None
    pinned = pin(0, {cpus[0]})
    print(f"engine pinned to CPU {cpus[0] if pinned else '(not pinned)'}; simulated servers on CPUs {server_cpus}")
    return Placement(cores=len(cpus), engine_pinned=pinned, server_cpus=server_cpus)


def pin(pid: int, cpus: set[int] | None) -> bool:
    """Restrict process `pid` (0 = this one) to `cpus`; False when not possible."""
    if not cpus:
        return False
    try:
        os.sched_setaffinity(pid, cpus)
        return True
    except (AttributeError, OSError):
        return False


def pin_process(pid: int, cpus: set[int] | None) -> int:
    """Restrict every thread of process `pid` to `cpus` (a started server has threads of its own, which `pin` alone
    would leave where they are); returns how many threads were pinned."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return 0
    pinned = 0
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            os.sched_setaffinity(tid, cpus)
            pinned += 1
        except OSError:  # the thread ended since the listing
            pass
    return pinned


def pin_helper_threads(cpus: set[int] | None) -> int:
    """Move every thread of this process but the main one (the event loop's) to `cpus`; returns how many moved.

    Why: a thread inherits the affinity of the thread that starts it, so after `place_engine` the engine's helper
    threads (Tantivy searches, document encoding; they run Rust code without the GIL) would share the loop's one core
    and preempt the loop in the middle of a turn. In a deployment they run on other cores; so they do here. Call it
    again after new threads may have started (executors start theirs lazily).
    """
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return 0
    import threading

    main = threading.main_thread().native_id
    moved = 0
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid == main:
            continue
        try:
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
                moved += 1
        except OSError:  # the thread ended since the listing
            pass
    return moved
