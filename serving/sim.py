"""The simulated backend of `ssp model serve --sim`: SGLang's protocol (via serving's HTTP front), no weights, and
the timing of a continuous-batching GPU server as modeled by a profile (serving/sim_profile.py).

One stepping loop (task "sim-stepper") plays the server's scheduler; no task or callback per token:

    waiting (FIFO) ──admit: slots (max_running_requests) and KV (kv_capacity_tokens) allow──► prefilling (FIFO)
    prefilling ──≤ chunked_prefill_tokens new tokens per step; a prefix-cache hit skips cached blocks──► running
    running ──one token per step each; finishes when its planned output is out──► done (generate() yields)
    running ──KV full: newest retracted, re-prefills prompt + output later (num_retractions)──► waiting (front)

    step time = a_ms + b_ms_per_request*B + c_ms_per_kv_token*K (+ eager_penalty_ms if B > cuda_graph_max_bs)
                + sum over this step's prefill chunks of n*(1 + ctx/attn_ctx_half_tokens)/tokens_per_s

B is the number of running requests and K the KV tokens they hold. Emission is implicit: a running request that
joined at step j with `base` tokens has base + (steps - j) tokens now, so K and finish times are kept as sums and a
heap, and one step costs O(requests that change state). The loop sleeps each step's duration / time_scale against
a wall-clock anchor, so a slow host shows up as lag (`stats().lag_s`) rather than as drift. The anchor of a busy
stretch is the moment its first request (or the resume) arrived, not the moment the host got round to stepping, and
a stretch's worst lag stays counted after the server goes idle (`sim_clock()["behind_s"]`). Aborts take effect at the
end of the current step (as in SGLang, a few more tokens may appear); pause, weight updates and resume cost the
profile's modeled times. What the sim says (token ids of SSP-shaped turns) is planned by `ssp.serving.sim_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
import math
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssp.paths import default_model_dir
from ssp.serving.backend import (
    ABORTED,
    ABORTED_QUEUED,
    Backend,
    BackendError,
    Finish,
    GenerateOutput,
    GenerateRequest,
    LoadStats,
    ModelDescription,
    PauseMode,
    UpdateResult,
)
from ssp.serving.config import ServingConfig
from ssp.serving.sim_profile import SimProfile, load_profile
from ssp.serving.sim_text import SimText, Tokenizer, TokenizerFile, TurnPlan, as_token_bytes

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int32": 4,
                "int64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}


class _State(enum.Enum):
    WAITING = "waiting"  # queued (new, or retracted and waiting to re-prefill)
    PREFILL = "prefill"  # admitted: holds KV, its prompt is being prefilled in chunks
    RUNNING = "running"  # decoding one token per step
    DONE = "done"  # finished; generate() yields its final snapshot


@dataclass(eq=False, slots=True)
class _Req:
    req: GenerateRequest
    plan: TurnPlan
    seq: int
    prompt_chain: BlockChain
    """The prompt as the prefix cache keys it, hashed once on arrival."""
    done: asyncio.Future[None]
    spans: list[list[Any]]
    """[version, start] boundaries over output positions."""
    state: _State = _State.WAITING
    base: int = 0
    """Tokens emitted before the current running stint."""
    enter_step: int = 0
    """Step count when the current running stint began."""
    stint: int = 0
    """Bumped on every retraction, so stale heap entries are recognised."""
    prefill_left: int = 0
    prefill_done: int = 0
    """Context tokens already in KV during prefill (cache hits included)."""
    cached_tokens: int = 0
    retractions: int = 0
    ran: bool = False
    finish: Finish | None = None
    emitted: int = 0
    """Final output length, set when done."""

    @property
    def context(self) -> int:
        """Tokens of KV this request needs to run: its prompt plus what it already emitted."""
        return len(self.req.input_ids) + self.base


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One simulated server step, with the terms of its duration."""

    batch: int
    """Running requests decoded in this step (B)."""
    kv_tokens: int
    """KV tokens they held (K)."""
    prefill_tokens: int
    """New prompt tokens prefilled in this step."""
    decode_ms: float
    """a + b*B + c*K (+ eager penalty)."""
    prefill_ms: float
    duration_s: float
    """Simulated duration: (decode_ms + prefill_ms) / 1000."""


