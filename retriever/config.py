"""Config section [retriever]: which retriever the engine searches with, and how."""

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
