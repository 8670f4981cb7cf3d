"""Config section [serving]: how `ssp model serve` runs the reference (or simulated) SGLang-compatible server."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, kw_only=True, slots=True)
class ServingConfig:
    model: Path | None = None
    """Hugging Face model directory (Llama or Qwen2 family); unset means the prepared SmolLM2-135M-Instruct
    (`ssp model prepare`, artifacts/models/SmolLM2-135M-Instruct)."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds to."""
    port: int = 30000
    """TCP port (SGLang's default is 30000); 0 picks a free port, printed at start-up."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs: "auto" is CUDA when available, else CPU."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype; fp32 keeps logprobs comparable to the learner's recomputation on CPU."""
    threads: int = 1
    """torch intra-op threads for the model; 0 = torch's default (one per core). 1 by default because small-batch
    matmuls with 2 threads on busy cores stall on thread barriers (measured 25x slower than 1 thread on a shared
    2-core machine); raise it on a dedicated machine."""
    max_running_requests: int = 16
    """Requests decoded together in one batch; more wait in a FIFO queue (SGLang's --max-running-requests)."""
    max_queued_requests: int = 8192
    """Waiting-queue bound (SGLang's --max-queued-requests): a sample beyond it gets 503 "The request queue is full."
    with Retry-After, which clients retry; 0 refuses every sample that would wait. Bounded by default (SGLang's is
    not) so that overload turns into retries instead of memory growth. A burst is queued before it is admitted, so
    keep it above max_running_requests (4096 in the 7B sim profile)."""
    max_concurrent_requests: int = 8192
    """/generate calls in flight at once, held-while-paused ones included; one more gets 503 with Retry-After before
    its body is read. With max_body_bytes it bounds the memory request bodies can hold. The engine sends at most a
    server's max_running_requests (or inference.capacity_per_server) at once."""
    max_body_bytes: int = 8 * 2**20
    """Largest request body on any route; a larger one gets 413. 8 MiB holds a full batch (max_batch_size = 64
    prompts) of 12,288-token prompts as JSON (at most 8 bytes a token id); raise it with max_batch_size or for longer
    contexts (SGLang's router allows 512 MiB, which lets one request pin that much memory per connection)."""
    max_batch_size: int = 64
    """Samples one /generate call may expand into (prompts x n); also caps the length of its rid list."""
    max_n: int = 64
    """Largest `n` (parallel samples per prompt) in sampling_params."""
    max_top_logprobs_num: int = 20
    """Largest top_logprobs_num (alternatives returned at every position, also never above the vocabulary); each
    costs a top-k per position and grows the response by an entry per token."""
    max_token_ids_logprob: int = 64
    """Most token ids in one token_ids_logprob list; each adds an entry per position to the response."""
    max_stop_strings: int = 32
    """Most stop strings per request (SGLang's limit); every one is searched in the output after every token."""
    max_stop_string_chars: int = 256
    """Longest stop string; holding back a partial match tries every prefix of every stop string after each token."""
    max_rid_chars: int = 256
    """Longest request id; a batch call with one rid string copies it into every sample's id."""
    context_length: int | None = None
    """Longest prompt + output in tokens; unset means the model's max_position_embeddings."""
    prefix_cache_tokens: int = 16384
    """Tokens of finished requests' KV kept for requests that extend them (the next turn of a rollout, a prompt's
    other samples); 0 disables. Costs 2 x layers x kv_heads x head_dim x 4 bytes per token in fp32 (46 KB for
    SmolLM2-135M). Flushed on every weight update."""
    max_total_num_tokens: int = 65536
    """KV capacity reported in /server_info and /v1/loads, and the cap on tokens held by running requests."""
    weight_version: str = "default"
    """Initial weight version reported in responses (SGLang's --weight-version)."""
    api_key: str | None = None
    """If set, every route except /health*, /ready needs `Authorization: Bearer <api_key>`. Anything in the config
    lands in run folders and, with --set, on command lines others can read: prefer api_key_file."""
    api_key_file: Path | None = None
    """File holding the API key (its content, whitespace stripped, 32 to 4096 bytes); read at start-up. ssp train
    points it at the run key (<run>/stream.key). Set api_key or api_key_file, not both."""
    admin_api_key: str | None = None
    """If set, control routes (abort, pause, flush, weight updates) need this key instead of api_key."""
    log_requests: bool = False
    """One log line per HTTP request (method, path, status). Off by default, as in SGLang (`--log-requests`): at
    thousands of requests a second the lines cost the server more CPU than the simulated model does."""
    served_model_name: str | None = None
    """Name reported by /model_info and /v1/models; unset means the model path."""
    weight_update_idle_timeout_s: float = 300.0
    """An ssp extension: a weight-update session (begin_weight_update) that sees no weight-update call for this
    long, with none running, is taken for abandoned by a dead trainer. The server then ends it, destroys every
    weight-update group and continues generation if paused, so it serves on and the next trainer's push starts
    clean. Between the buckets of a live push the gap is milliseconds; 0 disables (SGLang has no such timeout)."""
    weight_receive_timeout_s: float = 600.0
    """Longest wait for a trainer's broadcast (one receive) and for the weight-update group's rendezvous: a hung
    trainer then fails that update call instead of holding the server. A dead trainer fails it at once (its
    connection closes). SGLang's process-group default is 1800 s; raise it for buckets that take longer to send."""
    old_server: bool = False
    """Answer 404 on /begin_weight_update and /end_weight_update, like SGLang before mid-2026 (tests the engine's
    fallback)."""

    def __post_init__(self) -> None:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError(f"api_key and api_key_file = {self.api_key_file} are both set; keep api_key_file (a key "
                             "in the config is readable wherever the config is)")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests = {self.max_running_requests}: must be >= 1")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens = {self.prefix_cache_tokens}: must be >= 0 (0 disables it)")
        if self.threads < 0:
            raise ValueError(f"threads = {self.threads}: must be >= 0 (0 = torch's default)")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests = {self.max_queued_requests}: must be >= 0 (0 refuses every "
                             "request that would wait)")
        for key in ("max_concurrent_requests", "max_body_bytes", "max_batch_size", "max_n", "max_stop_string_chars",
                    "max_rid_chars"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)}: must be >= 1")
        for key in ("max_top_logprobs_num", "max_token_ids_logprob", "max_stop_strings"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)}: must be >= 0 (0 refuses any)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port = {self.port}: must be in [0, 65535]")
        if self.weight_update_idle_timeout_s < 0:
            raise ValueError(f"weight_update_idle_timeout_s = {self.weight_update_idle_timeout_s}: must be >= 0 "
                             "seconds (0 = never expire a weight-update session)")
        if self.weight_receive_timeout_s <= 0:
            raise ValueError(f"weight_receive_timeout_s = {self.weight_receive_timeout_s}: must be > 0 seconds")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length = {self.context_length}: must be >= 2 or unset")
