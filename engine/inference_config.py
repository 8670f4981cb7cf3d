"""Config section [inference]: which SGLang-compatible servers the engine generates with, and how it routes to them."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class InferenceConfig:
    server_urls: tuple[str, ...] = ("http://127.0.0.1:30000",)
    """Base URLs of the inference servers (SGLang, or `ssp model serve`). Without `router_url` the pool routes
    /generate among them itself; with a router they are its workers and receive only control calls (pause,
    continue, abort, flush, weight updates), which sglang-router does not forward."""
    router_url: str | None = None
    """Router mode: base URL of an sglang-router in front of `server_urls`. /generate goes to the router (the
    affinity is sent as its sticky key `x-smg-routing-key`); control calls go to every worker directly, and an abort
    by rid is sent to every worker. Unset: no router."""
    capacity_per_server: int = 0
    """Most requests in flight to one server (its slots); further requests wait in the pool's queue. 0 = the
    server's own `max_running_requests` from /server_info. For real SGLang set it: the default there (4096) is far
    above what KV memory sustains (about 160-512 per H100 server: SGLang's CUDA-graph batch cap is 160, and slime
    caps client concurrency at 512 per server). In router mode the router gets
    capacity_per_server x number of workers."""
    request_timeout_s: float = 1800.0
    """Longest one /generate may take, queueing and pauses for weight updates included (sglang-router's default)."""
    connect_timeout_s: float = 5.0
    """Longest wait for a TCP connection to a server."""
    admin_timeout_s: float = 600.0
    """Longest wait for a control call; weight-update calls block until the trainer's broadcast is done."""
    abort_timeout_s: float = 5.0
    """Longest wait for the best-effort abort of a failed request's rid before it is re-sent elsewhere."""
    queue_timeout_s: float = 600.0
    """Longest a request waits for a free slot on a healthy server before failing with NoServerAvailable."""
    max_retries: int = 3
    """Re-sends of one request after retryable failures (lost connection, timeout, 503), each under a new rid and,
    when possible, on another server. 0 = fail at the first error."""
    retry_backoff_s: float = 0.2
    """Delay before a re-send, doubled for each further attempt of the same request."""
    health_check_interval_s: float = 5.0
    """Seconds between health checks of every server (`GET /health`); ejected servers are re-admitted when they
    answer 200 again."""
    health_timeout_s: float = 5.0
    """Longest wait for one health check (SGLang's /health runs a 1-token generation and takes about 1 s)."""
    eject_after_failures: int = 2
    """Consecutive failed health checks that eject a server. A refused connection on /generate ejects at once."""
    keepalive_s: float = 4.0
    """How long an idle connection is kept for reuse. NOTE: kept shorter than the server's keep-alive (uvicorn 5 s,
    aiohttp 75 s), so the client never sends on a connection the server is closing, a race that would look like a
    lost request."""
    affinity_entries: int = 200_000
    """Affinity keys remembered (least recently used are forgotten); one per live rollout or prompt group is enough."""
    api_key: str | None = None
    """Bearer token for servers started with --api-key / --admin-api-key. Unset: no Authorization header. Prefer
    api_key_file: a key in the config is readable wherever the config is."""
    api_key_file: Path | None = None
    """File holding the bearer token (read when the pool opens); ssp train and ssp launch point it at the run key.
    Every call, control calls included, sends it, so it must open the servers' admin routes too."""

    def __post_init__(self) -> None:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError(f"api_key and api_key_file = {self.api_key_file} are both set; keep api_key_file (a key "
                             "in the config is readable wherever the config is)")
        if not self.server_urls:
            raise ValueError("server_urls is empty: give at least one server, e.g. server_urls = "
                             "[\"http://127.0.0.1:30000\"]")
        for url in (*self.server_urls, *((self.router_url,) if self.router_url else ())):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r}: must start with http:// or https://")
        if len(set(self.server_urls)) != len(self.server_urls):
            raise ValueError(f"server_urls {list(self.server_urls)} lists a server twice; list each once")
        if self.capacity_per_server < 0:
            raise ValueError(f"capacity_per_server = {self.capacity_per_server}: must be >= 0 (0 = from /server_info)")
        if self.max_retries < 0:
            raise ValueError(f"max_retries = {self.max_retries}: must be >= 0")
        if self.eject_after_failures < 1:
            raise ValueError(f"eject_after_failures = {self.eject_after_failures}: must be >= 1")
        if self.affinity_entries < 1:
            raise ValueError(f"affinity_entries = {self.affinity_entries}: must be >= 1")
        for name in ("request_timeout_s", "connect_timeout_s", "admin_timeout_s", "abort_timeout_s",
                     "queue_timeout_s", "health_check_interval_s", "health_timeout_s", "keepalive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0 seconds")
        if self.retry_backoff_s < 0:
            raise ValueError(f"retry_backoff_s = {self.retry_backoff_s}: must be >= 0 seconds")

    def bearer_key(self) -> str | None:
        """The key clients send: api_key, or the content of api_key_file (ssp.run_key.RunKeyError if unreadable)."""
        from ssp.run_key import load_api_key

        return self.api_key or load_api_key(self.api_key_file, "inference.api_key_file")
