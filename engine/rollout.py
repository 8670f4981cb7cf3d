"""One multi-turn, token-in/token-out rollout: generate → (search → tool block) → generate … until a final tag.

    prompt_ids (chat template, rendered once)
      └─ turn: generate(prompt + response so far) → append output_ids, logprobs, versions   (loss mask 1)
           ├─ ends with </search>  → SearchBatcher → information block, encoded once       (loss mask 0) → next turn
           ├─ ends with the final closer (</answer>, </question>)                          → done ("answer"/"question")
           └─ EOS / budget / turn limit / malformed search                                 → done, reason recorded

Why token-in/token-out: the ids the policy sampled are exactly the ids trained on (no re-tokenising), and the
server's per-token logprobs and weight versions stay aligned with them. A generation the server aborts (a weight
update paused it in "abort" mode) is resumed by re-sending prompt + partial output; the partial tokens keep the
versions that produced them.

Failures of the infrastructure (server unreachable, retriever error) raise `RolloutError`: the episode is dropped and
reported, because a rollout cut short by infrastructure says nothing about the policy.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ssp.engine.aio import gather_or_cancel
from ssp.engine.chat import ChatTokenizer
from ssp.engine.checks import SearchRecord
from ssp.engine.config import RolloutConfig
from ssp.engine.errors import InferenceError
from ssp.engine.generation import FinishReason, GenerateResult, Generator, SamplingParams
from ssp.engine.prompts import SEARCH_CLOSE, SEARCH_OPEN
from ssp.engine.search_batcher import SearchBatcher, SearchError
from ssp.engine.telemetry import Samples
from ssp.engine.trajectory import UNKNOWN_VERSION, Role, Trajectory
from ssp.retriever.protocol import Doc


class RolloutError(Exception):
    """The rollout could not finish for reasons outside the policy (inference or retrieval failed)."""


class EndReason(enum.StrEnum):
    """Why a rollout stopped. The first two are the normal ends; the rest are recorded in meta.finish_reason."""

    ANSWER = "answer"  # the final closer </answer> was generated
    QUESTION = "question"  # the final closer </question> was generated
    EOS = "eos"  # the model ended its turn (EOS) without a final closer
    MISSING_CLOSER = "missing_closer"  # EOS inside an unclosed <search> or final tag
    MALFORMED_SEARCH = "malformed_search"  # </search> without <search>, or an empty query
    TURN_LIMIT = "turn_limit"  # max_turns used up (a search asked for in the last turn is not run)
    TURN_BUDGET = "turn_budget"  # one turn hit max_new_tokens_per_turn
    RESPONSE_BUDGET = "response_budget"  # max_response_tokens reached
    CONTEXT_BUDGET = "context_budget"  # max_context_tokens reached


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutSpec:
    """What differs between roles: the tags that end a turn, whether searches run, sampling."""

    final_open: str
    """Opening tag of the final output ("<answer>" or "<question>")."""
    final_close: str
    """Closing tag that ends the rollout ("</answer>" or "</question>")."""
    search: bool
    """Whether "</search>" ends a turn and runs a search (proposer, solver) or is just text (verifier)."""
    temperature: float
    top_p: float = 1.0
    max_new_tokens: int | None = None
    """Per-turn cap overriding rollout.max_new_tokens_per_turn (e.g. the short verification answers)."""
    prefill: str = ""
    """Opening text the prompt already ends with (`ChatTokenizer.render(..., prefill=)`, e.g. "<search>"). It is
    prompt, not response, but tag parsing reads it as the start of the first turn, so "<search>" + " q </search>"
    is a search and "<answer>" + " x </answer>" an answer."""
    later_prefills: tuple[str, ...] = ()
    """Opening text of the turns after searches: after the k-th search's information block the next turn opens
    with later_prefills[k - 1] (none past the end). Inserted with the tool block (loss mask 0, never sampled) and
    read as the start of that turn, like `prefill`; a scaffold for a model too small to write the tags itself."""

    @property
    def stop(self) -> tuple[str, ...]:
        return (SEARCH_CLOSE, self.final_close) if self.search else (self.final_close,)


@dataclass(frozen=True, slots=True)
class Segment:
    """A span [start, end) of the response: "gen" (sampled by the policy) or "tool" (an information block)."""

    kind: str
    start: int
    end: int


def _ids() -> array[int]:
    return array("l")


@dataclass(kw_only=True, slots=True)
class Rollout:
    """A finished rollout. Token arrays align with response_ids; tool tokens have logprob 0.0 and version -1.

    NOTE: token-level data is kept in `array`s, not lists: the garbage collector does not walk arrays, and with
    thousands of rollouts in flight walking millions of list items made each full collection stall the event loop.
    """

    prompt_ids: array[int]
    response_ids: array[int] = field(default_factory=_ids)
    loss_mask: array[int] = field(default_factory=lambda: array("b"))
    logprobs: array[float] = field(default_factory=lambda: array("d"))
    versions: array[int] = field(default_factory=_ids)
    segments: list[Segment] = field(default_factory=list)
    searches: list[SearchRecord] = field(default_factory=list)
    docs: list[list[Doc]] = field(default_factory=list)
    """Documents of each executed search, in order (the proposer's verification materials)."""
    generated_text: str = ""
    """The spec's prefill, then the text of the generated turns (tool blocks excluded) as the server decoded it;
    used for tag parsing."""
    turns: int = 0
    resumes: int = 0
    end: EndReason = EndReason.EOS
    overhead_s: list[float] = field(default_factory=list)
    """Engine time per turn between a generation returning and the next request (search wait excluded)."""

    def append_generated(self, ids: array[int], logprobs: array[float], versions: array[int]) -> None:
        """A turn the policy sampled (loss mask 1). Arrays in, so each extend is a copy of memory."""
        start = len(self.response_ids)
        self.response_ids.extend(ids)
        self.loss_mask.frombytes(b"\x01" * len(ids))
        self.logprobs.extend(logprobs)
        self.versions.extend(versions)
        self.segments.append(Segment("gen", start, len(self.response_ids)))

    def append_tool(self, ids: array[int]) -> None:
        """A tool block (loss mask 0, logprob 0.0, version -1), written as bytes: no per-token Python objects."""
        start = len(self.response_ids)
        self.response_ids.extend(ids)
        self.loss_mask.frombytes(bytes(len(ids)))
        self.logprobs.frombytes(bytes(self.logprobs.itemsize * len(ids)))  # all-zero bytes are 0.0
        self.versions.frombytes(b"\xff" * (self.versions.itemsize * len(ids)))  # all-one bytes are -1
        self.segments.append(Segment("tool", start, len(self.response_ids)))

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)

    def trajectory(self, *, role: Role, group_id: str, reward: float, meta: dict[str, Any]) -> Trajectory:
        traj = Trajectory(
            role=role,
            group_id=group_id,
            prompt_ids=self.prompt_ids.tolist(),
            response_ids=self.response_ids.tolist(),
            loss_mask=self.loss_mask.tolist(),
            rollout_logprobs=self.logprobs.tolist(),
            policy_versions=self.versions.tolist(),
            reward=reward,
            meta={
                "finish_reason": str(self.end),
                "turns": self.turns,
                "searches": [s.query for s in self.searches],
                "resumes": self.resumes,
                "segments": [[s.kind, s.start, s.end] for s in self.segments],
                **meta,
            },
        )
        traj.validate()
        return traj


