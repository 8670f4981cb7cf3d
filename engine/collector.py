"""When the engine lets CPython's cycle collector run, so that it never stalls thousands of rollouts at random.

Measured with `ssp bench engine` at 2,000 rollouts in flight (CPython 3.11, one core): about 200,000 live
GC-tracked objects (each in-flight request is a chain of coroutines, aiohttp objects and closures); a collection
costs about 1 µs per object it walks, so a full collection takes ~250 ms. CPython starts one by itself whenever 25%
more objects than are alive have reached the oldest generation, which at this churn is every few seconds; and its
middle-generation passes walked ~15,000 survivors (~17 ms) each. Yet almost all of this garbage is freed by
reference counting: the passes found no cycles to free.

So, while a scheduler runs:
  - everything alive at start (imported modules, tokenizer, index) is frozen out of the collector's view;
  - the middle generation is collected after every second young pass instead of every tenth (a few ms each);
  - full collections never start by themselves; the scheduler runs one every `scheduler.gc_full_every_s`
    seconds and records how long it paused the loop (`gc_full_max_ms` in its summary), so the one remaining
    stop-the-world pause is rare, predictable and reported rather than hidden.
On exit the previous thresholds are restored and the frozen objects handed back to the collector.
"""

from __future__ import annotations

import asyncio
import gc
import time

from engine.telemetry import Samples

MIDDLE_EVERY_YOUNG = 2
"""Young-generation passes per middle-generation pass (CPython's default is 10)."""
NEVER = 2**30
"""A full-collection threshold that is never reached: full collections are run by `CollectorSchedule.run`."""


class CollectorSchedule:
    """Context manager owning the collector's settings for one scheduler run; `run()` is the task running a full
    collection every `full_every_s` seconds."""

    def __init__(self, full_every_s: float) -> None:
        self.full_every_s = full_every_s
        self.full_pauses = Samples()
        self._saved: tuple[int, int, int] | None = None

    def __enter__(self) -> CollectorSchedule:
        self._saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(self._saved[0], MIDDLE_EVERY_YOUNG, NEVER)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        gc.set_threshold(*self._saved)
        gc.unfreeze()

    def collect_full(self) -> float:
        """Run one full collection now; returns and records its pause in seconds."""
        started = time.perf_counter()
        gc.collect()
        pause = time.perf_counter() - started
        self.full_pauses.add(pause)
        return pause

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.full_every_s)
            self.collect_full()

    def summary(self) -> dict[str, float]:
        return {"gc_full_collections": self.full_pauses.count,
                "gc_full_max_ms": round(self.full_pauses.max * 1e3, 1)}
