"""`ssp retriever serve`: the Search-R1 retrieval server over a Tantivy index (aiohttp on uvloop).

Wire protocol, exactly Search-R1's `retrieval_server.py`:

    POST /retrieve  {"queries": ["q1", ...], "topk": 3 | null, "return_scores": true | false}
    -> {"result": [[{"document": {"id": "...", "contents": "\\"Title\\"\\ntext"}, "score": 12.3}, ...], ...]}

`topk` null or 0 means DEFAULT_TOPK (3); without `return_scores` each item is the document object itself. Bodies are
msgpack instead of JSON when the request's content type is `application/msgpack` (the answer then is too).
`GET /health` -> {"status": "ok", "docs": N, "index": DIR}.

Every rule break (too many queries, a query too long, topk out of range, wrong types, unknown keys, undecodable
body) is a 400 with {"error": "..."} naming the value, the limit and its config key; errors never stop the server.
Searches run on the TantivyRetriever's thread pool, so the event loop keeps parsing requests while Rust scores.
"""

import asyncio
import hmac
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import web

from ssp.retriever.config import RetrievalServerConfig
from ssp.retriever.corpus import join_contents
from ssp.retriever.protocol import Doc
from ssp.retriever.tantivy_index import TantivyRetriever
from ssp.run_key import check_bind, load_api_key

log = logging.getLogger(__name__)

DEFAULT_TOPK = 3
"""Search-R1's default when a request sends `topk` null or 0."""
MSGPACK = "application/msgpack"
REQUEST_KEYS = {"queries", "topk", "return_scores"}

RETRIEVER_KEY = web.AppKey("retriever", TantivyRetriever)
CONFIG_KEY = web.AppKey("config", RetrievalServerConfig)
PUBLIC_PATHS = frozenset({"/health"})
"""Routes open without the API key: launchers poll /health before they hold a client."""


class BadRequest(ValueError):
    """A request that breaks a rule; the message goes back to the client in a 400."""


def parse_request(body: Any, cfg: RetrievalServerConfig) -> tuple[list[str], int, bool]:
    """Validate a decoded /retrieve body -> (queries, topk, return_scores); BadRequest names the rule broken."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be an object {{\"queries\": [...], ...}}, got {type(body).__name__}")
    unknown = sorted(set(body) - REQUEST_KEYS)
    if unknown:
        raise BadRequest(f"unknown key(s) {unknown}; a /retrieve request has only {sorted(REQUEST_KEYS)}")
    queries = body.get("queries")
    if not isinstance(queries, list):
        raise BadRequest(f"'queries' must be a list of strings, got {type(queries).__name__}")
    if len(queries) > cfg.max_queries:
        raise BadRequest(
            f"{len(queries)} queries in one request exceeds the limit max_queries={cfg.max_queries} "
            "(retrieval_server.max_queries); split the batch"
        )
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise BadRequest(f"queries[{i}] must be a string, got {type(q).__name__} {q!r:.80}")
        if len(q) > cfg.max_query_chars:
            raise BadRequest(
                f"queries[{i}] has {len(q)} characters, over the limit max_query_chars={cfg.max_query_chars} "
                "(retrieval_server.max_query_chars); shorten the query"
            )
    topk = body.get("topk")
    if isinstance(topk, bool) or not (topk is None or isinstance(topk, int)) or (topk or 0) < 0:
        raise BadRequest(f"'topk' must be null or an integer >= 0, got {topk!r}")
    topk = topk or DEFAULT_TOPK
    if topk > cfg.max_topk:
        raise BadRequest(f"topk={topk} exceeds the limit max_topk={cfg.max_topk} (retrieval_server.max_topk)")
    return_scores = body.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, topk, return_scores


def render(results: list[list[Doc]], return_scores: bool) -> dict[str, Any]:
    """Search-R1's response shape from our Docs."""
    if return_scores:
        rows = [
            [{"document": {"id": d.id, "contents": join_contents(d.title, d.text)}, "score": d.score} for d in docs]
            for docs in results
        ]
    else:
        rows = [[{"id": d.id, "contents": join_contents(d.title, d.text)} for d in docs] for docs in results]
    return {"result": rows}


