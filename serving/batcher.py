"""Continuous batching for the reference server: one thread that admits, prefills, decodes and finishes requests.

    HTTP front (asyncio) ──commands──► ContinuousBatcher thread ──snapshots──► each request's asyncio.Queue
                                        loop:  run queued commands (add / abort / pause / resume / weights ...)
                                               admit waiting requests (FIFO) while running < max_running_requests:
                                                   prefill them in one pass, sample each one's first token,
                                                   join the batch
                                               one decode step for the whole running batch
                                               sample per row (own temperature/top-k/top-p/seed), check stop rules,
                                               emit a snapshot per request, cut finished rows out of the batch

Every state change happens on this thread, between forward passes: commands from the event loop are closures
queued with `call()` and run at the top of the loop, so requests, weights and the KV cache never race.

Failures: every request that leaves the queue ends with a final snapshot, whatever happens. Work that belongs to one
request (its prefill, sampling its token, its logprobs, its stop rules) that raises finishes that request alone with
a 500 abort and the batch runs on (a batched prefill pass that raises is rerun one request at a time, so the failure
lands on the request that causes it); only a failed batch-wide decode pass finishes the whole running batch. A request
that never ended would hang its HTTP call, and with it the reader share every weight update waits for.

Why not transformers' ContinuousBatchingManager: it samples with one generation config for all requests, and
we need per-request temperature/top-p/top-k/seeds, SGLang's logprob definition (before truncation), prompt
logprobs, stop strings, retract-and-recompute on pause, and weight swaps between steps with per-token versions.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ssp.serving.backend import (
    ABORTED,
    ABORTED_QUEUED,
    BackendError,
    Finish,
    GenerateOutput,
    GenerateRequest,
    LoadStats,
)
from ssp.serving.model_runner import ModelRunner, Prefilled, Prompt
from ssp.serving.prefix_cache import PrefixCache
from ssp.serving.sampling import clamp_logprob, make_generator, sample, suppress, top_logprobs

log = logging.getLogger(__name__)
T = TypeVar("T")
Emit = Callable[[GenerateOutput], None]


@dataclass(eq=False)
class Seq:
    """One request inside the batcher."""

    req: GenerateRequest
    emit: Emit
    gen: torch.Generator
    stop_ids: frozenset[int]
    """Token ids that end it (EOS and stop_token_ids, none with ignore_eos), built once: the request's own list may
    be long, and it is consulted for every token."""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[list[tuple[float, int]]] = field(default_factory=list)
    output_ids_lp: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top: list[list[tuple[float, int]] | None] = field(default_factory=list)
    input_ids_lp: list[list[tuple[float, int]] | None] = field(default_factory=list)
    spans: list[list[Any]] = field(default_factory=list)
    """[version, start, end] per weight version that produced tokens."""
    text: str = ""
    cached_tokens: int = 0
    ran: bool = False
    num_retractions: int = 0
    finish: Finish | None = None

    @property
    def tokens(self) -> list[int]:
        return self.req.input_ids + self.output_ids


class ContinuousBatcher:
    """The batching loop and the request table; runs on its own thread (`start()`), driven through `call()`."""

    def __init__(self, runner: ModelRunner, *, max_running: int, max_queued: int, max_total_tokens: int,
                 context_length: int, weight_version: str, prefix_cache_tokens: int) -> None:
        self.runner = runner
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_total_tokens = max_total_tokens
        self.context_length = context_length
        self.version = weight_version
        self.eos_ids = runner.eos_ids()
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.waiting: collections.deque[Seq] = collections.deque()
        self.running: list[Seq] = []
        self.paused: str | None = None
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ssp-batcher", daemon=True)
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        # Snapshots are delivered after the loop's state is consistent: a client that sees its request finish and
        # calls /flush_cache must find it gone from `running`.
        self._outbox: list[tuple[Seq, GenerateOutput]] = []

    # ---- driving it from other threads -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.call(lambda: setattr(self, "_stop", True))
        self._thread.join(timeout=30)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the batcher thread between steps; the future carries its result or exception."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    # ---- the loop --------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            idle = self.paused is not None or (not self.running and not self.waiting)
            self._run_commands(block=idle)
            self._deliver()
            if self._stop or self.paused is not None:
                continue
            try:
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a batch-wide failure must finish requests, not hang them
                log.exception("batcher step failed; aborting the running batch")
                for seq in self.running:
                    self._finish(seq, _internal_error(e))
                self.running = []
                self.runner.clear()
            self._deliver()
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, ABORTED if seq.ran else ABORTED_QUEUED)
        self._deliver()

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, []
        for seq, out in outbox:
            seq.emit(out)

    def _run_commands(self, *, block: bool) -> None:
        try:
            fn, fut = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        while batch := self._next_batch():
            plans: list[tuple[Seq, Prompt, bool]] = []
            for seq in batch:
                try:
                    plans.append((seq, *self._plan(seq)))
                except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
                    self._fail(seq, e)
            prefilled: list[Prefilled] | None = None
            if len(plans) > 1:
                try:
                    prefilled = self.runner.prefill_batch([prompt for _, prompt, _ in plans])
                except Exception:  # noqa: BLE001 - rerun one by one below: the failure is then the request's own
                    log.warning("batched prefill of %d requests failed; prefilling them one by one", len(plans),
                                exc_info=True)
            for i, (seq, prompt, want_input) in enumerate(plans):
                try:
                    pre = prefilled[i] if prefilled is not None else self.runner.prefill(
                        prompt.ids, keep_logits=prompt.keep_logits, past=prompt.past)
                    self._start(seq, pre, want_input)
                except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
                    self._fail(seq, e)

    def _next_batch(self) -> list[Seq]:
        """Waiting requests (FIFO) that fit next to the running ones, to prefill together. A request that only warms
        the prefix cache (max_new_tokens 0: SGLang's n > 1 prompt) ends the batch, so the ones after it reuse its
        KV as they would if prefilled one by one. A request that wants prompt logprobs runs alone: the pass keeps
        as many logits per row as its longest ask, (rows x prompt x vocabulary) floats in a shared batch."""
        batch: list[Seq] = []
        used = sum(len(s.tokens) for s in self.running)
        while self.waiting and len(self.running) + len(batch) < self.max_running:
            seq = self.waiting[0]
            if (self.running or batch) and used + len(seq.tokens) > self.max_total_tokens:
                break  # KV budget full: wait for a running request to finish
            if batch and self._wants_input(seq):
                break
            batch.append(self.waiting.popleft())
            used += len(seq.tokens)
            if seq.req.sampling.max_new_tokens == 0 or self._wants_input(seq):
                break
        return batch

    @staticmethod
    def _wants_input(seq: Seq) -> bool:
        """Whether `seq`'s prefill must return prompt logprobs (only its first run: a retracted one already has)."""
        return not seq.ran and seq.req.return_logprob and seq.req.logprob_start_len >= 0

    def _plan(self, seq: Seq) -> tuple[Prompt, bool]:
        """What to prefill for `seq` (its prefix-cached KV, how many logits), and whether it wants prompt logprobs."""
        req = seq.req
        first_run, want_input = not seq.ran, self._wants_input(seq)
        seq.ran = True
        keep = len(seq.tokens) - req.logprob_start_len if want_input else 1
        # Prompt logprobs need logits at every prompt position, so such requests run their whole prompt.
        cached, past = (0, None) if want_input else self.prefix.lookup(seq.tokens)
        if first_run:
            seq.cached_tokens = cached
        return Prompt(list(seq.tokens), keep_logits=max(1, keep), past=past), want_input

    def _start(self, seq: Seq, pre: Prefilled, want_input: bool) -> None:
        """Sample the first token from the prefill's logits; join the batch, or finish (caching the prompt's KV)."""
        if want_input:
            self._input_logprobs(seq, pre.logits_NV)
        if seq.req.sampling.max_new_tokens == 0:
            self.prefix.insert(seq.tokens, self.runner.kv_of(pre))  # also SGLang's n > 1 prompt warm-up
            self._finish(seq, Finish("length", length=0))
            return
        covered = list(seq.tokens)
        self._accept(seq, pre.logits_NV[-1])
        if seq.finish is None:
            self.runner.add(pre)
            self.running.append(seq)
        else:
            self.prefix.insert(covered, self.runner.kv_of(pre))

    def _input_logprobs(self, seq: Seq, logits_NV: torch.Tensor) -> None:
        """Prompt positions start..L-1: the first is None (SGLang), position p uses the logits at p-1."""
        req, temp = seq.req, seq.req.sampling.temperature or 1.0
        logprobs_NV = torch.log_softmax(logits_NV / temp, dim=-1)
        ids = req.input_ids
        start = req.logprob_start_len
        seq.input_logprobs = [None]
        seq.input_top = [None]
        seq.input_ids_lp = [None]
        for i, p in enumerate(range(start + 1, len(ids))):
            row = logprobs_NV[i]
            seq.input_logprobs.append(clamp_logprob(float(row[ids[p]])))
            if req.top_logprobs_num:
                seq.input_top.append(top_logprobs(row, req.top_logprobs_num))
            if req.token_ids_logprob:
                seq.input_ids_lp.append([(float(row[t]), t) for t in req.token_ids_logprob])
        if start == len(ids):
            seq.input_logprobs, seq.input_top, seq.input_ids_lp = [], [], []

    def _step(self) -> None:
        logits_BV = self.runner.decode([s.tokens[-1] for s in self.running],
                                       [len(s.tokens) - 1 for s in self.running])
        keep: list[int] = []
        for row, seq in enumerate(self.running):
            try:
                self._accept(seq, logits_BV[row])
            except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
                self._fail(seq, e)
                continue  # out of the batch; its KV is not cached (its last token may be half recorded)
            if seq.finish is None:
                keep.append(row)
            else:  # its KV covers every token but the last sampled one
                self.prefix.insert(seq.tokens[:-1], self.runner.row_kv(row))
        if len(keep) != len(self.running):
            self.running = [self.running[i] for i in keep]
            self.runner.keep(keep)

    # ---- per-token work --------------------------------------------------------------------------------------------

    def _accept(self, seq: Seq, logits_V: torch.Tensor) -> None:
        """Sample one token for `seq`, record it, check the stop rules, emit a snapshot."""
        opts = seq.req.sampling
        stop_ids = seq.stop_ids
        if len(seq.output_ids) < opts.min_new_tokens and stop_ids:
            logits_V = suppress(logits_V, sorted(stop_ids))
        token, logprob, logprobs_V = sample(logits_V, opts, seq.gen)
        seq.output_ids.append(token)
        seq.output_logprobs.append(clamp_logprob(logprob))
        if seq.req.top_logprobs_num:
            seq.output_top.append(top_logprobs(logprobs_V, seq.req.top_logprobs_num))
        if seq.req.token_ids_logprob:
            seq.output_ids_lp.append([(float(logprobs_V[t]), t) for t in seq.req.token_ids_logprob])
        n = len(seq.output_ids)
        if seq.spans and seq.spans[-1][0] == self.version:
            seq.spans[-1][2] = n
        else:
            seq.spans.append([self.version, n - 1, n])
        self._recent.append((time.monotonic(), 1))

        decoded = self.runner.tokenizer.decode(
            seq.output_ids, skip_special_tokens=opts.skip_special_tokens,
            spaces_between_special_tokens=opts.spaces_between_special_tokens)
        if token in stop_ids and len(seq.output_ids) >= opts.min_new_tokens:
            seq.text = decoded if opts.no_stop_trim else self.runner.tokenizer.decode(
                seq.output_ids[:-1], skip_special_tokens=opts.skip_special_tokens,
                spaces_between_special_tokens=opts.spaces_between_special_tokens)
            self._finish(seq, Finish("stop", matched=token))
            return
        seq.text = decoded
        for s in opts.stop:
            at = decoded.find(s)
            if at >= 0 and len(seq.output_ids) >= opts.min_new_tokens:
                seq.text = decoded if opts.no_stop_trim else decoded[:at]
                self._finish(seq, Finish("stop", matched=s))
                return
        if n >= opts.max_new_tokens or len(seq.tokens) >= self.context_length:
            self._finish(seq, Finish("length", length=opts.max_new_tokens))
            return
        if any(decoded.endswith(s[:k]) for s in opts.stop for k in range(1, len(s))):
            return  # hold the chunk back: the tail may be the start of a stop string (SGLang does the same)
        self._outbox.append((seq, self._snapshot(seq)))

    def _finish(self, seq: Seq, finish: Finish) -> None:
        seq.finish = finish
        self._outbox.append((seq, self._snapshot(seq)))

    def _fail(self, seq: Seq, error: Exception) -> None:
        """Finish a request whose own work raised `error`, unless it had already ended before that."""
        log.error("request %s failed in the batcher; finishing it alone with a 500", seq.req.rid, exc_info=error)
        if seq.finish is None:
            self._finish(seq, _internal_error(error))

    def _snapshot(self, seq: Seq) -> GenerateOutput:
        return GenerateOutput(
            rid=seq.req.rid, output_ids=list(seq.output_ids), text=seq.text, prompt_tokens=len(seq.req.input_ids),
            cached_tokens=seq.cached_tokens, finish=seq.finish, output_logprobs=list(seq.output_logprobs),
            input_logprobs=seq.input_logprobs, output_top_logprobs=list(seq.output_top),
            input_top_logprobs=seq.input_top, output_token_ids_logprobs=list(seq.output_ids_lp),
            input_token_ids_logprobs=seq.input_ids_lp,
            weight_spans=[(v, s, e) for v, s, e in seq.spans],
            weight_version=seq.spans[-1][0] if seq.spans else self.version, num_retractions=seq.num_retractions,
            ran=seq.ran,
        )

    # ---- commands (run on the batcher thread via call()) ---------------------------------------------------------

    def add(self, req: GenerateRequest, emit: Emit) -> None:
        if len(self.waiting) >= self.max_queued:
            raise BackendError(503, "The request queue is full.")
        opts = req.sampling
        stop_ids = frozenset() if opts.ignore_eos else frozenset(self.eos_ids.union(opts.stop_token_ids))
        self.waiting.append(Seq(req=req, emit=emit, gen=make_generator(opts.sampling_seed), stop_ids=stop_ids))

    def abort(self, prefix: str, *, abort_all: bool) -> int:
        """Finish matching requests (running: ABORTED, queued: ABORTED_QUEUED); returns how many."""
        def hit(seq: Seq) -> bool:
            return abort_all or seq.req.rid.startswith(prefix)

        count = 0
        for seq in [s for s in self.waiting if hit(s)]:
            self.waiting.remove(seq)
            self._finish(seq, ABORTED if seq.ran else ABORTED_QUEUED)
            count += 1
        rows = [i for i, s in enumerate(self.running) if not hit(s)]
        if len(rows) != len(self.running):
            for seq in [s for s in self.running if hit(s)]:
                self._finish(seq, ABORTED)
                count += 1
            self.running = [self.running[i] for i in rows]
            self.runner.keep(rows)
        return count

    def abort_rid(self, rid: str) -> None:
        """Abort exactly one rid (the client went away)."""
        for seq in [*self.waiting, *self.running]:
            if seq.req.rid == rid and seq.finish is None:
                self._abort_one(seq)
                return

    def _abort_one(self, seq: Seq) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finish(seq, ABORTED if seq.ran else ABORTED_QUEUED)
        else:
            row = self.running.index(seq)
            self._finish(seq, ABORTED)
            keep = [i for i in range(len(self.running)) if i != row]
            self.running = [self.running[i] for i in keep]
            self.runner.keep(keep)

    def pause(self, mode: str) -> None:
        self.paused = mode
        if mode == "abort":
            self.abort("", abort_all=True)
        elif mode == "retract":
            for seq in reversed(self.running):
                seq.num_retractions += 1
                self.waiting.appendleft(seq)
            self.running = []
            self.runner.clear()

    def resume(self) -> None:
        self.paused = None

    def load(self) -> LoadStats:
        now = time.monotonic()
        recent = [n for t, n in self._recent if now - t < 10.0]
        window = max(1e-3, min(10.0, now - min((t for t, _ in self._recent), default=now)))
        return LoadStats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
            num_used_tokens=sum(len(s.tokens) for s in self.running), max_total_num_tokens=self.max_total_tokens,
            max_running_requests=self.max_running, gen_throughput=sum(recent) / window,
            num_retracted_reqs=sum(1 for s in self.waiting if s.ran),
            num_paused_reqs=len(self.running) if self.paused == "in_place" else 0,
        )


def _internal_error(error: Exception) -> Finish:
    """SGLang's scheduler-side 500 abort (the front answers it with a 500 ErrorResponse)."""
    return Finish("abort", message=f"Internal error: {error}", status_code=500, err_type="InternalServerError")
