"""The Search-R1 /retrieve server over a real socket: protocol shapes, msgpack, limits, and surviving bad requests."""

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from ssp.retriever.config import RetrievalServerConfig
from ssp.retriever.server import make_app
from ssp.retriever.tantivy_index import TantivyRetriever

LIMITS = RetrievalServerConfig(max_queries=4, max_query_chars=50, max_topk=10)


@pytest.fixture(scope="module")
async def server(demo_index: Path) -> AsyncIterator[str]:
    retriever = TantivyRetriever(demo_index)
    runner = web.AppRunner(make_app(retriever, LIMITS), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()
    await retriever.close()


async def _post(
    url: str, body: Any, *, raw: bytes | None = None, content_type: str = "application/json"
) -> tuple[int, Any]:
    data = raw if raw is not None else (msgpack.packb(body) if "msgpack" in content_type else json.dumps(body).encode())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/retrieve", data=data, headers={"Content-Type": content_type}) as resp:
            payload = await resp.read()
            if resp.content_type == "application/msgpack":
                return resp.status, msgpack.unpackb(payload)
            return resp.status, json.loads(payload)


async def test_search_r1_shapes(server: str) -> None:
    status, body = await _post(server, {"queries": ["Scott Derrickson", "  "], "topk": 2, "return_scores": True})
    assert status == 200
    first, blank = body["result"]
    assert blank == [] and len(first) == 2
    assert first[0]["document"]["id"] == "hotpot300-1"
    assert first[0]["document"]["contents"].startswith('"Scott Derrickson"\nScott Derrickson (born July 16, 1966)')
    assert first[0]["score"] > first[1]["score"] > 0
    # topk null and 0 mean 3; without return_scores each item is the document itself.
    for topk in (None, 0):
        status, body = await _post(server, {"queries": ["Ed Wood"], "topk": topk})
        assert status == 200 and len(body["result"][0]) == 3
        assert set(body["result"][0][0]) == {"id", "contents"}
    status, body = await _post(server, {"queries": []})
    assert (status, body) == (200, {"result": []})


async def test_msgpack_bodies(server: str) -> None:
    status, body = await _post(
        server, {"queries": ["Doctor Strange"], "topk": 1, "return_scores": True}, content_type="application/msgpack"
    )
    assert status == 200 and len(body["result"][0]) == 1 and body["result"][0][0]["score"] > 0
    status, body = await _post(server, None, raw=b"\xc1\xc1", content_type="application/msgpack")
    assert status == 400 and "the body is not valid msgpack" in body["error"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            {"queries": ["a"] * 5},
            "5 queries in one request exceeds the limit max_queries=4 (retrieval_server.max_queries)",
        ),
        ({"queries": ["ok", "x" * 51]}, "queries[1] has 51 characters, over the limit max_query_chars=50"),
        ({"queries": ["a"], "topk": 11}, "topk=11 exceeds the limit max_topk=10 (retrieval_server.max_topk)"),
        ({"queries": ["a"], "topk": -1}, "'topk' must be null or an integer >= 0, got -1"),
        ({"queries": ["a"], "topk": "3"}, "'topk' must be null or an integer >= 0, got '3'"),
        ({"queries": ["a"], "topk": True}, "'topk' must be null or an integer >= 0, got True"),
        ({"queries": ["a"], "topk": False}, "'topk' must be null or an integer >= 0, got False"),
        ({"queries": ["a"], "topk": 0.0}, "'topk' must be null or an integer >= 0, got 0.0"),
        ({"queries": ["a"], "return_scores": "yes"}, "'return_scores' must be true or false, got 'yes'"),
        ({"queries": "Ed Wood"}, "'queries' must be a list of strings, got str"),
        ({"queries": ["a", 3]}, "queries[1] must be a string, got int 3"),
        ({"topk": 3}, "'queries' must be a list of strings, got NoneType"),
        ({"queries": ["a"], "top_k": 3}, "unknown key(s) ['top_k']; a /retrieve request has only"),
        ([1, 2], "the body must be an object"),
    ],
)
async def test_bad_requests_get_400_naming_the_rule(server: str, body: Any, error: str) -> None:
    status, answer = await _post(server, body)
    assert status == 400
    assert error in answer["error"]


async def test_server_survives_garbage(server: str) -> None:
    for raw in (b"{not json", b"\xff\xfe\x00", b"", b"null"):
        status, body = await _post(server, None, raw=raw)
        assert status == 400 and ("not valid JSON" in body["error"] or "must be an object" in body["error"])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server}/retrieve") as resp:
            assert resp.status == 405 and "error" in await resp.json()
        async with session.post(f"{server}/nowhere", json={}) as resp:
            assert resp.status == 404 and "error" in await resp.json()
        too_big = json.dumps({"queries": ["x" * 40] * 100}).encode()  # over the body cap these limits imply
        async with session.post(f"{server}/retrieve", data=too_big) as resp:
            assert resp.status == 413 and "error" in await resp.json()
        async with session.get(f"{server}/health") as resp:
            health = await resp.json()
    assert health["status"] == "ok" and health["docs"] == 19124
    status, body = await _post(server, {"queries": ["Ed Wood"], "topk": 1})  # still serving
    assert status == 200 and body["result"][0]


async def test_concurrent_requests(server: str) -> None:
    queries = ["Scott Derrickson", "Ed Wood", "Tim Burton", "Bela Lugosi"] * 8
    answers = await asyncio.gather(*(_post(server, {"queries": [q], "topk": 1}) for q in queries))
    alone = {q: (await _post(server, {"queries": [q], "topk": 1}))[1] for q in set(queries)}
    assert all(status == 200 and body == alone[q] for q, (status, body) in zip(queries, answers))


def test_serve_command(demo_index: Path) -> None:
    """`ssp retriever serve` as users run it: a separate process, port 0, Ctrl-C (SIGINT) stops it cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssp.cli", "retriever", "serve", "--index", str(demo_index), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving 19124 passages from "), line
        url = line.rsplit(" on ", 1)[1].strip()
        result = asyncio.run(_post(url, {"queries": ["Scott Derrickson"], "topk": 1, "return_scores": True}))
        assert result[0] == 200 and result[1]["result"][0][0]["document"]["id"] == "hotpot300-1"
        proc.send_signal(subprocess.signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_serve_command_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssp.cli import main

    assert main(["retriever", "serve", "--index", str(tmp_path / "none"), "--port", "0"]) == 1
    assert "none does not exist; build it with `ssp index build" in capsys.readouterr().err
    assert main(["retriever", "serve", "--index", str(tmp_path), "--port", "70000"]) == 1
    assert "port = 70000: must be 0..65535" in capsys.readouterr().err
    assert main(["retriever", "serve", "--port", "0", "--set", "retrieval_server.max_topk=0"]) == 2
    assert "max_topk = 0: must be >= 1" in capsys.readouterr().err