def parse_version(version: str) -> int:
    """Policy version of a server weight version: the learner sets str(int); a server never updated reports
    SGLang's "default", which is the initial policy, version 0."""
    if version == "default":
        return 0
    try:
        return int(version)
    except ValueError:
        raise RolloutError(f"server weight version {version!r} is not an integer policy version; the learner must "
                           "set weight versions to str(policy_version)") from None


def token_versions(result: GenerateResult) -> array[int]:
    """One policy version per output token, from the result's weight_versions spans; UNKNOWN_VERSION for every
    token when the server reported none (the learner counts them)."""
    n = len(result.output_ids)
    if not result.weight_versions:
        return array("l", [UNKNOWN_VERSION]) * n
    out = array("l", [-1]) * n
    for span in result.weight_versions:
        start, end = max(0, span.start), min(n, span.end)
        if end > start:
            out[start:end] = array("l", [parse_version(span.version)]) * (end - start)  # no per-token Python loop
    if -1 in out:
        raise RolloutError(f"request {result.rid}: weight_versions {result.weight_versions} do not cover all "
                           f"{n} output tokens")
    return out


class RolloutRunner:
    """Runs rollouts against a Generator (the InferencePool) and a SearchBatcher; stateless between rollouts."""

    def __init__(self, generator: Generator, chat: ChatTokenizer, batcher: SearchBatcher | None,
                 cfg: RolloutConfig) -> None:
        self._gen = generator
        self._chat = chat
        self._batcher = batcher
        self._cfg = cfg
        self.active = 0
        """Rollouts running now (a gauge for metrics and benches)."""
        self.turn_overhead = Samples()
        """Engine-side seconds of every turn as it happens (the per-rollout lists reach the scheduler only when an
        episode ends, which at 10k rollouts in flight may be minutes later; benches read this one live)."""
        self.turn_overhead_cpu = Samples()
        """The same sections in CPU time of the loop thread: the engine's own cost, without the time the host gave
        other processes (on a shared machine the wall-clock figure includes it)."""
        self.turn_latency = Samples()
        """End-to-end seconds of every turn: from the moment a turn's answer is in to the moment the next turn's
        request is handed to the connection, with everything between (waiting for the loop, decoding, the search:
        its batching window, the retriever and the documents' encoding; the rollout's own work, the request's
        encoding), except the wait for a free server slot, which measures the servers' capacity, not the engine
        (`turn_slot_wait`)."""
        self.turn_slot_wait = Samples()
        """Seconds each turn's request waited for a free server slot (the pool's queue)."""
        self.search_wait = Samples()
        """Seconds each search took, from asking the SearchBatcher to its documents in hand (part of turn_latency)."""

    async def run(self, prompt_ids: Sequence[int], spec: RolloutSpec, *, affinity: str) -> Rollout:
        self.active += 1
        try:
            return await self._run(prompt_ids, spec, affinity)
        finally:
            self.active -= 1

    async def run_group(self, prompt_ids: Sequence[int], spec: RolloutSpec, n: int, *, affinity: str
                        ) -> list[Rollout]:
        """`n` rollouts from one prompt (a solver group, the verifier's samples), all on the server `affinity` binds.

        Sent together, the n first requests would each prefill the whole prompt: a server caches a prefix only once
        a prefill of it has finished. So the prompt is prefilled first, alone (max_new_tokens 0, as SGLang itself
        does for n > 1), and the n requests then find it in the server's prefix cache. With 4 verifier samples of a
        ~5.6k-token prompt, 80% of their prompt tokens were prefilled again (`ssp bench async-vs-sync`)."""
        if n > 1 and len(prompt_ids) < self._cfg.max_context_tokens:  # else each rollout ends before generating
            try:
                await self._gen.generate(prompt_ids, SamplingParams(max_new_tokens=0), affinity=affinity)
            except InferenceError as e:
                raise RolloutError(f"prefilling the shared prompt of {n} rollouts failed: {e}") from e
        return await gather_or_cancel([self.run(prompt_ids, spec, affinity=affinity) for _ in range(n)])

    async def _run(self, prompt_ids: Sequence[int], spec: RolloutSpec, affinity: str) -> Rollout:
        cfg = self._cfg
        ro = Rollout(prompt_ids=array("l", prompt_ids), generated_text=spec.prefill)
        turn_cap = spec.max_new_tokens or cfg.max_new_tokens_per_turn
        mark: float | None = None  # when engine-side work of this turn started (None before the first turn)
        cpu_mark = 0.0  # the loop thread's CPU clock at `mark` (other coroutines only run while this one awaits)
        # NOTE: a turn's overhead is the rollout's own work between two generations plus the client's encoding and
        # decoding (`GenerateResult.client_s`), which is known only once the next generation returns.
        pending: tuple[float, float] | None = None
        answered_at: float | None = None  # when the previous turn's answer was in (None before the first turn)
        opener = spec.prefill  # what this turn's text starts with before the model writes anything
        while True:
            left_response = cfg.max_response_tokens - len(ro.response_ids)
            left_context = cfg.max_context_tokens - len(ro.prompt_ids) - len(ro.response_ids)
            budget = min(turn_cap, left_response, left_context)
            if budget < 1:
                ro.end = EndReason.RESPONSE_BUDGET if left_response < 1 else EndReason.CONTEXT_BUDGET
                return ro
            limit_reason = (EndReason.TURN_BUDGET if budget == turn_cap else
                            EndReason.RESPONSE_BUDGET if budget == left_response else EndReason.CONTEXT_BUDGET)
            sampling = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=budget,
                                      stop=spec.stop)
            if mark is not None:
                pending = (time.perf_counter() - mark, time.thread_time() - cpu_mark)
            turn = await self._generate_turn(ro, sampling, affinity)
            mark, cpu_mark = time.perf_counter(), time.thread_time()
            if pending is not None:
                overhead = pending[0] + turn.client_s
                ro.overhead_s.append(overhead)
                self.turn_overhead.add(overhead)
                self.turn_overhead_cpu.add(pending[1] + turn.client_cpu_s)
            if answered_at is not None:
                self.turn_latency.add(turn.called_at - answered_at + turn.handoff_s)
                self.turn_slot_wait.add(turn.slot_wait_s)
            answered_at = turn.answered_at
            # The tag a prefill opened belongs to this turn.
            turn_text = opener + turn.text
            ro.turns += 1
            ro.append_generated(turn.ids, turn.logprobs, turn.versions)
            ro.generated_text += turn.text
            closer = _closer(turn.finish, turn.text, spec.stop)
            if closer == spec.final_close:
                ro.end = EndReason.ANSWER if spec.final_close == "</answer>" else EndReason.QUESTION
                return ro
            if closer is None:
                if turn.finish.type == "length":
                    ro.end = limit_reason
                elif _unclosed(ro.generated_text, spec):
                    ro.end = EndReason.MISSING_CLOSER
                else:
                    ro.end = EndReason.EOS
                return ro
            # The turn ended with </search>.
            opener = turn_text.rfind(SEARCH_OPEN)
            query = (turn_text[opener + len(SEARCH_OPEN): turn_text.rfind(SEARCH_CLOSE)].strip() if opener >= 0
                     else "")
            if not query:
                ro.end = EndReason.MALFORMED_SEARCH
                return ro
            if ro.turns >= cfg.max_turns:
                ro.end = EndReason.TURN_LIMIT
                return ro
            assert self._batcher is not None, "a spec with search=True needs a SearchBatcher"
            search_started, search_cpu = time.perf_counter(), time.thread_time()
            try:
                docs = await self._batcher.search(query)
            except SearchError as e:
                raise RolloutError(f"search {query!r} failed: {e}") from e
            searched_s = time.perf_counter() - search_started
            self.search_wait.add(searched_s)
            mark += searched_s  # waiting for the retriever is not engine overhead
            cpu_mark += time.thread_time() - search_cpu  # nor is what other coroutines did meanwhile
            block = self._chat.encode_information(docs)
            k = len(ro.searches)  # this search's 0-based index
            opener = spec.later_prefills[k] if k < len(spec.later_prefills) else ""
            if opener:
                block.extend(self._chat.encode_tool(opener))
            if len(ro.response_ids) + len(block) > cfg.max_response_tokens:
                ro.end = EndReason.RESPONSE_BUDGET
                return ro
            if len(ro.prompt_ids) + len(ro.response_ids) + len(block) >= cfg.max_context_tokens:
                ro.end = EndReason.CONTEXT_BUDGET
                return ro
            ro.searches.append(SearchRecord(query, len(docs)))
            ro.docs.append(docs)
            ro.append_tool(block)
            ro.generated_text += opener

    async def _generate_turn(self, ro: Rollout, sampling: SamplingParams, affinity: str) -> TurnOutput:
        """One turn; an aborted generation is re-sent with its partial output until it finishes."""
        context = ro.prompt_ids + ro.response_ids  # an array: in-flight requests hold no int lists (ssp.engine.client)
        ids: array[int] = array("l")
        logprobs: array[float] = array("d")
        versions: array[int] = array("l")
        texts: list[str] = []
        client_s = client_cpu_s = 0.0
        called_at = time.perf_counter()
        slot_wait_s = handoff_s = 0.0
        for attempt in range(self._cfg.max_resumes + 1):
            left = sampling.max_new_tokens - len(ids)
            try:
                res = await self._gen.generate(context + ids, sampling if not attempt else
                                               dataclasses.replace(sampling, max_new_tokens=left), affinity=affinity)
            except InferenceError as e:
                raise RolloutError(f"generation failed: {e}") from e
            answered_at = res.answer_received_at if res.answer_received_at is not None else time.perf_counter()
            if not attempt and res.request_started_at is not None and res.request_sent_at is not None:
                slot_wait_s = res.request_started_at - called_at
                handoff_s = res.request_sent_at - res.request_started_at
            ids.extend(res.output_ids)
            logprobs.extend(res.logprobs)
            versions.extend(token_versions(res))
            texts.append(res.text)
            client_s += res.client_s
            client_cpu_s += res.client_cpu_s
            if res.finish.type != "abort":
                # After a resume the text is re-decoded whole: a character split across the pieces stays intact.
                text = texts[0] if len(texts) == 1 else self._chat.decode(ids)
                return TurnOutput(ids, logprobs, versions, res.finish, text, client_s, client_cpu_s, called_at,
                                  slot_wait_s, handoff_s, answered_at)
            ro.resumes += 1
            if len(ids) >= sampling.max_new_tokens:
                return TurnOutput(ids, logprobs, versions, FinishReason("length"), self._chat.decode(ids), client_s,
                                  client_cpu_s, called_at, slot_wait_s, handoff_s, answered_at)
        raise RolloutError(f"generation was aborted {self._cfg.max_resumes + 1} times in one turn "
                           "(rollout.max_resumes); the servers keep aborting requests")


