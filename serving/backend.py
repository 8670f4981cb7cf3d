"""The seam between the SGLang-compatible HTTP front (`serving/app.py`) and whatever generates tokens.

The front owns everything that is protocol: JSON parsing and validation with SGLang's status codes, `n > 1`
expansion, the table of live request ids (duplicates, abort lookup), holding new requests while paused, the
writer lock that makes weight updates wait for in-flight requests, the weight-update session, auth, SSE.
A backend owns everything that is model: tokenization, scheduling and batching, sampling, stop rules, the KV cache,
weights and their version. Two backends implement it: `ssp.serving.model_backend.ModelBackend` (a transformers model
with continuous batching) and the simulated backend in `serving/sim*.py` (no weights, a latency model).

Request lifecycle, as the front drives it:

    req = GenerateRequest(rid="r-0001", input_ids=[...], sampling=SamplingOptions(...), ...)
    async for out in backend.generate(req):   # cumulative snapshots: out.output_ids grows
        ...                                    # the last snapshot has out.finish set (and nothing follows)
    # Leaving the loop early (client disconnected, task cancelled) must abort the request in the backend:
    # implement generate() as an async generator whose `finally` aborts the rid if it has not finished.

    await backend.abort(prefix)                # every live rid starting with `prefix` finishes with an abort
    await backend.pause("retract")             # then later: await backend.resume()

Threading: the front runs on one asyncio loop. A backend may compute on other threads, but every method below is
called from that loop and must not block it (use `asyncio.to_thread` or hand work to the backend's own thread).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

PauseMode = Literal["abort", "retract", "in_place"]


class BackendError(Exception):
    """A request the backend cannot take (e.g. its waiting queue is full). The front answers `status` with SGLang's
    ErrorResponse shape `{"object": "error", "message": ..., "type": ..., "param": null, "code": status}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingOptions:
    """Validated `sampling_params` of one request (the front has checked types and ranges as SGLang does).

    Greedy is `temperature == 0.0` (the front maps anything below 1e-6 to exactly 0.0).
    """

    max_new_tokens: int
    """Output budget, already resolved: a JSON null became (context length - prompt length)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = the whole vocabulary."""
    min_p: float = 0.0
    min_new_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens were produced."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded output text."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop token ids, in addition to the model's EOS ids."""
    ignore_eos: bool = False
    """Do not stop on EOS; also disables `stop_token_ids` (stop strings still apply)."""
    skip_special_tokens: bool = True
    """Affects `text` only."""
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    """False: the matched stop string / stop token is cut from `text` (never from `output_ids`)."""
    sampling_seed: int | None = None
    """Per-request seed: the same seed, prompt and weights give the same tokens."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerateRequest:
    """One sample to generate (the front has already expanded batches and n > 1 into these)."""

    rid: str
    input_ids: list[int]
    sampling: SamplingOptions
    return_logprob: bool = False
    logprob_start_len: int = -1
    """First prompt position with an input logprob; -1 = none. Checked against len(input_ids) by the front."""
    top_logprobs_num: int = 0
    """If > 0 (with return_logprob), also return that many most likely tokens at every position."""
    token_ids_logprob: tuple[int, ...] = ()
    """With return_logprob: also return the logprobs of these ids at every position."""
    prefill_only: bool = False
    """NOTE: the hidden warm-up request of n > 1 (SGLang caches the prompt first); backends may treat it as a no-op."""


@dataclass(frozen=True, slots=True)
class Finish:
    """Why a request ended, in SGLang's `finish_reason` shapes (`to_json`)."""

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    """type "stop": the stop token id (int) or the stop string (str)."""
    length: int | None = None
    """type "length": the max_new_tokens budget."""
    message: str | None = None
    """type "abort": "Aborted" (running), "Abort in waiting queue" (queued), or the rejection reason."""
    status_code: int | None = None
    """type "abort": an HTTP status (400-599) when the abort is an error; the front then fails the call with it."""
    err_type: str | None = None
    queued: bool = False
    """type "abort": the request never ran (SGLang then omits prompt_tokens and the status/err_type keys)."""

    def to_json(self) -> dict[str, Any]:
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.queued:
            return {"type": "abort", "message": self.message}
        return {"type": "abort", "message": self.message, "status_code": self.status_code, "err_type": self.err_type}


ABORTED = Finish("abort", message="Aborted")
ABORTED_QUEUED = Finish("abort", message="Abort in waiting queue", queued=True)

TopLogprobs = list[tuple[float, int]]
"""(logprob, token_id) pairs at one position, most likely first."""


@dataclass(kw_only=True, slots=True)
class GenerateOutput:
    """A cumulative snapshot of one request: everything produced so far. The last one has `finish` set.

    Invariants on the final snapshot: len(output_ids) == len(output_logprobs) (when logprobs were requested);
    `weight_spans` are contiguous, start at 0, end at len(output_ids); the last span's version is the version of the
    last token.
    """

    rid: str
    output_ids: list[int]
    text: str
    """Decoded output, with the stop string/token trimmed unless no_stop_trim, special tokens per the options."""
    prompt_tokens: int
    cached_tokens: int = 0
    """Prompt tokens served from a prefix cache."""
    finish: Finish | None = None
    output_logprobs: list[float] = field(default_factory=list)
    """log_softmax(logits / T) of each output token, before top-k/top-p (T = 1 for greedy)."""
    input_logprobs: list[float | None] = field(default_factory=list)
    """Prompt positions logprob_start_len..end; the first is None (nothing predicts it)."""
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    input_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)
    output_token_ids_logprobs: list[TopLogprobs] = field(default_factory=list)
    input_token_ids_logprobs: list[TopLogprobs | None] = field(default_factory=list)
    weight_spans: list[tuple[str, int, int]] = field(default_factory=list)
    """(version, start, end) over output positions; empty until a token exists."""
    weight_version: str = "default"
    """Version that produced the last token (the current version if none was produced yet)."""
    num_retractions: int = 0
    ran: bool = True
    """False if the request was aborted before it ever ran (the front then omits prompt_tokens)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadStats:
    """What /v1/loads and /get_load report."""

    num_running_reqs: int
    num_waiting_reqs: int
    num_used_tokens: int
    """Tokens held in the KV cache by running requests."""
    max_total_num_tokens: int
    max_running_requests: int
    gen_throughput: float
    """Output tokens per second, recent average."""
    num_retracted_reqs: int = 0
    num_paused_reqs: int = 0
    sim_behind_s: float | None = None
    """Simulated backends only: wall seconds the simulated clock is behind the scaled wall clock right now. More
    than a little means the host is too slow for the time scale, and every rate measured against it is too low."""
    sim_clock: dict[str, float] | None = None
    """Simulated backends only: cumulative simulated seconds (elapsed, decode, prefill, paused) and token counts
    since start (`SimBackend.sim_clock`), for benches that split a server's time."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelDescription:
    """Static facts for /model_info, /server_info, /v1/models and the front's length checks."""

    model_path: str
    served_model_name: str
    tokenizer_path: str
    model_type: str
    architectures: tuple[str, ...]
    context_length: int
    """Longest prompt + output, in tokens."""
    max_req_input_len: int
    """Longest prompt the scheduler admits (at most context_length - 1)."""
    max_running_requests: int
    max_total_num_tokens: int
    vocab_size: int
    """Input ids must lie in [0, vocab_size)."""
    device: str
    dtype: str


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """Reply of a weight-update hook; the front adds the version suffix and the flush outcome to `message`."""

    success: bool
    message: str


class Backend(abc.ABC):
    """What the HTTP front needs from a generator. See the module docstring for the request lifecycle."""

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model / start worker threads. Called once on the front's loop before the port opens."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Abort everything, stop threads, release process groups. Called once at shutdown."""

    @abc.abstractmethod
    def describe(self) -> ModelDescription:
        """Static model and capacity facts (may change after update_weights_from_disk)."""

    # ---- tokenizer ---------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenize a `text` prompt with special tokens added (as SGLang does)."""

    @abc.abstractmethod
    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        """Detokenize (used for `return_text_in_logprobs`, one token at a time)."""

    # ---- generation --------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Queue `req` (FIFO behind the running batch) and yield cumulative snapshots until one has `finish`.

        Yield at least the final snapshot; yielding after each new token lets the front stream. Raise
        BackendError before the first yield to refuse the request (e.g. queue full → 503). Closing the iterator
        early must abort the request and free its resources.
        """

    @abc.abstractmethod
    async def abort(self, rid_prefix: str, *, abort_all: bool = False) -> None:
        """Finish every queued or running request whose rid starts with `rid_prefix` (all of them if abort_all) with
        ABORTED (running) or ABORTED_QUEUED (queued). Their generate() iterators then yield that final snapshot."""

    @abc.abstractmethod
    async def pause(self, mode: PauseMode) -> None:
        """Stop stepping. "abort": abort everything (the front waits for the calls to return). "retract": move
        running requests back to the queue and drop their KV; on resume they re-prefill prompt + output so far with
        the then-current weights (count it in num_retractions). "in_place": keep everything, just stop stepping.
        New requests submitted while paused stay queued until resume()."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Continue after pause()."""

    @abc.abstractmethod
    def is_idle(self, *, ignore_queued: bool) -> bool:
        """No running request (and, unless ignore_queued, no queued one). The front flushes only when idle; during
        a retract pause queued requests do not count (SGLang ignores them)."""

    @abc.abstractmethod
    async def flush_cache(self) -> None:
        """Drop any prefix cache. Only called when is_idle()."""

    @abc.abstractmethod
    def load(self) -> LoadStats:
        """Current load for /v1/loads and /get_load."""

    # ---- weights -----------------------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def weight_version(self) -> str:
        """The current weight version label."""

    @abc.abstractmethod
    def set_weight_version(self, version: str) -> None:
        """Relabel the weights; tokens produced from now on carry `version` (a new span in running requests)."""

    @abc.abstractmethod
    async def init_weights_update_group(
        self, *, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
        backend: str,
    ) -> UpdateResult:
        """Join the trainer's weight-update process group as rank `rank_offset`. Blocks until every rank joined."""

    @abc.abstractmethod
    async def update_weights_from_distributed(
        self, *, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
        load_format: str | None,
    ) -> UpdateResult:
        """Receive tensors broadcast from rank 0 (one per name, or one uint8 buffer for "flattened_bucket") and load
        them by Hugging Face name. Called with no request stepping (paused, or the writer lock held)."""

    @abc.abstractmethod
    async def destroy_weights_update_group(self, *, group_name: str) -> UpdateResult:
        """Leave and destroy the group."""

    @abc.abstractmethod
    async def update_weights_from_tensor(
        self, *, serialized_named_tensors: list[str], load_format: str | None,
    ) -> UpdateResult:
        """Load tensors passed in-process (CUDA IPC in SGLang); a CPU backend may answer success=False."""

    @abc.abstractmethod
    async def update_weights_from_disk(self, *, model_path: str, load_format: str | None) -> UpdateResult:
        """Load a Hugging Face checkpoint directory in place (roll back on failure)."""

    @abc.abstractmethod
    async def get_weights_by_name(self, name: str, truncate_size: int) -> list[Any] | None:
        """The first `truncate_size` rows of parameter `name` (HF naming) as nested float lists; None if unknown."""
