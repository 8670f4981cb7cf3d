"""When the engine lets CPython's cycle collector run: on the event loop's clock, between callbacks, never in the
middle of a rollout's turn and never as a surprise full collection.

Measured with `ssp bench engine` at 2,000 rollouts in flight (CPython 3.11, one core): about 200,000 live
GC-tracked objects (each in-flight request is a chain of coroutines, aiohttp objects and closures); a collection
costs about 1 µs per object it walks, so a full collection takes ~250 ms. CPython starts one by itself whenever 25%
more objects than are alive have reached the oldest generation, which at this churn is every few seconds; its
middle-generation passes walked ~15,000 survivors (~17 ms) each; and its young passes fire inside whichever
rollout's turn made the 700th allocation, so they land in the per-turn overhead. Yet almost all of this garbage is
freed by reference counting: the passes found no cycles to free.

So, while a scheduler runs, automatic collection is off and this schedule runs it instead:
  - everything alive at start (imported modules, tokenizer, index) is frozen out of the collector's view;
  - every `YOUNG_EVERY_S` the young and middle generations are collected (what survives moves to the oldest one):
    a short pass of its own on the loop, a few ms at 10,000 rollouts;
  - every `scheduler.gc_full_every_s` seconds one full collection, whose pause is recorded (`gc_full_max_ms` in
    the scheduler's summary): the one stop-the-world pause left, rare, predictable and reported.
On exit the collector's previous state is restored and the frozen objects are handed back to it.
"""

from __future__ import annotations

import asyncio
import gc
import time

from ssp.engine.telemetry import Samples

YOUNG_EVERY_S = 0.05
"""Seconds between young collections: short enough that few objects pile up between passes."""


class GcPacer:
    """Context manager owning the collector for one scheduler run; `run()` is the task that collects."""

    def __init__(self, full_every_s: float) -> None:
        self.full_every_s = full_every_s
        self.young_pauses = Samples()
        self.full_pauses = Samples()
        self._was_enabled = True

    def __enter__(self) -> GcPacer:
        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._was_enabled:
            gc.enable()
        gc.unfreeze()

    def collect_young(self) -> float:
        """Collect the young and middle generations now; returns and records the pause in seconds."""
        started = time.perf_counter()
        gc.collect(1)
        pause = time.perf_counter() - started
        self.young_pauses.add(pause)
        return pause

    def collect_full(self) -> float:
        """Run one full collection now; returns and records its pause in seconds."""
        started = time.perf_counter()
        gc.collect()
        pause = time.perf_counter() - started
        self.full_pauses.add(pause)
        return pause

    async def run(self) -> None:
        """Young collections every YOUNG_EVERY_S and, if full_every_s > 0, a full one every full_every_s."""
        last_full = time.perf_counter()
        while True:
            await asyncio.sleep(YOUNG_EVERY_S)
            if self.full_every_s > 0 and time.perf_counter() - last_full >= self.full_every_s:
                self.collect_full()
                last_full = time.perf_counter()
            else:
                self.collect_young()

    def summary(self) -> dict[str, float]:
        return {**self.young_pauses.summary_ms("gc_young"),
                "gc_full_collections": self.full_pauses.count,
                "gc_full_max_ms": round(self.full_pauses.max * 1e3, 1)}