@dataclass(slots=True)
class SimStats:
    """Counters since start (simulated time)."""

    steps: int = 0
    sim_time_s: float = 0.0
    decode_s: float = 0.0
    """Share of sim_time_s in the steps' decode terms."""
    prefill_s: float = 0.0
    """Share of sim_time_s in the steps' prefill terms."""
    paused_s: float = 0.0
    """Simulated seconds between a pause taking effect and the resume (the weight update happens in them)."""
    output_tokens: int = 0
    prefill_tokens: int = 0
    recomputed_tokens: int = 0
    """Prefill tokens of retracted requests coming back: work done twice because of a retraction (or a flush)."""
    cached_tokens: int = 0
    retractions: int = 0
    finished: int = 0
    lag_s: float = 0.0
    """Largest amount by which the loop fell behind the scaled wall clock (host too slow for the time scale)."""
    behind_s: float = 0.0
    """Wall seconds the server fell behind its clock, summed over its finished busy stretches (each counts its
    largest lag; a stretch ends when the server goes idle or pauses). Monotone, so a bench can guard any interval
    by the difference of two readings: idle time never forgives lag."""
    recent: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=4096))


@dataclass(frozen=True, slots=True)
class BlockChain:
    """A token sequence as the prefix cache keys it: the chained hashes of its full blocks, and its packed ids after
    the last full block (so a longer sequence that starts with it continues the chain without hashing it again)."""

    hashes: tuple[int, ...] = ()
    rest: bytes = b""