@dataclass(slots=True)
class TurnOutput:
    """One assistant turn as generated (over one or more requests, if aborted ones were resumed)."""

    ids: array[int]
    logprobs: array[float]
    versions: array[int]
    finish: FinishReason
    text: str
    client_s: float
    """Seconds the client spent encoding requests and decoding answers for this turn (see GenerateResult)."""
    client_cpu_s: float
    called_at: float
    """time.perf_counter() when the rollout asked for the turn's first request."""
    slot_wait_s: float
    """Seconds the first request waited for a server slot (0 when the generator does not say)."""
    handoff_s: float
    """Seconds from the slot to the first request handed to the connection (its encoding; 0 when not said)."""
    answered_at: float
    """time.perf_counter() when the turn's last answer was in (when the generator returned, if it does not say)."""


def _closer(finish: FinishReason, text: str, stop: tuple[str, ...]) -> str | None:
    """Which stop string ended the turn, if any (the server's `matched`, else the end of the text)."""
    if finish.type != "stop":
        return None
    if isinstance(finish.matched, str) and finish.matched in stop:
        return finish.matched
    tail = text.rstrip()
    return next((s for s in stop if tail.endswith(s)), None)


def _unclosed(text: str, spec: RolloutSpec) -> bool:
    """An opener after the last closer of the same tag: the model stopped mid-tag."""
    pairs = [(spec.final_open, spec.final_close)] + ([(SEARCH_OPEN, SEARCH_CLOSE)] if spec.search else [])
    return any(text.rfind(o) > text.rfind(c) for o, c in pairs)
