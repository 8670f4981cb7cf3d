"""The engine's garbage-collector schedule: no collection starts by itself during a run (none inside a rollout's
turn), the schedule's passes still free cycles, and the collector is restored after."""

from __future__ import annotations

import asyncio
import gc

from ssp.engine.gc_pacing import YOUNG_EVERY_S, GcPacer


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def _nodes() -> int:
    return sum(isinstance(o, Node) for o in gc.get_objects())


def _passes_during_churn() -> int:
    """Allocate and keep 300k containers (as thousands of in-flight rollouts do); count collections started."""
    passes = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    gc.callbacks.append(record)
    try:
        kept = [[i] for i in range(300_000)]
        del kept
    finally:
        gc.callbacks.remove(record)
    return len(passes)


def test_no_collection_starts_by_itself_during_a_run_and_the_collector_is_restored_after() -> None:
    gc.collect()
    assert _passes_during_churn() > 0  # CPython's default: passes fire in whatever code allocates
    with GcPacer(full_every_s=0):
        assert gc.get_freeze_count() > 0  # what was alive at start is out of the collector's walks
        assert _passes_during_churn() == 0
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_scheduled_passes_free_cycles_young_and_old() -> None:
    with GcPacer(full_every_s=0) as schedule:
        young = Node()
        young.other = Node()
        young.other.other = young
        del young
        assert _nodes() == 2
        schedule.collect_young()
        assert _nodes() == 0

        pairs = []
        for _ in range(1000):
            a, b = Node(), Node()
            a.other, b.other = b, a
            pairs.append(a)
        schedule.collect_young()  # survivors move to the oldest generation, which only a full pass walks
        del pairs, a, b
        schedule.collect_young()
        assert _nodes() == 2000
        schedule.collect_full()
        assert _nodes() == 0
        summary = schedule.summary()
        assert summary["gc_full_collections"] == 1 and summary["gc_full_max_ms"] >= 0


def test_the_run_task_collects_on_the_loops_clock() -> None:
    async def main() -> GcPacer:
        with GcPacer(full_every_s=4 * YOUNG_EVERY_S) as schedule:
            task = asyncio.create_task(schedule.run())
            await asyncio.sleep(12 * YOUNG_EVERY_S)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return schedule

    schedule = asyncio.run(main())
    assert schedule.young_pauses.count >= 5
    assert 1 <= schedule.full_pauses.count <= 3
