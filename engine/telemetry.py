"""Measurements the engine keeps about itself: bounded samples with percentiles, and event-loop lag.

Event-loop lag is how late a timer fires: a coroutine that hogs the loop (a long decode, a blocking call) delays
every rollout by that much. On a shared machine the operating system also delays the loop (other processes hold the
core), so the monitor records, per tick, the CPU time the loop's own thread used as well: wall-clock lag with little
CPU is the host's doing; CPU time far above the tick interval is the engine's.
"""

from __future__ import annotations

import asyncio
import collections
import time


class Samples:
    """The most recent `size` values of a measurement, with count and max over all of them."""

    def __init__(self, size: int = 20000) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=size)
        self.count = 0
        self.max = 0.0

    def add(self, value: float) -> None:
        self._recent.append(value)
        self.count += 1
        self.max = max(self.max, value)

    def extend(self, values: list[float]) -> None:
        for v in values:
            self.add(v)

    def values(self) -> list[float]:
        """The recent values, oldest first."""
        return list(self._recent)

    def mean(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def percentile(self, q: float) -> float:
        if not self._recent:
            return 0.0
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]

    def summary_ms(self, name: str) -> dict[str, float]:
        """p50 / p99 / max in milliseconds, keyed `{name}_p50_ms` etc."""
        return {f"{name}_p50_ms": round(self.percentile(50) * 1e3, 3),
                f"{name}_p99_ms": round(self.percentile(99) * 1e3, 3),
                f"{name}_max_ms": round(self.max * 1e3, 3)}


class LoopLagMonitor:
    """Sleeps `interval_s` in a loop and records how much later than asked it woke up (`lag`), and how much CPU
    time the loop thread spent in that tick (`busy`: callbacks run between two ticks)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lag = Samples()
        self.busy = Samples()

    def reset(self) -> None:
        self.lag, self.busy = Samples(), Samples()

    async def run(self) -> None:
        while True:
            start, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.interval_s)
            self.lag.add(max(0.0, time.perf_counter() - start - self.interval_s))
            self.busy.add(time.thread_time() - cpu)
