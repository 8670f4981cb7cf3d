"""Coalesces the <search> calls of all rollouts into batched `Retriever.search` calls.

    rollout ─ search(q) ─┐                       ┌─ batch task ─ Retriever.search([q1..qn], k) ─┐
    rollout ─ search(q) ─┼─► pending (≤ max_batch)┤   (≤ max_concurrent_batches at once,          ├─► futures resolved
    rollout ─ search(q) ─┘   sent when full or    └─  each bounded by timeout_s)                 ┘   per query
                             window_ms after the first query arrived

`prepare`, when given, is awaited with each batch's results before its searches are answered (the engine passes
`ChatTokenizer.cache_documents`: the documents are encoded once per batch, off the event loop, instead of inside each
rollout's turn).

A failed or timed-out batch fails exactly its own searches with `SearchError` (the rollouts that asked see it and
report it); other batches and later searches are unaffected, and nothing waits longer than `timeout_s` plus the
wait for a free batch slot. The batcher does not own the retriever: whoever built it closes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ssp.engine.config import SearchBatcherConfig
from ssp.retriever.protocol import Doc, Retriever

log = logging.getLogger(__name__)


class SearchError(Exception):
    """A search could not be answered (retriever error, timeout, or the batcher was closed)."""


@dataclass(slots=True)
class SearchStats:
    """Batch-size statistics: how well concurrent searches were coalesced."""

    batches: int = 0
    queries: int = 0
    failed_batches: int = 0
    timeouts: int = 0
    sizes: collections.Counter[int] = field(default_factory=collections.Counter)

    def summary(self) -> dict[str, float | int]:
        sizes = sorted(self.sizes.elements())
        return {
            "search_batches": self.batches,
            "search_queries": self.queries,
            "search_failed_batches": self.failed_batches,
            "search_timeouts": self.timeouts,
            "search_batch_mean": round(self.queries / self.batches, 3) if self.batches else 0.0,
            "search_batch_p50": sizes[len(sizes) // 2] if sizes else 0,
            "search_batch_max": sizes[-1] if sizes else 0,
        }


class SearchBatcher:
    """`await batcher.search("query")` -> top-k docs; many coroutines may call it at once."""

    def __init__(self, retriever: Retriever, cfg: SearchBatcherConfig, *, k: int,
                 prepare: Callable[[Sequence[Sequence[Doc]]], Awaitable[None]] | None = None) -> None:
        self._retriever = retriever
        self._prepare = prepare
        self._cfg = cfg
        self._k = k
        self._pending: list[tuple[str, asyncio.Future[list[Doc]]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(cfg.max_concurrent_batches)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = SearchStats()

    @property
    def queue_depth(self) -> int:
        """Queries waiting to be put in a batch."""
        return len(self._pending)

    def summary(self) -> dict[str, float | int]:
        """Batch statistics plus the current queue depth, for a metrics line."""
        return {**self.stats.summary(), "search_queue_depth": self.queue_depth}

    async def search(self, query: str) -> list[Doc]:
        if self._closed:
            raise SearchError("the search batcher is closed")
        fut: asyncio.Future[list[Doc]] = asyncio.get_running_loop().create_future()
        self._pending.append((query, fut))
        if len(self._pending) >= self._cfg.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._cfg.window_ms / 1000.0, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch), name=f"search-batch-{self.stats.batches}")
        self.stats.batches += 1
        self.stats.queries += len(batch)
        self.stats.sizes[len(batch)] += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[list[Doc]]]]) -> None:
        queries = [q for q, _ in batch]
        try:
            async with self._slots:
                results = await asyncio.wait_for(self._retriever.search(queries, self._k), self._cfg.timeout_s)
            if len(results) != len(queries):
                raise SearchError(f"retriever returned {len(results)} result lists for {len(queries)} queries; "
                                  "Retriever.search must answer every query in order")
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            self.stats.failed_batches += 1
            self._fail(batch, SearchError(f"retriever did not answer a batch of {len(queries)} queries within "
                                          f"{self._cfg.timeout_s} s (search.timeout_s)"))
            return
        except asyncio.CancelledError:
            self._fail(batch, SearchError("the search batcher was closed while the search ran"))
            raise
        except Exception as e:  # any retriever failure fails only this batch's searches
            self.stats.failed_batches += 1
            log.warning("search batch of %d queries failed: %s: %s", len(queries), type(e).__name__, e)
            err = e if isinstance(e, SearchError) else SearchError(f"retriever failed: {type(e).__name__}: {e}")
            self._fail(batch, err)
            return
        if self._prepare is not None:
            try:
                await self._prepare(results)
            except Exception as e:  # the results stand; each rollout then encodes its own documents and sees any error
                log.warning("preparing the results of a search batch failed: %s: %s", type(e).__name__, e)
        for (_, fut), docs in zip(batch, results):
            if not fut.done():
                fut.set_result(list(docs))

    @staticmethod
    def _fail(batch: list[tuple[str, asyncio.Future[list[Doc]]]], err: SearchError) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    async def close(self) -> None:
        """Fail queued searches, cancel running batches and wait for them. Idempotent."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(self._pending, SearchError("the search batcher was closed"))
        self._pending = []
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
