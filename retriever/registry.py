"""`make_retriever`: turn the [retriever] config section into a Retriever, built-in or the user's own.

`retriever.kind` is one of:
- "tantivy": `TantivyRetriever` over `index_dir` (default: the demo index) with `search_threads` threads;
- "http": `HttpRetriever` calling `url` with `timeout_s`, `max_retries` and the key of `api_key_file`;
- the name of an entry point in the group `ssp.retrievers` (a package registers
  `[project.entry-points."ssp.retrievers"] mine = "mypkg.search:MyRetriever"`);
- "package.module:ClassName", imported directly.
A user's class (or factory) is called with `**retriever.options` and must give an object with
`async search(queries, k) -> list[list[Doc]]` and `async close()`: see `retriever/protocol.py`.

    [retriever]
    kind = "mypkg.search:MyRetriever"
    options = { endpoint = "http://10.0.0.5:9000", rerank = true }
"""

import inspect
from typing import Any

from ssp.plugins import build_plugin
from ssp.retriever.config import RetrieverConfig
from ssp.retriever.errors import RetrieverLoadError
from ssp.retriever.protocol import Retriever

ENTRY_POINT_GROUP = "ssp.retrievers"
BUILTIN_KINDS = ("tantivy", "http")


def make_retriever(cfg: RetrieverConfig) -> Retriever:
    """Build the retriever `cfg.kind` names; RetrieverLoadError says what is wrong and how to fix it."""
    if cfg.kind in BUILTIN_KINDS:
        if cfg.options:
            raise RetrieverLoadError(
                f"retriever.options {sorted(cfg.options)} is only for user retrievers; kind = {cfg.kind!r} is "
                "configured by the [retriever] keys themselves (index_dir, search_threads, url, ...)"
            )
        return _make_builtin(cfg)
    retriever = build_plugin(cfg.kind, cfg.options, group=ENTRY_POINT_GROUP, key="retriever.kind",
                             options_key="retriever.options", builtin=BUILTIN_KINDS, error=RetrieverLoadError)
    _check_protocol(cfg.kind, retriever)
    return retriever


def _make_builtin(cfg: RetrieverConfig) -> Retriever:
    # Imported here so that a user retriever never pays for (or depends on) tantivy and aiohttp.
    if cfg.kind == "tantivy":
        from ssp.paths import default_index_dir
        from ssp.retriever.tantivy_index import TantivyRetriever

        return TantivyRetriever(cfg.index_dir or default_index_dir(), threads=cfg.search_threads)
    from ssp.retriever.client import HttpRetriever
    from ssp.run_key import load_api_key

    return HttpRetriever(cfg.url, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                         api_key=load_api_key(cfg.api_key_file, "retriever.api_key_file"))


def _check_protocol(kind: str, retriever: Any) -> None:
    missing = [
        name
        for name in ("search", "close")
        if not inspect.iscoroutinefunction(getattr(retriever, name, None))
    ]
    if missing:
        raise RetrieverLoadError(
            f"retriever.kind = {kind!r} built a {type(retriever).__name__}, which lacks async method(s) {missing}; "
            "a retriever needs `async def search(self, queries: list[str], k: int) -> list[list[Doc]]` and "
            "`async def close(self)` (see retriever/protocol.py)"
        )
