"""SearchBatcher: coalescing, result routing, per-batch failures and timeouts, close. A tiny in-test Retriever
records every batch it is asked (pure logic); the end-to-end tests use the real Tantivy index."""

from __future__ import annotations

import asyncio

import pytest

from ssp.engine.config import SearchBatcherConfig
from ssp.engine.search_batcher import SearchBatcher, SearchError
from ssp.retriever.protocol import Doc


class EchoRetriever:
    """Returns k docs titled after the query; fails or hangs on queries that ask it to."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        self.batches.append(list(queries))
        await asyncio.sleep(0.01)
        if any(q.startswith("fail") for q in queries):
            raise RuntimeError("index exploded")
        if any(q.startswith("hang") for q in queries):
            await asyncio.sleep(60)
        return [[Doc(f"{q}-{i}", q, f"text {i}", 1.0) for i in range(k)] for q in queries]

    async def close(self) -> None:
        pass


async def test_concurrent_searches_are_coalesced_and_routed() -> None:
    ret = EchoRetriever()
    batcher = SearchBatcher(ret, SearchBatcherConfig(max_batch=8, window_ms=20), k=2)
    results = await asyncio.gather(*(batcher.search(f"q{i}") for i in range(20)))
    assert [r[0].title for r in results] == [f"q{i}" for i in range(20)]
    assert all(len(r) == 2 for r in results)
    assert sorted(len(b) for b in ret.batches) == [4, 8, 8]
    s = batcher.stats.summary()
    assert s["search_batches"] == 3 and s["search_queries"] == 20 and s["search_batch_max"] == 8
    await batcher.close()


async def test_a_failed_batch_fails_only_its_searches() -> None:
    ret = EchoRetriever()
    batcher = SearchBatcher(ret, SearchBatcherConfig(max_batch=2, window_ms=50), k=1)
    results = await asyncio.gather(batcher.search("fail-a"), batcher.search("b"), batcher.search("c"),
                                   batcher.search("d"), return_exceptions=True)
    assert isinstance(results[0], SearchError) and isinstance(results[1], SearchError)
    assert "index exploded" in str(results[0])
    assert [r[0].title for r in results[2:]] == ["c", "d"]  # type: ignore[index]
    assert batcher.stats.failed_batches == 1
    assert (await batcher.search("later"))[0].title == "later"
    await batcher.close()


async def test_timeout_fails_the_batch_and_never_hangs() -> None:
    batcher = SearchBatcher(EchoRetriever(), SearchBatcherConfig(window_ms=0, timeout_s=0.2), k=1)
    with pytest.raises(SearchError, match="within 0.2 s"):
        await asyncio.wait_for(batcher.search("hang"), 5)
    assert batcher.stats.timeouts == 1
    await batcher.close()


async def test_close_fails_waiting_searches_and_refuses_new_ones() -> None:
    batcher = SearchBatcher(EchoRetriever(), SearchBatcherConfig(window_ms=10_000), k=1)
    waiting = asyncio.ensure_future(batcher.search("x"))
    await asyncio.sleep(0.01)
    await batcher.close()
    with pytest.raises(SearchError, match="closed"):
        await waiting
    with pytest.raises(SearchError, match="closed"):
        await batcher.search("y")


async def test_prepare_sees_each_batch_before_its_searches_are_answered() -> None:
    prepared: list[list[str]] = []

    async def prepare(results: object) -> None:
        await asyncio.sleep(0.01)
        prepared.append([docs[0].title for docs in results])  # type: ignore[attr-defined]

    batcher = SearchBatcher(EchoRetriever(), SearchBatcherConfig(max_batch=2, window_ms=20), k=1, prepare=prepare)

    async def search(q: str) -> int:
        await batcher.search(q)
        return len(prepared)  # how many batches were prepared when this search was answered

    seen = await asyncio.gather(search("a"), search("b"), search("c"))
    assert sorted(map(sorted, prepared)) == [["a", "b"], ["c"]]
    assert seen[0] >= 1 and seen[1] >= 1 and seen[2] >= 1
    await batcher.close()


async def test_a_failing_prepare_leaves_the_results_standing() -> None:
    async def prepare(results: object) -> None:
        raise ValueError("tokenizer broke")

    batcher = SearchBatcher(EchoRetriever(), SearchBatcherConfig(window_ms=0), k=1, prepare=prepare)
    assert (await batcher.search("q"))[0].title == "q"
    assert batcher.stats.failed_batches == 0
    await batcher.close()
