"""Searching an ssp Tantivy index: `TantivySearcher` (blocking, thread-safe) and `TantivyRetriever` (async).

Tantivy's searcher is thread-safe and releases the GIL while it scores (measured in `bench/retrieval.py`, section
"GIL"), so the retriever runs a batch's queries on a small thread pool: one chunk of the batch per thread, which
keeps the per-task hand-off cost to one per thread rather than one per query.

    retriever = TantivyRetriever(Path("artifacts/index/demo"), threads=2)
    docs = await retriever.search(["Scott Derrickson", "Ed Wood director"], k=3)   # list[list[Doc]]
    await retriever.close()                                                       # later searches raise
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from retriever.errors import RetrieverClosedError
from retriever.index_format import SEARCH_FIELDS, TITLE_BOOST, open_index, query_text
from retriever.protocol import Doc


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
        self.num_docs: int = self._searcher.num_docs

    def search(self, query: str, k: int) -> list[Doc]:
        """Top-k passages for one query, best first; [] when the query has no words. Never raises on query text."""
        words = query_text(query)
        if not words:
            return []
        parsed = self._index.parse_query(words, SEARCH_FIELDS, field_boosts={"title": TITLE_BOOST})
        docs = []
        for score, address in self._searcher.search(parsed, k, count=False).hits:
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


class TantivyRetriever:
    """The in-process `Retriever`: BM25 over a local index, searches on a thread pool off the event loop."""

    def __init__(self, index_dir: Path, *, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError(f"threads = {threads}: must be >= 1 (set retriever.search_threads)")
        self._searcher = TantivySearcher(index_dir)
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(threads, thread_name_prefix="tantivy-search")

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
        n = min(self._threads, len(queries))
        chunks = [queries[i::n] for i in range(n)]  # strided so long and short queries spread evenly
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._searcher.search_many, chunk, k) for chunk in chunks)
        )
        results: list[list[Doc]] = [[] for _ in queries]
        for i, part in enumerate(parts):
            results[i::n] = part
        return results

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)
