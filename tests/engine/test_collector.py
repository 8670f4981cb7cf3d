"""The engine's garbage-collector schedule: no automatic full collection during a run, settings restored after."""

from __future__ import annotations

import asyncio
import gc

from engine.collector import NEVER, CollectorSchedule


def test_run_freezes_startup_objects_and_restores_the_collector_after() -> None:
    before = gc.get_threshold()
    with CollectorSchedule(full_every_s=0) as schedule:
        assert gc.get_freeze_count() > 0  # what was alive at start is out of the collector's walks
        assert gc.get_threshold()[2] == NEVER
        assert gc.get_threshold()[0] == before[0]
        pause = schedule.collect_full()
        assert pause >= 0 and schedule.summary()["gc_full_collections"] == 1
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_full_collections_run_on_the_schedule_clock() -> None:
    async def main() -> int:
        with CollectorSchedule(full_every_s=0.02) as schedule:
            task = asyncio.create_task(schedule.run())
            await asyncio.sleep(0.15)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return schedule.full_pauses.count

    assert 3 <= asyncio.run(main()) <= 8


def _full_passes_during_churn() -> int:
    """Allocate and keep 300k containers (as thousands of in-flight rollouts do), count full collections started."""
    full = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.callbacks.append(record)
    try:
        kept = [[i] for i in range(300_000)]
        del kept
    finally:
        gc.callbacks.remove(record)
    return len(full)


def test_no_full_collection_starts_by_itself_during_a_run() -> None:
    gc.collect()
    assert _full_passes_during_churn() > 0  # CPython's default: full passes while the heap grows
    with CollectorSchedule(full_every_s=0) as schedule:
        assert _full_passes_during_churn() == 0
        schedule.collect_full()  # the scheduled one still frees cycles made during the run


def test_cycles_made_during_a_run_are_freed_by_the_scheduled_collection() -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    with CollectorSchedule(full_every_s=0) as schedule:
        pairs = []
        for _ in range(1000):
            a, b = Node(), Node()
            a.other, b.other = b, a
            pairs.append(a)
        gc.collect(1)
        gc.collect(1)  # the pairs now sit in the oldest generation, which only a full collection walks
        del pairs, a, b
        gc.collect(1)
        assert sum(isinstance(o, Node) for o in gc.get_objects()) == 2000
        schedule.collect_full()
        assert sum(isinstance(o, Node) for o in gc.get_objects()) == 0
