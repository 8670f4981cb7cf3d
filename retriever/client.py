"""`HttpRetriever`: the `Retriever` that calls a Search-R1 /retrieve server (ours, or Search-R1's own).

One aiohttp session per retriever, opened on first use inside the running loop and closed by `close()`. Each
`search` is one POST of the whole batch. Connection errors, timeouts and 5xx answers are retried `max_retries`
times with exponential backoff (backoff_s, 2x, 4x, ...); then `RetrieverUnavailableError` (retryable) says what
failed and how often. A 4xx is `RetrieverRequestError` and an answer of the wrong shape `RetrieverProtocolError`:
both fatal, retrying cannot fix them. Blank queries are answered [] locally, never sent.

    retriever = HttpRetriever("http://127.0.0.1:8000", timeout_s=10, max_retries=3)
    docs = await retriever.search(["Scott Derrickson"], k=3)
    await retriever.close()
"""

import asyncio
import logging
from typing import Any

import aiohttp

from ssp.retriever.corpus import split_contents
from ssp.retriever.errors import (
    RetrieverClosedError,
    RetrieverProtocolError,
    RetrieverRequestError,
    RetrieverUnavailableError,
)
from ssp.retriever.protocol import Doc
from ssp.retriever.tantivy_index import check_k

log = logging.getLogger(__name__)


class HttpRetriever:
    """Search over HTTP with one pooled session, bounded retries and typed errors."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, max_retries: int = 3, backoff_s: float = 0.1,
                 api_key: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url = {url!r}: must start with http:// or https:// (set retriever.url)")
        self.endpoint = url.rstrip("/") + "/retrieve"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.retries = 0
        """Retried attempts so far (a health metric: non-zero means the server is struggling or restarting)."""

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if self._closed:
            raise RetrieverClosedError(f"HttpRetriever for {self.endpoint} is closed; create a new one to search")
        check_k(k)
        asked = [i for i, q in enumerate(queries) if q.strip()]
        results: list[list[Doc]] = [[] for _ in queries]
        if asked:
            payload = {"queries": [queries[i] for i in asked], "topk": k, "return_scores": True}
            for i, docs in zip(asked, self._parse(await self._post(payload), len(asked))):
                results[i] = docs
        return results

    async def _post(self, payload: dict[str, Any]) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        last = ""
        for attempt in range(self._max_retries + 1):
            if attempt:
                self.retries += 1
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                async with self._session.post(self.endpoint, json=payload) as resp:
                    if resp.status < 400:
                        try:
                            return await resp.json(content_type=None)
                        except ValueError as e:
                            raise RetrieverProtocolError(
                                f"{self.endpoint} answered HTTP {resp.status} with a body that is not JSON ({e}); "
                                "is retriever.url a Search-R1 retrieval server?"
                            ) from None
                    text = (await resp.text(errors="replace"))[:500]
                    if resp.status < 500:
                        raise RetrieverRequestError(f"{self.endpoint} rejected the request: HTTP {resp.status}: {text}")
                    last = f"HTTP {resp.status}: {text}"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.warning(
                "retrieval attempt %d/%d at %s failed: %s", attempt + 1, self._max_retries + 1, self.endpoint, last
            )
        raise RetrieverUnavailableError(
            f"{self.endpoint} failed {self._max_retries + 1} times (last: {last}); check that the server runs there "
            "(`ssp retriever serve`) and retriever.url; retriever.max_retries and retriever.timeout_s set the patience"
        )

    def _parse(self, data: Any, n: int) -> list[list[Doc]]:
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list) or len(result) != n:
            raise RetrieverProtocolError(
                f"{self.endpoint}: expected {{\"result\": [...]}} with {n} lists, got {str(data)[:200]}"
            )
        try:
            return [[self._doc(item) for item in docs] for docs in result]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise RetrieverProtocolError(
                f"{self.endpoint}: a result item is not {{\"document\": {{\"id\", \"contents\"}}, \"score\"}} ({e!r})"
            ) from None

    @staticmethod
    def _doc(item: dict[str, Any]) -> Doc:
        document = item["document"]
        title, text = split_contents(document["contents"])
        return Doc(id=str(document["id"]), title=title, text=text, score=float(item["score"]))

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
