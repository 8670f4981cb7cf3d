"""HttpRetriever against real servers on 127.0.0.1: the real /retrieve app, and the same app with faults injected."""

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from ssp.retriever.client import HttpRetriever
from ssp.retriever.config import RetrievalServerConfig
from ssp.retriever.errors import (
    RetrieverClosedError,
    RetrieverProtocolError,
    RetrieverRequestError,
    RetrieverUnavailableError,
)
from ssp.retriever.server import make_app
from ssp.retriever.tantivy_index import TantivyRetriever

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Faults:
    """What the fault middleware does to the next requests: fail with a status, stall, or answer garbage."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.status = 503
        self.stall_s = 0.0
        self.garbage: bytes | None = None
        self.seen = 0


@pytest.fixture(scope="module")
async def tantivy(demo_index: Path) -> AsyncIterator[TantivyRetriever]:
    retriever = TantivyRetriever(demo_index)
    yield retriever
    await retriever.close()


@pytest.fixture(scope="module")
async def faulty_server(tantivy: TantivyRetriever) -> AsyncIterator[tuple[str, Faults]]:
    import asyncio

    faults = Faults()

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        faults.seen += 1
        if faults.fail_next:
            faults.fail_next -= 1
            return web.Response(status=faults.status, text="injected failure")
        if faults.stall_s:
            await asyncio.sleep(faults.stall_s)
        if faults.garbage is not None:
            return web.Response(body=faults.garbage, content_type="application/json")
        return await handler(request)

    app = make_app(tantivy, RetrievalServerConfig(max_topk=10))
    app.middlewares.append(inject)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", faults
    await runner.cleanup()


@pytest.fixture
def faults(faulty_server: tuple[str, Faults]) -> Faults:
    f = faulty_server[1]
    f.fail_next, f.status, f.stall_s, f.garbage, f.seen = 0, 503, 0.0, None, 0
    return f


async def test_same_answers_as_in_process(
    faulty_server: tuple[str, Faults], tantivy: TantivyRetriever, faults: Faults
) -> None:
    queries = ["Scott Derrickson", " ", "Ed Wood", 'title:"x" AND (', ""]
    http = HttpRetriever(faulty_server[0])
    try:
        remote = await http.search(queries, 3)
    finally:
        await http.close()
    local = await tantivy.search(queries, 3)
    assert [[(d.id, d.title, d.text) for d in docs] for docs in remote] == [
        [(d.id, d.title, d.text) for d in docs] for docs in local
    ]
    assert remote[0][0].score == pytest.approx(local[0][0].score)
    assert remote[1] == remote[4] == [] and faults.seen == 1  # one request; blank queries never sent


async def test_retries_5xx_then_succeeds(faulty_server: tuple[str, Faults], faults: Faults) -> None:
    faults.fail_next = 2
    http = HttpRetriever(faulty_server[0], max_retries=3, backoff_s=0.01)
    try:
        docs = await http.search(["Scott Derrickson"], 1)
    finally:
        await http.close()
    assert docs[0][0].id == "hotpot300-1" and http.retries == 2 and faults.seen == 3


async def test_gives_up_after_retries(faulty_server: tuple[str, Faults], faults: Faults) -> None:
    faults.fail_next = 100
    http = HttpRetriever(faulty_server[0], max_retries=2, backoff_s=0.01)
    expected = r"/retrieve failed 3 times \(last: HTTP 503: injected failure\)"
    with pytest.raises(RetrieverUnavailableError, match=expected) as err:
        await http.search(["x"], 1)
    assert err.value.retryable and faults.seen == 3
    await http.close()


async def test_timeout_is_retryable(faulty_server: tuple[str, Faults], faults: Faults) -> None:
    faults.stall_s = 1.0
    http = HttpRetriever(faulty_server[0], timeout_s=0.1, max_retries=1, backoff_s=0.01)
    with pytest.raises(RetrieverUnavailableError, match=r"failed 2 times \(last: .*Timeout"):
        await http.search(["x"], 1)
    await http.close()


async def test_connection_refused() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = HttpRetriever(f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.01)
    expected = r"failed 2 times \(last: ClientConnectorError.*`ssp retriever serve`"
    with pytest.raises(RetrieverUnavailableError, match=expected):
        await http.search(["x"], 1)
    await http.close()


async def test_4xx_is_fatal_and_quotes_the_server(faulty_server: tuple[str, Faults], faults: Faults) -> None:
    http = HttpRetriever(faulty_server[0], backoff_s=0.01)
    expected = r"rejected the request: HTTP 400: .*topk=11 exceeds the limit max_topk=10"
    with pytest.raises(RetrieverRequestError, match=expected) as err:
        await http.search(["x"], 11)
    assert not err.value.retryable and faults.seen == 1
    await http.close()


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (b"<html>", "with a body that is not JSON"),
        (b'{"results": []}', r'expected \{"result": \[...\]\} with 1 lists'),
        (b'{"result": [[{"document": {"id": "1"}}]]}', r"a result item is not .*KeyError\('contents'\)"),
    ],
)
async def test_wrong_answers_are_protocol_errors(
    faulty_server: tuple[str, Faults], faults: Faults, garbage: bytes, error: str
) -> None:
    faults.garbage = garbage
    http = HttpRetriever(faulty_server[0])
    with pytest.raises(RetrieverProtocolError, match=error):
        await http.search(["x"], 1)
    await http.close()


async def test_closed_and_bad_arguments(faulty_server: tuple[str, Faults]) -> None:
    with pytest.raises(ValueError, match=r"url = 'localhost:8000': must start with http:// or https://"):
        HttpRetriever("localhost:8000")
    http = HttpRetriever(faulty_server[0])
    with pytest.raises(ValueError, match="k = -1: must be an integer >= 1"):
        await http.search(["x"], -1)
    await http.close()
    with pytest.raises(RetrieverClosedError, match="is closed; create a new one"):
        await http.search(["x"], 1)