def _respond(data: Any, as_msgpack: bool, status: int = 200) -> web.Response:
    if as_msgpack:
        return web.Response(body=msgpack.packb(data), status=status, content_type=MSGPACK)
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


async def retrieve(request: web.Request) -> web.Response:
    as_msgpack = request.content_type == MSGPACK
    raw = await request.read()
    try:
        try:
            body = msgpack.unpackb(raw) if as_msgpack else json.loads(raw)
        except (ValueError, msgpack.UnpackException) as e:  # JSONDecodeError, UnicodeDecodeError, ExtraData...
            kind = "msgpack" if as_msgpack else "JSON"
            raise BadRequest(f"the body is not valid {kind} ({e}); send {kind} or set the content type") from None
        queries, topk, return_scores = parse_request(body, request.app[CONFIG_KEY])
    except BadRequest as e:
        return _respond({"error": str(e)}, as_msgpack, status=400)
    results = await request.app[RETRIEVER_KEY].search(queries, topk)
    return _respond(render(results, return_scores), as_msgpack)


async def health(request: web.Request) -> web.Response:
    retriever = request.app[RETRIEVER_KEY]
    data = {"status": "ok", "docs": retriever.num_docs, "index": str(retriever.index_dir)}
    return _respond(data, request.content_type == MSGPACK)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error answer is JSON {"error": ...}: aiohttp's own (404, 405, 413) and unexpected failures (500)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return web.json_response({"error": f"{e.status} {e.reason}: {e.text or ''}".strip()}, status=e.status)
    except Exception:
        log.exception("error while serving %s %s", request.method, request.path)
        return web.json_response({"error": "internal error while searching; see the server log"}, status=500)


def bearer_check(api_key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: every route but PUBLIC_PATHS needs `Authorization: Bearer <api_key>`, else 401 {"error": ...}."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # constant-time: a timing difference would let a caller guess the key byte by byte
        if request.path in PUBLIC_PATHS or hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                                               expected):
            return await handler(request)
        return web.json_response({"error": "unauthorized: send `Authorization: Bearer <key>` with the key of "
                                  "retrieval_server.api_key_file (set retriever.api_key_file on the client)"},
                                 status=401)
    return check


def make_app(retriever: TantivyRetriever, cfg: RetrievalServerConfig, api_key: str | None = None) -> web.Application:
    """The aiohttp application; the caller owns `retriever` and closes it after the app stops. With `api_key`,
    every route but /health needs it as a bearer token."""
    # Room for max_queries queries of max_query_chars characters (up to 4 UTF-8 bytes each) plus JSON framing.
    max_body = cfg.max_queries * (cfg.max_query_chars * 4 + 16) + 1024
    middlewares = [json_errors] if api_key is None else [bearer_check(api_key), json_errors]
    app = web.Application(client_max_size=max_body, middlewares=middlewares)
    app[RETRIEVER_KEY] = retriever
    app[CONFIG_KEY] = cfg
    app.router.add_post("/retrieve", retrieve)
    app.router.add_get("/health", health)
    return app


async def serve(cfg: RetrievalServerConfig, index_dir: Path, ready: Callable[[str], None] = print, *,
                insecure: bool = False) -> None:
    """Run the server until SIGINT/SIGTERM; calls `ready(url)` once the socket is listening. Refuses
    (ssp.run_key.RunKeyError) a non-loopback host without retrieval_server.api_key_file unless `insecure`."""
    api_key = load_api_key(cfg.api_key_file, "retrieval_server.api_key_file")
    check_bind(cfg.host, keyed=api_key is not None, insecure=insecure, setting="retrieval_server.api_key_file")
    retriever = TantivyRetriever(index_dir, threads=cfg.search_threads)
    runner = web.AppRunner(make_app(retriever, cfg, api_key), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = runner.addresses[0][1]
        ready(f"serving {retriever.num_docs} passages from {index_dir} on http://{cfg.host}:{port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        await retriever.close()
