"""A user retriever (loaded through `retriever.kind = "faulty_retriever:HangAfter"`, the real plug-in seam) that
serves the real Tantivy index and then stops answering: the fault a dead retrieval server looks like."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ssp.retriever.protocol import Doc
from ssp.retriever.tantivy_index import TantivyRetriever


class HangAfter:
    def __init__(self, index_dir: str, hang_after: int) -> None:
        self._inner = TantivyRetriever(Path(index_dir), threads=1)
        self._left = hang_after

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if self._left <= 0:
            await asyncio.sleep(3600)
        self._left -= 1
        return await self._inner.search(queries, k)

    async def close(self) -> None:
        await self._inner.close()
