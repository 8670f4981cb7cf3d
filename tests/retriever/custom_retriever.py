"""A user's retriever, as a user would write one: keyword overlap over a few passages given in the options.

Loaded by test_retriever_registry.py through `make_retriever`, the same path a config `kind = "module:Class"` takes.
"""

from ssp.retriever.protocol import Doc


class KeywordRetriever:
    """Scores each passage by how many query words it contains; `passages` maps id -> text."""

    def __init__(self, passages: dict[str, str], min_overlap: int = 1) -> None:
        self.passages = passages
        self.min_overlap = min_overlap
        self.closed = False

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        results = []
        for query in queries:
            words = set(query.lower().split())
            scored = [(len(words & set(text.lower().split())), pid, text) for pid, text in self.passages.items()]
            hits = sorted((s for s in scored if s[0] >= self.min_overlap), reverse=True)[:k]
            results.append([Doc(id=pid, title=pid, text=text, score=float(n)) for n, pid, text in hits])
        return results

    async def close(self) -> None:
        self.closed = True


class NotARetriever:
    """Has a synchronous search: fails the protocol check."""

    def __init__(self) -> None:
        pass

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        return []
