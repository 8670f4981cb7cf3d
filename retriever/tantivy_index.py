"""Searching an ssp Tantivy index: `TantivySearcher` (blocking, thread-safe) and `TantivyRetriever` (async).

Tantivy's searcher is thread-safe and releases the GIL while it scores (measured in `bench/retrieval.py`, section
"GIL"), so the retriever runs queries on a small thread pool. Handing work to a thread is not free (a queue put
that wakes the thread, then a fight for the GIL: about 0.3 ms under load), so queries are handed off in batches:
the queries of all concurrent `search` calls queue up while the threads are busy, and each free thread takes an
even share (at most HAND_OFF_MAX_QUERIES). Nothing waits for a batch to fill: an idle retriever hands off at once.
This is what lets the /retrieve server, which calls `search` once per HTTP request, keep up with a raw loop.

    retriever = TantivyRetriever(Path("artifacts/index/demo"), threads=2)
    docs = await retriever.search(["Scott Derrickson", "Ed Wood director"], k=3)   # list[list[Doc]]
    await retriever.close()                                                       # later searches raise
"""

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ssp.retriever.errors import RetrieverClosedError
from ssp.retriever.index_format import open_index
from ssp.retriever.protocol import Doc
from ssp.retriever.query import QueryBuilder

HAND_OFF_MAX_QUERIES = 16
"""Most queries one thread takes per hand-off: large enough to amortize it, small enough to keep threads even."""


def check_k(k: int) -> None:
    """k is the number of documents per query; a caller asking for fewer than one has a bug."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k = {k!r}: must be an integer >= 1 (documents per query; SSP uses 3)")


class TantivySearcher:
    """One opened index and its searcher. `search` may be called from many threads at once."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        self._index = open_index(self.index_dir)
        self._searcher = self._index.searcher()
        self._queries = QueryBuilder(self._index, self._searcher)
        self.num_docs: int = self._searcher.num_docs

    def search(self, query: str, k: int) -> list[Doc]:
        """Top-k passages for one query, best first; [] when the query has no words. Never raises on query text."""
        built = self._queries.build(query)
        if built is None:
            return []
        docs = []
        # count=False: nobody reads the number of matches, and counting them costs a collector call per match.
        for score, address in self._searcher.search(built, k, count=False).hits:
            stored = self._searcher.doc(address)
            docs.append(
                Doc(
                    id=stored.get_first("id"),
                    title=stored.get_first("title") or "",
                    text=stored.get_first("text") or "",
                    score=score,
                )
            )
        return docs

    def search_many(self, queries: list[str], k: int) -> list[list[Doc]]:
        return [self.search(q, k) for q in queries]


@dataclass(slots=True)
class _Call:
    """One `search` call in flight: its results fill in as its queries are answered, possibly by several threads."""

    results: list[list[Doc]]
    remaining: int
    future: "asyncio.Future[list[list[Doc]]]"


class TantivyRetriever:
    """The in-process `Retriever`: BM25 over a local index, searches on a thread pool off the event loop."""

    def __init__(self, index_dir: Path, *, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError(f"threads = {threads}: must be >= 1 (set retriever.search_threads)")
        self._searcher = TantivySearcher(index_dir)
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(threads, thread_name_prefix="tantivy-search")
        self._pending: deque[tuple[_Call, int, str, int]] = deque()  # (call, position in call, query, k)
        self._running = 0  # hand-offs in flight, <= threads

    @property
    def num_docs(self) -> int:
        return self._searcher.num_docs

    @property
    def index_dir(self) -> Path:
        return self._searcher.index_dir

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if self._pool is None:
            raise RetrieverClosedError(
                f"TantivyRetriever over {self._searcher.index_dir} is closed; create a new one to search again"
            )
        check_k(k)
        if not queries:
            return []
        loop = asyncio.get_running_loop()
        call = _Call(results=[[] for _ in queries], remaining=len(queries), future=loop.create_future())
        self._pending.extend((call, i, q, k) for i, q in enumerate(queries))
        self._hand_off(loop)
        return await call.future

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give pending queries to free threads: an even share each, at most HAND_OFF_MAX_QUERIES at a time."""
        while self._pool is not None and self._pending and self._running < self._threads:
            share = -(-len(self._pending) // (self._threads - self._running))  # ceil
            batch = []
            while self._pending and len(batch) < min(share, HAND_OFF_MAX_QUERIES):
                item = self._pending.popleft()
                if not item[0].future.done():  # skip the queries of a cancelled call
                    batch.append(item)
            if not batch:
                continue
            self._running += 1
            work = loop.run_in_executor(self._pool, self._search_batch, [(q, k) for _, _, q, k in batch])
            work.add_done_callback(lambda w, batch=batch: self._finish(loop, batch, w))  # type: ignore[misc]

    def _search_batch(self, items: list[tuple[str, int]]) -> list[list[Doc]]:
        return [self._searcher.search(q, k) for q, k in items]

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[_Call, int, str, int]],
        work: "asyncio.Future[list[list[Doc]]]",
    ) -> None:
        self._running -= 1
        error = work.exception()
        for n, (call, i, _, _) in enumerate(batch):
            if call.future.done():
                continue
            if error is not None:
                call.future.set_exception(error)
                continue
            call.results[i] = work.result()[n]
            call.remaining -= 1
            if call.remaining == 0:
                call.future.set_result(call.results)
        self._hand_off(loop)

    async def close(self) -> None:
        """Refuse new searches, fail queued ones with RetrieverClosedError, wait for the running ones."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        while self._pending:
            call = self._pending.popleft()[0]
            if not call.future.done():
                call.future.set_exception(RetrieverClosedError("TantivyRetriever closed while this search was queued"))
        pool.shutdown(wait=True)
