"""Config sections [retriever] (which retriever the engine searches with, and how) and [retrieval_server]."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrieverConfig:
    kind: str = "tantivy"
    """Which retriever: "tantivy" (in-process index), "http" (a Search-R1 /retrieve server), the name of an
    entry point in the `ssp.retrievers` group, or a user class written "package.module:ClassName"."""
    index_dir: Path | None = None
    """Tantivy index directory (kind = "tantivy"); unset means the demo index, artifacts/index/demo."""
    url: str = "http://127.0.0.1:8000"
    """Base URL of the retrieval server (kind = "http")."""
    topk: int = 3
    """Documents returned per search query (Search-R1 and SSP use 3)."""
    search_threads: int = 2
    """Threads that run Tantivy searches off the event loop (the Rust searcher releases the GIL)."""
    timeout_s: float = 10.0
    """Per-request timeout of the HTTP retriever."""
    max_retries: int = 3
    """HTTP retriever: retries after a connection error or 5xx, with exponential backoff, before failing."""
    api_key_file: Path | None = None
    """HTTP retriever: file holding the server's bearer key (retrieval_server.api_key_file on the server); ssp train
    and ssp launch point it at the run key. Unset: no Authorization header."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options passed as keyword arguments to a user retriever class (kind = "module:Class")."""

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"topk = {self.topk}: must be >= 1 (SSP uses 3)")
        if self.search_threads < 1:
            raise ValueError(f"search_threads = {self.search_threads}: must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s = {self.timeout_s}: must be > 0 seconds")
        if self.max_retries < 0:
            raise ValueError(f"max_retries = {self.max_retries}: must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrievalServerConfig:
    index_dir: Path | None = None
    """Tantivy index the server searches (`ssp retriever serve --index`); unset means the demo index."""
    host: str = "127.0.0.1"
    """Address to listen on. Any address other machines reach needs api_key_file (or --insecure on a trusted
    network): the server refuses to start otherwise."""
    api_key_file: Path | None = None
    """File holding the bearer key every route but /health needs (`Authorization: Bearer <key>`), read at start-up;
    ssp train and ssp launch point it at the run key. Unset: no authentication."""
    port: int = 8000
    """TCP port (0 picks a free one and prints it)."""
    search_threads: int = 2
    """Threads running Tantivy searches; more than the machine's cores only adds queueing."""
    max_queries: int = 512
    """Most queries in one /retrieve request; larger batches get a 400 (split them)."""
    max_query_chars: int = 2000
    """Longest query, in characters; a longer one gets a 400 (an agent's query is a sentence, not a document)."""
    max_topk: int = 100
    """Largest `topk` a request may ask for; more gets a 400."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port = {self.port}: must be 0..65535 (0 picks a free port)")
        for name in ("search_threads", "max_queries", "max_query_chars", "max_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
