"""The seam every retriever plugs into: batched async search returning scored documents."""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Doc:
    """One retrieved passage. `score` is the retriever's own relevance (BM25 for Tantivy); higher is better."""

    id: str
    title: str
    text: str
    score: float


@runtime_checkable
class Retriever(Protocol):
    """Batched search, safe to call from many coroutines at once.

    The engine coalesces concurrent `<search>` calls into one `search` call, so implementations should make a
    batch cheaper than its queries one by one (a thread pool, one HTTP request, one GPU encode).
    """

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        """Return the top-k documents for each query, in query order. An empty or blank query returns []."""
        ...

    async def close(self) -> None:
        """Release threads, sessions and file handles. The retriever refuses searches afterwards."""
        ...
