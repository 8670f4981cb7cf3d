"""Token-in/token-out generation types shared by the inference client, the pool and the rollout loop.

These mirror SGLang's native /generate request and response (its HTTP API) with only what an RL
rollout needs. Model output is never re-tokenized: `output_ids` and `logprobs` are appended to trajectories as is.
"""

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol

SLOT_PRIORITY: ContextVar[int] = ContextVar("ssp_slot_priority", default=0)
"""Where the calls made in this context wait for a server slot: the pool hands a freed slot to the lowest value
first, and in arrival order among equals. The scheduler sets it, for everything an episode does, to the policy
version the episode started on, so slots go earliest-deadline-first: under the staleness bound an old episode must
reach the learner before newer ones, and a long-running one (a proposer that searches for minutes) would otherwise
queue for a slot at every turn behind the turns of episodes started after it, and make the learner wait for it.
A context variable rather than an argument: it is a property of the episode, not of any one call, and reaches every
generate call of its rollouts (tasks inherit it) without each layer between passing it on."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """SGLang `sampling_params` for one request. Defaults suit RL: keep stop tokens, never strip special tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = True
    skip_special_tokens: bool = False
    sampling_seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object for the request body; unset optional keys are left out (SGLang rejects unknown ones)."""
        body: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "ignore_eos": self.ignore_eos,
            "no_stop_trim": self.no_stop_trim,
            "skip_special_tokens": self.skip_special_tokens,
        }
        if self.stop:
            body["stop"] = list(self.stop)
        if self.stop_token_ids:
            body["stop_token_ids"] = list(self.stop_token_ids)
        if self.sampling_seed is not None:
            body["sampling_seed"] = self.sampling_seed
        return body


@dataclass(frozen=True, slots=True)
class FinishReason:
    """Why generation ended: "stop" (EOS/stop token id or stop string in `matched`), "length", or "abort"."""

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class WeightSpan:
    """Output positions [start, end) produced by weights `version` (SGLang's meta_info.weight_versions)."""

    version: str
    start: int
    end: int


@dataclass(kw_only=True, slots=True)
class GenerateResult:
    """One finished (or aborted) sample. len(output_ids) == len(logprobs); spans cover [0, len(output_ids)).

    Ids and logprobs are `array`s (int64, float64) as the client parses them: the rollout copies them into its own
    arrays as memory, without a Python object per token. Not frozen: the client fills in its timing once parsed."""

    rid: str
    output_ids: Sequence[int]
    logprobs: Sequence[float]
    finish: FinishReason
    weight_version: str
    weight_versions: tuple[WeightSpan, ...]
    prompt_tokens: int
    cached_tokens: int
    text: str
    server: str
    """Base URL of the server that produced it (for metrics and affinity checks)."""
    client_s: float = 0.0
    """Seconds the client spent encoding the request and decoding this answer: engine work of the turn, which the
    rollout counts in its per-turn overhead (wall clock; `client_cpu_s` in the loop thread's CPU time)."""
    client_cpu_s: float = 0.0
    request_started_at: float | None = None
    """time.perf_counter() when the client took the request (a server slot held) and began encoding it."""
    request_sent_at: float | None = None
    """time.perf_counter() when the encoded request was handed to the HTTP connection."""
    answer_received_at: float | None = None
    """time.perf_counter() when the answer's bytes were in, before it was decoded. The three are None from a
    generator that does not report them; the rollout's end-to-end turn latency (`RolloutRunner.turn_latency`) is
    measured from them."""


class Generator(Protocol):
    """What the rollout loop needs from inference: one sample per call, routed with prefix-cache affinity."""

    async def generate(self, input_ids: Sequence[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
        """Generate one continuation of `input_ids`. Calls sharing `affinity` go to the same server when it is
        healthy (all turns of one rollout, all samples of one prompt), so its prefix cache is reused."""
        ...