class SimPrefixCache:
    """A radix-cache stand-in: chained hashes of fixed-size token blocks in an LRU bounded by KV capacity.

    A request's prompt is hashed once, when it arrives (`chain`), and its finished output continues that chain, so
    the server's host work per request grows with the prompt once, not at every admission, join and finish: a
    verifier prompt of ~5.6k tokens hashed four times per request was a large part of the sim's own CPU on the
    bench's shared cores."""

    def __init__(self, *, capacity_tokens: int, block_tokens: int, enabled: bool) -> None:
        self._block = block_tokens
        self._capacity_blocks = max(1, capacity_tokens // block_tokens)
        self._enabled = enabled
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def chain(self, token_bytes: bytes, base: BlockChain = BlockChain()) -> BlockChain:
        """The chain of `base`'s sequence followed by `token_bytes` (ids packed by `as_token_bytes`); an empty chain
        when the cache is disabled (nothing is ever looked up)."""
        if not self._enabled:
            return base
        raw = base.rest + token_bytes
        step = 4 * self._block
        hashes, h = list(base.hashes), (base.hashes[-1] if base.hashes else 0)
        end = len(raw) - len(raw) % step
        for start in range(0, end, step):
            h = hash((h, raw[start:start + step]))
            hashes.append(h)
        return BlockChain(tuple(hashes), raw[end:])

    def match(self, chain: BlockChain, n_tokens: int) -> int:
        """Cached prefix length in tokens of the `n_tokens`-token sequence `chain` keys (at most n_tokens - 1: the
        last token is always computed)."""
        if not self._enabled:
            return 0
        hit = 0
        for h in chain.hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            hit += 1
        return min(hit * self._block, n_tokens - 1)

    def insert(self, chain: BlockChain) -> None:
        if not self._enabled:
            return
        for h in chain.hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self._capacity_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class SimBackend(Backend):
    """A simulated SGLang server: plans SSP-shaped outputs, times them with the profile's GPU model."""

    def __init__(self, profile: SimProfile, tokenizer: Tokenizer, *, tokenizer_path: str, time_scale: float | None,
                 served_model_name: str | None = None, weight_version: str = "default",
                 max_queued_requests: int = ServingConfig().max_queued_requests) -> None:
        self.profile = profile
        self._tok = tokenizer
        self._tokenizer_path = tokenizer_path
        self.time_scale = time_scale if time_scale is not None else profile.sim.time_scale
        if self.time_scale <= 0:
            raise ValueError(f"sim time scale {self.time_scale}: must be > 0 (1 = real time)")
        self._name = served_model_name or f"sim:{profile.profile.name}"
        self._version = weight_version
        self._max_queued = max_queued_requests
        self._rng = random.Random(profile.sim.seed)
        self._text = SimText(tokenizer, shapes=profile.shapes, spec=profile.sim, rng=self._rng)
        self._cache = SimPrefixCache(capacity_tokens=profile.server.kv_capacity_tokens,
                                  block_tokens=profile.sim.prefix_block_tokens, enabled=profile.prefix_cache.enabled)
        self._live: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._prefilling: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}
        """Insertion order = join order; the newest is retracted first when KV runs out."""
        self._abort_pending: list[_Req] = []
        """Running or prefilling requests to finish with ABORTED at the end of the current step."""
        self._heap: list[tuple[int, int, int, _Req]] = []
        """(finish step, seq, stint, request) for running requests."""
        self._ctx0_sum = 0
        """Sum over running requests of their context when they joined."""
        self._enter_sum = 0
        self._prefill_ctx_sum = 0
        self._steps = 0
        self._due: float | None = None
        """Loop time by which the current step should end (None while idle): how far behind the host runs."""
        self._sleeping = False
        """The stepping loop waits for work (idle or paused)."""
        self._woken_at: float | None = None
        """Loop time the first work arrived while the loop slept: the next busy stretch's clock starts there."""
        self._stretch_lag = 0.0
        """Largest lag of the current busy stretch (added to stats.behind_s when it ends)."""
        self._seq = 0
        self._paused = False
        self._paused_at = 0.0
        """Loop time the current pause took effect (counted into stats.paused_s on resume)."""
        self._started_at = 0.0
        """Loop time of start(): the simulated clock's origin for load().sim_clock."""
        self._pause_request: PauseMode | None = None
        self._pause_applied = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = SimStats()
        self._logprobs = [-self._rng.expovariate(4.0) for _ in range(4099)]
        """Made-up logprobs (the sim has no distribution), cut from this table at a random offset."""

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._started_at = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._step_loop(), name="sim-stepper")
        self._task.add_done_callback(_crash_if_failed)

    async def close(self) -> None:
        await self.abort("", abort_all=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def describe(self) -> ModelDescription:
        shapes, server = self.profile.shapes, self.profile.server
        return ModelDescription(
            model_path=self._name, served_model_name=self._name, tokenizer_path=self._tokenizer_path,
            model_type="sim", architectures=("SimulatedForCausalLM",), context_length=shapes.max_context_tokens,
            max_req_input_len=shapes.max_context_tokens - 1, max_running_requests=server.max_running_requests,
            max_total_num_tokens=server.kv_capacity_tokens, vocab_size=len(self._tok), device="sim", dtype="bfloat16")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    # ---------------------------------------------------------------- requests

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if len(self._waiting) >= self._max_queued:
            raise BackendError(503, "The request queue is full.")
        # The prompt is packed once: reading it (SimText) and keying it in the prefix cache both search the bytes.
        prompt_bytes = as_token_bytes(req.input_ids)
        plan = self._text.plan(req.input_ids, req.sampling, token_bytes=prompt_bytes)
        self._seq += 1
        r = _Req(req=req, plan=plan, seq=self._seq, prompt_chain=self._cache.chain(prompt_bytes),
                 done=asyncio.get_running_loop().create_future(), spans=[[self._version, 0]])
        self._live[req.rid] = r
        self._waiting.append(r)
        self._wake_for_work()
        try:
            await asyncio.shield(r.done)
            yield self._snapshot(r)
        finally:
            if r.state is not _State.DONE:  # the caller went away: free the request now
                self._finalize(r, ABORTED if r.ran else ABORTED_QUEUED)
            self._live.pop(req.rid, None)

    async def abort(self, rid_prefix: str, *, abort_all: bool = False) -> None:
        if not abort_all and not rid_prefix:
            return
        for r in [r for rid, r in self._live.items() if abort_all or rid.startswith(rid_prefix)]:
            if r.state is _State.WAITING or self._paused or self._task is None:
                self._finalize(r, ABORTED if r.ran else ABORTED_QUEUED)
            elif r.state is not _State.DONE:
                self._abort_pending.append(r)  # finished at the end of the step in progress

    async def pause(self, mode: PauseMode) -> None:
        self._pause_applied.clear()
        self._pause_request = mode
        self._wake.set()
        await self._pause_applied.wait()
        await asyncio.sleep(self.profile.weight_update.pause_ms / 1000 / self.time_scale)

    async def resume(self) -> None:
        await asyncio.sleep(self.profile.weight_update.resume_ms / 1000 / self.time_scale)
        if self._paused:
            self.stats.paused_s += (asyncio.get_running_loop().time() - self._paused_at) * self.time_scale
        self._paused = False
        self._woken_at = None  # the work queued during the pause starts its clock now, not when it arrived
        self._wake_for_work()

    def _wake_for_work(self) -> None:
        """Work arrived: wake the stepping loop. Its clock starts now, so a host that runs the loop late (busy with
        other processes) shows as lag instead of vanishing into idle time."""
        if self._sleeping and not self._paused and self._woken_at is None:
            self._woken_at = asyncio.get_running_loop().time()
        self._wake.set()

    def is_idle(self, *, ignore_queued: bool) -> bool:
        return not self._running and not self._prefilling and (ignore_queued or not self._waiting)

    async def flush_cache(self) -> None:
        self._cache.clear()

    def load(self) -> LoadStats:
        recent = list(self.stats.recent)[-64:]
        sim_s = sum(s.duration_s for s in recent)
        return LoadStats(
            num_running_reqs=len(self._running) + len(self._prefilling), num_waiting_reqs=len(self._waiting),
            num_used_tokens=self._kv_running() + self._prefill_ctx_sum,
            max_total_num_tokens=self.profile.server.kv_capacity_tokens,
            max_running_requests=self.profile.server.max_running_requests,
            gen_throughput=sum(s.batch for s in recent) / sim_s if sim_s > 0 else 0.0,
            num_retracted_reqs=self.stats.retractions, num_paused_reqs=len(self._waiting) if self._paused else 0,
            sim_behind_s=0.0 if self._due is None else max(0.0, asyncio.get_running_loop().time() - self._due),
            sim_clock=self.sim_clock())

    def sim_clock(self) -> dict[str, float]:
        """Cumulative simulated seconds and tokens since start, so a bench can say where a server's time went:
        elapsed = decode + prefill (busy stepping) + paused (weight updates) + idle (nothing to run); behind_s: wall
        seconds the server ran late, cumulative (SimStats.behind_s plus the current stretch's lag)."""
        now = asyncio.get_running_loop().time()
        s = self.stats
        paused = s.paused_s + ((now - self._paused_at) * self.time_scale if self._paused else 0.0)
        late_now = 0.0 if self._due is None else max(0.0, now - self._due)
        return {"elapsed_s": (now - self._started_at) * self.time_scale, "decode_s": s.decode_s,
                "prefill_s": s.prefill_s, "paused_s": paused, "output_tokens": s.output_tokens,
                "prefill_tokens": s.prefill_tokens, "recomputed_tokens": s.recomputed_tokens,
                "retractions": s.retractions, "behind_s": s.behind_s + max(self._stretch_lag, late_now)}

    # ---------------------------------------------------------------- weights (modeled, nothing is received)

    @property
    def weight_version(self) -> str:
        return self._version

    def set_weight_version(self, version: str) -> None:
        self._version = version
        for r in self._live.values():
            if r.state is _State.DONE:
                continue
            n = self._emitted(r)
            if r.spans[-1][1] == n:
                r.spans[-1][0] = version
            else:
                r.spans.append([version, n])

    async def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str) -> UpdateResult:
        return UpdateResult(True, "Succeeded to initialize custom process group. (simulated server: no process "
                                  "group was joined; trainers must not broadcast to it)")

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              load_format: str | None) -> UpdateResult:
        try:
            nbytes = sum(math.prod(shape) * _DTYPE_BYTES[dtype] for dtype, shape in zip(dtypes, shapes))
        except (KeyError, TypeError) as e:
            return UpdateResult(False, f"Failed to receive weights: unknown dtype or bad shape ({e}); dtypes are "
                                       f"torch names such as 'bfloat16'")
        spec = self.profile.weight_update
        await self._sleep_sim(nbytes / spec.bandwidth_bytes_per_s + spec.per_bucket_overhead_ms / 1000)
        return UpdateResult(True, "Succeeded to update parameter online.")

    async def destroy_weights_update_group(self, *, group_name: str) -> UpdateResult:
        return UpdateResult(True, "Succeeded to destroy custom process group.")

    async def update_weights_from_tensor(self, *, serialized_named_tensors: list[str],
                                         load_format: str | None) -> UpdateResult:
        return UpdateResult(False, "update_weights_from_tensor is not supported by the simulated server (it holds "
                                   "no weights); use update_weights_from_distributed or update_weights_from_disk")

    async def update_weights_from_disk(self, *, model_path: str, load_format: str | None) -> UpdateResult:
        """Models a whole push: tp_gather + bytes/bandwidth + buckets x per-bucket overhead (profile)."""
        await self._sleep_sim(self.full_update_s())
        return UpdateResult(True, "Succeeded to update model weights.")

    def full_update_s(self) -> float:
        spec = self.profile.weight_update
        buckets = math.ceil(spec.bytes / spec.bucket_bytes)
        return spec.tp_gather_s + spec.bytes / spec.bandwidth_bytes_per_s + buckets * spec.per_bucket_overhead_ms / 1000

    async def get_weights_by_name(self, name: str, truncate_size: int) -> list[Any] | None:
        return None  # the simulated server has no parameters

    async def _sleep_sim(self, sim_s: float) -> None:
        await asyncio.sleep(sim_s / self.time_scale)

    # ---------------------------------------------------------------- the stepping loop

    def step_time_ms(self, batch: int, kv_tokens: int) -> float:
        """Decode part of a step: a + b*B + c*K (+ eager penalty above the CUDA-graph batch cap)."""
        d, server = self.profile.decode, self.profile.server
        eager = d.eager_penalty_ms if batch > server.cuda_graph_max_bs else 0.0
        return d.a_ms + d.b_ms_per_request * batch + d.c_ms_per_kv_token * kv_tokens + eager

    def prefill_time_ms(self, n_new: int, ctx_before: int) -> float:
        """n_new prompt tokens after ctx_before cached/prefilled ones: n*(1 + mid-context/ctx_half)/rate."""
        p = self.profile.prefill
        return 1000 * n_new * (1 + (ctx_before + n_new / 2) / p.attn_ctx_half_tokens) / p.tokens_per_s

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        anchor, sim_clock = loop.time(), 0.0
        while True:
            if self._pause_request is not None:
                self._apply_pause(self._pause_request)
            if self._paused or not (self._waiting or self._prefilling or self._running):
                self._due = None
                self.stats.behind_s += self._stretch_lag
                self._stretch_lag = 0.0
                self._sleeping, self._woken_at = True, None
                self._wake.clear()
                await self._wake.wait()
                self._sleeping = False
                # Idle time is not lag, but the host's delay in getting here after the work arrived is.
                anchor, sim_clock = self._woken_at if self._woken_at is not None else loop.time(), 0.0
                continue
            self._admit()
            chunks = self._prefill_chunks()
            batch, kv = len(self._running), self._kv_running()
            decode_ms = self.step_time_ms(batch, kv)
            prefill_ms = sum(self.prefill_time_ms(n, r.prefill_done) for r, n in chunks)
            record = StepRecord(batch=batch, kv_tokens=kv, prefill_tokens=sum(n for _, n in chunks),
                                decode_ms=decode_ms, prefill_ms=prefill_ms, duration_s=(decode_ms + prefill_ms) / 1000)
            sim_clock += record.duration_s
            self._due = anchor + sim_clock / self.time_scale
            delay = self._due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.stats.lag_s = max(self.stats.lag_s, -delay)
                await asyncio.sleep(0)
            self._stretch_lag = max(self._stretch_lag, loop.time() - self._due)
            self._end_step(record, chunks)

    def _apply_pause(self, mode: PauseMode) -> None:
        self._pause_request = None
        if mode == "abort":
            for r in list(self._live.values()):
                if r.state is not _State.DONE:
                    self._finalize(r, ABORTED if r.ran else ABORTED_QUEUED)
        elif mode == "retract":
            for r in reversed(list(self._running.values())):
                self._retract(r)
            for r in reversed(self._prefilling):
                self._prefill_ctx_sum -= r.context
                r.state = _State.WAITING
                self._waiting.appendleft(r)
            self._prefilling.clear()
        if not self._paused:
            self._paused_at = asyncio.get_running_loop().time()
        self._paused = True
        self._pause_applied.set()

    def _admit(self) -> None:
        """Move waiting requests to prefill while slots and KV allow (one at least, when nothing runs)."""
        server = self.profile.server
        while self._waiting and len(self._running) + len(self._prefilling) < server.max_running_requests:
            r = self._waiting[0]
            busy = self._running or self._prefilling
            if busy and self._kv_running() + self._prefill_ctx_sum + r.context > server.kv_capacity_tokens:
                return
            self._waiting.popleft()
            hit = self._cache.match(r.prompt_chain, len(r.req.input_ids))
            if r.ran:
                self.stats.recomputed_tokens += r.context - hit
            else:
                r.cached_tokens = hit
            r.state = _State.PREFILL
            r.prefill_done = hit
            r.prefill_left = r.context - hit
            self._prefill_ctx_sum += r.context
            self._prefilling.append(r)

    def _prefill_chunks(self) -> list[tuple[_Req, int]]:
        budget = self.profile.server.chunked_prefill_tokens
        chunks = []
        for r in self._prefilling:
            if budget <= 0:
                break
            n = min(r.prefill_left, budget)
            chunks.append((r, n))
            budget -= n
        return chunks

    def _end_step(self, record: StepRecord, chunks: list[tuple[_Req, int]]) -> None:
        self._steps += 1
        stats = self.stats
        stats.steps += 1
        stats.sim_time_s += record.duration_s
        stats.decode_s += record.decode_ms / 1000
        stats.prefill_s += record.prefill_ms / 1000
        stats.output_tokens += record.batch
        stats.prefill_tokens += record.prefill_tokens
        stats.recent.append(record)
        for r, n in chunks:
            if r.state is not _State.PREFILL:
                continue
            r.prefill_left -= n
            r.prefill_done += n
            if r.prefill_left == 0:
                self._join(r)
        while self._heap and self._heap[0][0] <= self._steps:
            _, _, stint, r = heapq.heappop(self._heap)
            if r.state is _State.RUNNING and r.stint == stint:
                self._finalize(r, r.plan.finish)
        pending, self._abort_pending = self._abort_pending, []
        for r in pending:
            self._finalize(r, ABORTED)  # a no-op for requests that finished meanwhile
        kv_capacity = self.profile.server.kv_capacity_tokens
        while len(self._running) > 1 and self._kv_running() + self._prefill_ctx_sum > kv_capacity:
            self._retract(self._running[next(reversed(self._running))])

    def _join(self, r: _Req) -> None:
        """Prefill done: the prefill step also produced the next token; the request decodes from now on."""
        self._prefill_ctx_sum -= r.context
        self._prefilling.remove(r)
        r.ran = True
        self._cache.insert(r.prompt_chain)
        if len(r.plan.output_ids) > r.base:
            r.base += 1
        if r.base >= len(r.plan.output_ids):
            r.state = _State.RUNNING  # briefly, so _finalize accounts it consistently
            self._add_running(r)
            self._finalize(r, r.plan.finish)
            return
        r.state = _State.RUNNING
        self._add_running(r)
        heapq.heappush(self._heap, (self._steps + len(r.plan.output_ids) - r.base, r.seq, r.stint, r))

    def _add_running(self, r: _Req) -> None:
        r.enter_step = self._steps
        self._running[r.req.rid] = r
        self._ctx0_sum += r.context
        self._enter_sum += r.enter_step

    def _remove_running(self, r: _Req) -> int:
        """Take r out of the running set; return its tokens emitted so far."""
        n = self._emitted(r)
        del self._running[r.req.rid]
        self._ctx0_sum -= r.context
        self._enter_sum -= r.enter_step
        return n

    def _retract(self, r: _Req) -> None:
        """Free r's KV; it waits at the queue front and re-prefills prompt + output so far (SGLang's retraction)."""
        r.base = self._remove_running(r)
        r.stint += 1
        r.retractions += 1
        self.stats.retractions += 1
        r.state = _State.WAITING
        self._waiting.appendleft(r)

    def _emitted(self, r: _Req) -> int:
        if r.state is _State.RUNNING:
            return r.base + self._steps - r.enter_step
        return r.base

    def _kv_running(self) -> int:
        return self._ctx0_sum + len(self._running) * self._steps - self._enter_sum

    def _finalize(self, r: _Req, finish: Finish) -> None:
        if r.state is _State.DONE:
            return
        if r.state is _State.RUNNING:
            r.emitted = self._remove_running(r)
        elif r.state is _State.PREFILL:
            self._prefill_ctx_sum -= r.context
            self._prefilling.remove(r)
            r.emitted = r.base
        else:
            with contextlib.suppress(ValueError):  # not queued: e.g. closed before it was ever admitted
                self._waiting.remove(r)
            r.emitted = r.base
        if finish.type != "abort":
            r.emitted = len(r.plan.output_ids)
        if r.ran:
            output = as_token_bytes(r.plan.output_ids[: r.emitted])
            self._cache.insert(self._cache.chain(output, r.prompt_chain))
            self.stats.cached_tokens += r.cached_tokens
        r.finish = finish
        r.state = _State.DONE
        self.stats.finished += 1
        if not r.done.done():
            r.done.set_result(None)

    def _snapshot(self, r: _Req) -> GenerateOutput:
        n = r.emitted
        assert r.finish is not None
        spans = [(v, start, end) for (v, start), end in
                 zip(r.spans, [s[1] for s in r.spans[1:]] + [n]) if min(end, n) > start]
        version = spans[-1][0] if spans else self._version
        logprobs = self._logprobs
        start = self._rng.randrange(len(logprobs))
        return GenerateOutput(
            rid=r.req.rid, output_ids=r.plan.output_ids[:n],
            text=self._text.render(r.plan, n, r.req.sampling, r.finish), prompt_tokens=len(r.req.input_ids),
            cached_tokens=r.cached_tokens, finish=r.finish,
            output_logprobs=_cycle(logprobs, start, n) if r.req.return_logprob else [],
            input_logprobs=([None, *_cycle(logprobs, start, len(r.req.input_ids) - r.req.logprob_start_len - 1)]
                            if r.req.return_logprob and r.req.logprob_start_len >= 0 else []),
            weight_spans=[(v, s, min(e, n)) for v, s, e in spans], weight_version=version,
            num_retractions=r.retractions, ran=r.ran)


def _cycle(values: list[float], start: int, n: int) -> list[float]:
    """n values of `values` read cyclically from `start`."""
    out = values[start:start + n]
    while len(out) < n:
        out += values[: n - len(out)]
    return out


def _crash_if_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the sim stepping loop crashed; the server cannot make progress", exc_info=task.exception())


def build_sim_backend(cfg: ServingConfig, profile_path: Path | None, time_scale: float | None = None) -> SimBackend:
    """The backend for `ssp model serve --sim`: the profile (default: 7B on one H100), the tokenizer of `cfg.model`
    (default: the prepared SmolLM2-135M-Instruct, whose path /model_info reports), and the time scale (default: the
    profile's `[sim] time_scale`)."""
    model_dir = cfg.model if cfg.model is not None else default_model_dir()
    if cfg.model is None and not (model_dir / "tokenizer.json").is_file():
        from ssp.serving.model_prep import prepare_default_model

        model_dir = prepare_default_model()
    profile = load_profile(profile_path)
    return SimBackend(profile, TokenizerFile(model_dir), tokenizer_path=str(model_dir), time_scale=time_scale,
                      served_model_name=cfg.served_model_name, weight_version=cfg.weight_version,
                      max_queued_requests=cfg.max_queued_requests)
