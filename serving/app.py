"""The SGLang-compatible HTTP front (aiohttp): routes, request holding while paused, the writer lock, auth, SSE.

It speaks the subset of SGLang 0.5.23's native API an RL rollout uses over any `ssp.serving.backend.Backend`
(the transformers model backend, or the simulated one). Everything protocol-level lives here and in
`serving/protocol.py`; nothing here knows about models.

State the front keeps (one asyncio loop, so no locks beyond the two below):
- `live`: rid -> in-flight request. Duplicate rids are refused; /abort_request only acts on rids found here (as
  SGLang's tokenizer manager does), then the backend aborts by prefix.
- `gate`: an Event, clear while paused. New /generate calls wait on it before they are validated further.
- `lock`: a writer-preferring reader/writer lock. Every /generate holds a reader share for its whole life; a weight
  update takes the writer side (waiting for in-flight requests) unless the server is paused. So a call must never
  end while its samples still run (a failed sample cancels its siblings), and every sample must end (the backend
  finishes a sample that fails with an error instead of dropping it).
- `calls`: /generate calls in flight, bounded by `max_concurrent_requests` (503 with Retry-After beyond it).
- `session_open`: the begin/end_weight_update session (required around updates since SGLang 0.5.23).
- `update_groups`: the weight-update groups joined (by name), and when a weight-update call last came. /server_info
  lists their names (`weight_update_groups`, an ssp extension), so a new trainer can destroy every group a dead one
  left, whatever it was named.

A trainer that dies mid-push leaves the server paused, its session open and its group registered (an ssp extension
cleans this up; SGLang has none): a session with no weight-update call for `weight_update_idle_timeout_s` is ended,
every group destroyed and generation continued. A new trainer need not wait for that: the plain SGLang sequence
end_weight_update -> destroy_weights_update_group -> continue_generation, which `ssp.learner.push.WeightPusher` sends
before it joins, resets the same state (each step tolerates finding nothing to undo).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from aiohttp import web

from ssp.serving.backend import (
    Backend,
    BackendError,
    GenerateOutput,
    GenerateRequest,
    PauseMode,
    SamplingOptions,
    UpdateResult,
)
from ssp.serving.config import ServingConfig
from ssp.serving.protocol import (
    ApiError,
    GenerateCall,
    dumps,
    error_response,
    format_output,
    parse_generate,
    parse_json,
)

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
"""The SGLang release whose protocol this front reproduces (reported as `version`)."""
HEALTH_TIMEOUT_S = 20.0
FLUSH_OK = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
            "requests, the operation will not be performed.)\n")
PUBLIC_PATHS = frozenset({"/health", "/health_generate", "/ready"})
ADMIN_PATHS = frozenset({
    "/abort_request", "/pause_generation", "/continue_generation", "/flush_cache", "/begin_weight_update",
    "/end_weight_update", "/init_weights_update_group", "/update_weights_from_distributed",
    "/destroy_weights_update_group", "/update_weights_from_tensor", "/update_weights_from_disk",
    "/update_weight_version", "/get_weights_by_name",
})
LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
RETRY_AFTER_S = 1
"""Retry-After of a 503 (queue full, too many calls): overload clears as running requests finish."""
T = TypeVar("T")


class RWLock:
    """Writer-preferring reader/writer lock: once a writer waits, new readers wait too (SGLang's update lock)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class _Field:
    """One key of a control endpoint's body struct: its JSON type(s) and default (REQUIRED if none)."""

    types: tuple[type, ...]
    default: Any = ...


def _struct(body: Any, spec: dict[str, _Field]) -> dict[str, Any]:
    """Parse a control body like SGLang's dataclass structs: unknown keys ignored, missing required keys and wrong
    types are 400 ErrorResponse."""
    if not isinstance(body, dict):
        raise ApiError("request", "body: Input should be a JSON object")
    out: dict[str, Any] = {}
    for key, f in spec.items():
        if key not in body or (body[key] is None and type(None) in f.types):
            if f.default is ...:
                raise ApiError("request", f"body.{key}: Field required")
            out[key] = f.default
            continue
        v = body[key]
        ok = isinstance(v, f.types) and not (isinstance(v, bool) and bool not in f.types)
        if not ok and float in f.types and isinstance(v, int) and not isinstance(v, bool):
            ok, v = True, float(v)
        if not ok:
            names = " or ".join(t.__name__ for t in f.types)
            raise ApiError("request", f"body.{key}: Input should be {names}, got {v!r}")
        out[key] = v
    return out


NONE = type(None)


class Front:
    """Route handlers and the protocol state shared by them (see the module docstring)."""

    def __init__(self, backend: Backend, cfg: ServingConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self.live: dict[str, GenerateRequest] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.pause_mode: PauseMode | None = None
        self.lock = RWLock()
        self.session_open = False
        self.started = False
        self.last_output_s = 0.0
        self.flush_in_progress = False
        self.startup_time = time.time()
        self.live_changed = asyncio.Condition()
        self.calls = 0
        self.update_groups: set[str] = set()
        self.updates_running = 0
        """init_weights_update_group / update_weights_* calls now running (a running one is never abandoned)."""
        self.last_update_call_s = time.monotonic()
        self._expiry: asyncio.Task[None] | None = None

    # ---- app wiring ------------------------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        r = web.route
        return [
            r("POST", "/generate", self.generate), r("PUT", "/generate", self.generate),
            r("POST", "/abort_request", self.abort_request),
            r("POST", "/pause_generation", self.pause_generation),
            r("POST", "/continue_generation", self.continue_generation),
            r("GET", "/flush_cache", self.flush_cache), r("POST", "/flush_cache", self.flush_cache),
            r("GET", "/health", self.health), r("GET", "/health_generate", self.health),
            r("GET", "/ready", self.ready),
            r("GET", "/model_info", self.model_info), r("GET", "/get_model_info", self.model_info),
            r("GET", "/server_info", self.server_info), r("GET", "/get_server_info", self.server_info),
            r("GET", "/v1/models", self.v1_models),
            r("GET", "/v1/loads", self.v1_loads), r("GET", "/get_load", self.get_load),
            r("POST", "/begin_weight_update", self.begin_weight_update),
            r("POST", "/end_weight_update", self.end_weight_update),
            r("POST", "/init_weights_update_group", self.init_weights_update_group),
            r("POST", "/update_weights_from_distributed", self.update_weights_from_distributed),
            r("POST", "/destroy_weights_update_group", self.destroy_weights_update_group),
            r("POST", "/update_weights_from_tensor", self.update_weights_from_tensor),
            r("POST", "/update_weights_from_disk", self.update_weights_from_disk),
            r("POST", "/update_weight_version", self.update_weight_version),
            r("GET", "/get_weights_by_name", self.get_weights_by_name),
            r("POST", "/get_weights_by_name", self.get_weights_by_name),
        ]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        """Auth (API keys), and ApiError / an over-long body -> SGLang error shapes."""
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        try:
            return await handler(request)
        except ApiError as e:
            return json_response(e.body(), status=e.status)
        except web.HTTPRequestEntityTooLarge:
            size = f" ({request.content_length} bytes)" if request.content_length else ""
            return error_reply(f"The request body{size} is larger than {self.cfg.max_body_bytes} bytes, the most this "
                               "server reads (serving.max_body_bytes); split the batch into smaller calls or raise the "
                               "cap.", 413)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if request.path in PUBLIC_PATHS or request.path.startswith(("/health", "/ready", "/metrics")):
            return None
        key = self.cfg.admin_api_key if (request.path in ADMIN_PATHS and self.cfg.admin_api_key) else self.cfg.api_key
        if key is None:
            return None
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            return None  # constant-time: a timing difference would let a caller guess the key byte by byte
        return error_reply("Unauthorized: send `Authorization: Bearer <api key>`", 401)

    async def on_startup(self, _app: web.Application) -> None:
        await self.backend.start()
        self.started = True
        if self.cfg.weight_update_idle_timeout_s > 0:
            self._expiry = asyncio.create_task(self._expire_abandoned_sessions(), name="weight-update-expiry")

    async def on_cleanup(self, _app: web.Application) -> None:
        self.started = False
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.backend.close()

    # ---- /generate -------------------------------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Count the call against max_concurrent_requests before reading its body (which is what the cap bounds)."""
        if self.calls >= self.cfg.max_concurrent_requests:
            return error_reply(f"Too many concurrent requests: {self.calls} /generate calls are in flight, the most "
                               f"this server takes (serving.max_concurrent_requests); retry later.", 503)
        self.calls += 1
        try:
            return await self._generate(request)
        finally:
            self.calls -= 1

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(await request.read())
        stream = isinstance(body, dict) and body.get("stream") is True
        # Held while paused, before validation (SGLang holds before tokenization).
        await self.gate.wait()
        try:
            call = parse_generate(body, desc=self.backend.describe(), cfg=self.cfg, encode=self.backend.encode)
            for item in call.items:
                if item.rid in self.live:
                    raise ApiError("invalid", f"Duplicate request ID detected: {item.rid}")
        except ApiError as e:
            if stream and e.kind == "invalid":
                return await self._sse_error(request, e)
            raise
        async with self.lock.reader():
            for item in call.items:
                self.live[item.rid] = item
            try:
                if call.stream:
                    return await self._generate_stream(request, call)
                return await self._generate_once(call)
            finally:
                for item in call.items:
                    self.live.pop(item.rid, None)
                async with self.live_changed:
                    self.live_changed.notify_all()

    async def _run_item(self, item: GenerateRequest, on_output: Callable[[GenerateOutput], None]) -> GenerateOutput:
        last: GenerateOutput | None = None
        async for out in self.backend.generate(item):
            self.last_output_s = time.monotonic()
            last = out
            on_output(out)
            if out.finish is not None:
                break
        if last is None or last.finish is None:
            raise RuntimeError(f"backend ended request {item.rid} without a final output")
        return last

    def _format(self, call: GenerateCall, item: GenerateRequest, out: GenerateOutput, t0: float) -> dict[str, Any]:
        decode = self.backend.decode
        token_text = (lambda t: decode([t], skip_special_tokens=False)) if call.return_text_in_logprobs else None
        return format_output(item, out, e2e_latency_s=time.monotonic() - t0, token_text=token_text,
                             return_prompt_token_ids=call.return_prompt_token_ids)

    async def _generate_once(self, call: GenerateCall) -> web.Response:
        t0 = time.monotonic()
        try:
            outs = await _all_or_none([self._run_item(item, lambda _o: None) for item in call.items])
        except BackendError as e:
            return error_reply(e.message, e.status)
        for out in outs:
            f = out.finish
            if f is not None and f.status_code is not None and 400 <= f.status_code < 600:
                # As SGLang answers a scheduler-side abort: 400 as a value error, 5xx as an ErrorResponse.
                if f.status_code < 500:
                    return json_response({"error": {"message": f.message}}, status=f.status_code)
                return error_reply(f.message or "Internal error", f.status_code)
        results = [self._format(call, item, out, t0) for item, out in zip(call.items, outs)]
        return json_response(results if call.batched else results[0])

    async def _generate_stream(self, request: web.Request, call: GenerateCall) -> web.StreamResponse:
        t0 = time.monotonic()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chunks: asyncio.Queue[tuple[int, GenerateOutput] | BaseException | None] = asyncio.Queue()

        def forward(index: int) -> Callable[[GenerateOutput], None]:
            sent = 0

            def on_output(out: GenerateOutput) -> None:
                nonlocal sent
                n = len(out.output_ids)
                # First token at once, then every stream_interval tokens, and always the final chunk.
                if out.finish is not None or (n > sent and (sent == 0 or n - sent >= call.stream_intervals[index])):
                    sent = n
                    chunks.put_nowait((index, out))
            return on_output

        async def run_all() -> None:
            try:
                await _all_or_none([self._run_item(item, forward(i)) for i, item in enumerate(call.items)])
                chunks.put_nowait(None)
            except BaseException as e:  # noqa: BLE001 - re-raised on the writer side
                chunks.put_nowait(e)
                raise

        runner = asyncio.create_task(run_all(), name="generate-stream")
        try:
            while (chunk := await chunks.get()) is not None:
                if isinstance(chunk, BackendError):
                    await resp.write(sse({"error": {"message": chunk.message, "code": chunk.status}}))
                    break
                if isinstance(chunk, BaseException):
                    raise chunk
                index, out = chunk
                payload = self._format(call, call.items[index], out, t0)
                if call.batched:
                    payload["index"] = index
                await resp.write(sse(payload))
            await resp.write(b"data: [DONE]\n\n")
        finally:
            # A closed connection (write error, handler cancelled) lands here: abort what is still running.
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
        return resp

    async def _sse_error(self, request: web.Request, e: ApiError) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(e.sse_body()))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    # ---- abort, pause, flush ---------------------------------------------------------------------------------------

    async def abort_request(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {"rid": _Field((str,), ""), "abort_all": _Field((bool,),
                                                                                                         False)})
        if args["abort_all"]:
            await self.backend.abort("", abort_all=True)
        elif args["rid"] and args["rid"] in self.live:
            await self.backend.abort(args["rid"])
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {"mode": _Field((str,), "abort")})
        mode = args["mode"]
        if mode not in ("abort", "retract", "in_place"):
            raise ApiError("request", f"body.mode: Input should be 'abort', 'retract' or 'in_place', got {mode!r}")
        self.gate.clear()
        self.pause_mode = mode
        await self.backend.pause(mode)
        if mode == "abort":
            # Abort repeatedly until every in-flight call has returned (a call may reach the backend just after).
            while self.live:
                await self.backend.abort("", abort_all=True)
                async with self.live_changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.live_changed.wait(), timeout=0.05)
        return json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        _struct(parse_json(await request.read(), required=False), {"torch_empty_cache": _Field((bool,), True)})
        if self.pause_mode is not None:
            await self.backend.resume()
        self.pause_mode = None
        self.gate.set()
        return json_response({"message": "Generation continued successfully.", "status": "ok"})

    def _idle(self) -> bool:
        return self.backend.is_idle(ignore_queued=self.pause_mode == "retract")

    async def flush_cache(self, request: web.Request) -> web.Response:
        try:
            timeout_s = float(request.query.get("timeout", "0"))
        except ValueError:
            raise ApiError("request", f"query.timeout: Input should be a number of seconds, got "
                                      f"{request.query['timeout']!r}") from None
        if self.flush_in_progress:
            return web.Response(status=400, text="Another flush_cache is already in progress.")
        if not self._idle():
            if timeout_s <= 0:
                return web.Response(status=400, text="Flush cache failed.\n")
            self.flush_in_progress = True
            try:
                deadline = time.monotonic() + timeout_s
                while not self._idle():
                    if time.monotonic() >= deadline:
                        return web.Response(status=400, text="Timed out waiting for idle state.")
                    await asyncio.sleep(0.02)
            finally:
                self.flush_in_progress = False
        await self.backend.flush_cache()
        return web.Response(status=200, text=FLUSH_OK)

    # ---- health and info -------------------------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        """A 1-token greedy probe through the normal path; any output after the check began counts (SGLang)."""
        if not self.started:
            return web.Response(status=503)
        began = time.monotonic()
        probe = GenerateRequest(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0],
                                sampling=SamplingOptions(max_new_tokens=1, temperature=0.0))

        async def run_probe() -> None:
            await self.gate.wait()
            async with self.lock.reader():
                await self._run_item(probe, lambda _o: None)

        task = asyncio.create_task(run_probe(), name="health-probe")
        try:
            while time.monotonic() - began < HEALTH_TIMEOUT_S:
                if task.done() and task.exception() is not None:
                    return web.Response(status=503)
                if self.last_output_s > began:
                    return web.Response(status=200)
                await asyncio.sleep(0.05)
            return web.Response(status=503)
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def ready(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.started and self.pause_mode is None else 503)

    async def model_info(self, _request: web.Request) -> web.Response:
        d = self.backend.describe()
        return json_response({
            "model_path": d.model_path, "served_model_name": d.served_model_name, "tokenizer_path": d.tokenizer_path,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": self.backend.weight_version,
            "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null",
            "has_image_understanding": False, "has_audio_understanding": False, "model_type": d.model_type,
            "architectures": list(d.architectures),
        })

    async def server_info(self, request: web.Request) -> web.Response:
        d = self.backend.describe()
        host, port = _bound_address(request)
        return json_response({
            "model_path": d.model_path, "served_model_name": d.served_model_name, "tokenizer_path": d.tokenizer_path,
            "tp_size": 1, "dp_size": 1, "context_length": d.context_length, "max_context_length": d.context_length,
            "max_running_requests": d.max_running_requests, "max_total_num_tokens": d.max_total_num_tokens,
            "max_req_input_len": d.max_req_input_len, "max_queued_requests": self.cfg.max_queued_requests,
            "weight_version": self.cfg.weight_version, "device": d.device, "dtype": d.dtype, "host": host,
            "port": port, "api_key": None, "incremental_streaming_output": False, "disaggregation_mode": "null",
            "startup_time": self.startup_time, "internal_states": [self._load_entry()], "version": SGLANG_VERSION,
            "frontend": "ssp-reference", "weight_update_groups": sorted(self.update_groups),
        })

    async def v1_models(self, _request: web.Request) -> web.Response:
        d = self.backend.describe()
        return json_response({"object": "list", "data": [{
            "id": d.served_model_name, "object": "model", "created": int(self.startup_time), "owned_by": "sglang",
            "root": d.served_model_name, "max_model_len": d.context_length,
        }]})

    def _load_entry(self) -> dict[str, Any]:
        s = self.backend.load()
        return {
            "timestamp": time.monotonic(), "dp_rank": 0, "num_running_reqs": s.num_running_reqs,
            "num_waiting_reqs": s.num_waiting_reqs, "num_used_tokens": s.num_used_tokens,
            "max_total_num_tokens": s.max_total_num_tokens, "max_running_requests": s.max_running_requests,
            "token_usage": s.num_used_tokens / max(1, s.max_total_num_tokens), "gen_throughput": s.gen_throughput,
            "queues": {"waiting": s.num_waiting_reqs, "grammar": 0, "paused": s.num_paused_reqs,
                       "retracted": s.num_retracted_reqs, "prealloc_ready": 0},
            **({} if s.sim_behind_s is None else {"sim_behind_s": s.sim_behind_s}),
            **({} if s.sim_clock is None else {"sim_clock": s.sim_clock}),
        }

    async def v1_loads(self, request: web.Request) -> web.Response:
        include = request.query.get("include", "all")
        bad = [s for s in include.split(",") if s.strip() not in LOAD_SECTIONS]
        if bad:
            raise ApiError("request", f"query.include: unknown section(s) {bad}; use a comma list of "
                                      f"{sorted(LOAD_SECTIONS)}")
        entry = self._load_entry()
        if request.query.get("format") == "prometheus":
            lines = [f'sglang:{k}{{dp_rank="0"}} {v}' for k, v in entry.items() if isinstance(v, (int, float))
                     and k not in ("dp_rank", "timestamp")]
            return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
        d = self.backend.describe()
        return json_response({"timestamp": datetime.now(timezone.utc).isoformat(), "version": SGLANG_VERSION,
                              "accelerator": d.device, "num_accelerators": 1, "loads": [entry]})

    async def get_load(self, _request: web.Request) -> web.Response:
        """Legacy route that sglang-router 0.3.2 still polls."""
        s = self.backend.load()
        return json_response([{"dp_rank": 0, "num_reqs": s.num_running_reqs + s.num_waiting_reqs,
                               "num_waiting_reqs": s.num_waiting_reqs, "num_tokens": s.num_used_tokens,
                               "num_pending_tokens": 0, "ts_tic": time.time()}])

    # ---- weight updates --------------------------------------------------------------------------------------------

    async def _counted(self, work: Awaitable[T]) -> T:
        """Run a weight-update call's backend work, marking it as running (and the session as alive) meanwhile.
        Callers shield it: the work goes on if the caller's connection drops, and so does the mark."""
        self.updates_running += 1
        self.last_update_call_s = time.monotonic()
        try:
            return await work
        finally:
            self.updates_running -= 1
            self.last_update_call_s = time.monotonic()

    async def _expire_abandoned_sessions(self) -> None:
        """Clean up after a trainer that died mid-push (see the module docstring); runs for the server's life."""
        timeout_s = self.cfg.weight_update_idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            idle_s = time.monotonic() - self.last_update_call_s
            if self.session_open and self.updates_running == 0 and idle_s > timeout_s:
                log.warning("weight-update session idle for %.1f s (serving.weight_update_idle_timeout_s = %g): its "
                            "trainer is taken for dead; ending it, destroying groups %s, continuing generation",
                            idle_s, timeout_s, sorted(self.update_groups))
                self.session_open = False
                for name in sorted(self.update_groups):
                    result = await self.backend.destroy_weights_update_group(group_name=name)
                    if not result.success:
                        log.warning("destroying abandoned group %r: %s", name, result.message)
                self.update_groups.clear()
                if self.pause_mode is not None:
                    await self.backend.resume()
                    self.pause_mode = None
                    self.gate.set()

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        if self.cfg.old_server:
            raise web.HTTPNotFound()
        args = _struct(parse_json(await request.read()), {"selector": _Field((str,), "all")})
        if args["selector"] not in ("all", "target", "draft"):
            raise ApiError("request", f"body.selector: Input should be 'all', 'target' or 'draft', got "
                                      f"{args['selector']!r}")
        if self.session_open:
            return json_response({"success": False, "message": "a weight-update session is already open; call "
                                  "end_weight_update() first"}, status=400)
        self.session_open = True
        self.last_update_call_s = time.monotonic()
        return json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        if self.cfg.old_server:
            raise web.HTTPNotFound()
        _struct(parse_json(await request.read()), {})
        if not self.session_open:
            return json_response({"success": False, "message": "no weight-update session is open; call "
                                  "begin_weight_update() first"}, status=400)
        self.session_open = False
        return json_response({"success": True, "message": "Success"})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {
            "master_address": _Field((str,)), "master_port": _Field((int,)), "rank_offset": _Field((int,)),
            "world_size": _Field((int,)), "group_name": _Field((str,), "weight_update_group"),
            "backend": _Field((str,), "nccl"),
        })

        async def join() -> UpdateResult:
            result = await self.backend.init_weights_update_group(**args)
            if result.success:
                self.update_groups.add(args["group_name"])
            return result

        result = await asyncio.shield(self._counted(join()))
        return json_response({"success": result.success, "message": result.message},
                             status=200 if result.success else 400)

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {"group_name": _Field((str,), "weight_update_group")})
        result = await self.backend.destroy_weights_update_group(**args)
        self.update_groups.discard(args["group_name"])
        return json_response({"success": result.success, "message": result.message},
                             status=200 if result.success else 400)

    async def _update(self, route: str, args: dict[str, Any], needs_session: bool,
                      load: Callable[[], Awaitable[Any]], extra: dict[str, Any] | None = None) -> web.Response:
        """The common part of every weight-loading route: session rule, abort_all, writer lock unless paused,
        version label, cache flush (as SGLang)."""
        if needs_session and not self.session_open and not self.cfg.old_server:
            return json_response({"success": False, "message": f"{route} must run between begin_weight_update() "
                                  "and end_weight_update()"}, status=400)
        if args.get("abort_all_requests"):
            await self.backend.abort("", abort_all=True)

        async def run() -> tuple[bool, str]:
            result = await load()
            success, message = result.success, result.message
            version = args.get("weight_version")
            if success and version is not None:
                self.backend.set_weight_version(version)
                message += f" Weight version updated to {version}."
            if success and args.get("flush_cache", True):
                if self._idle():
                    await self.backend.flush_cache()
                else:
                    success = False
                    message = ("Weights were updated, but the cache was not flushed because requests are still "
                               "running or queued. Retract or finish them, then call /flush_cache.")
            return success, message

        if self.pause_mode is not None:
            success, message = await asyncio.shield(self._counted(run()))
        else:
            async with self.lock.writer():
                success, message = await asyncio.shield(self._counted(run()))
        return json_response({"success": success, "message": message, **(extra or {})},
                             status=200 if success else 400)

    _UPDATE_COMMON = {
        "flush_cache": _Field((bool,), True), "abort_all_requests": _Field((bool,), False),
        "weight_version": _Field((str, NONE), None), "selector": _Field((str,), "all"),
        "torch_empty_cache": _Field((bool,), False),
    }

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {
            "names": _Field((list,)), "dtypes": _Field((list,)), "shapes": _Field((list,)),
            "group_name": _Field((str,), "weight_update_group"), "load_format": _Field((str, NONE), None),
            **self._UPDATE_COMMON,
        })
        if not (len(args["names"]) == len(args["dtypes"]) == len(args["shapes"])):
            raise ApiError("request", f"names, dtypes and shapes must have the same length, got "
                                      f"{len(args['names'])}, {len(args['dtypes'])}, {len(args['shapes'])}")
        return await self._update("update_weights_from_distributed", args, True, lambda: (
            self.backend.update_weights_from_distributed(
                names=args["names"], dtypes=args["dtypes"], shapes=args["shapes"], group_name=args["group_name"],
                load_format=args["load_format"])))

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {
            "serialized_named_tensors": _Field((list,)), "load_format": _Field((str, NONE), None),
            **self._UPDATE_COMMON,
        })
        return await self._update("update_weights_from_tensor", args, True, lambda: (
            self.backend.update_weights_from_tensor(serialized_named_tensors=args["serialized_named_tensors"],
                                                    load_format=args["load_format"])))

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {
            "model_path": _Field((str,)), "load_format": _Field((str, NONE), None), "keep_pause": _Field((bool,),
                                                                                                      False),
            **self._UPDATE_COMMON,
        })
        return await self._update("update_weights_from_disk", args, False, lambda: (
            self.backend.update_weights_from_disk(model_path=args["model_path"], load_format=args["load_format"])),
            extra={"num_paused_requests": 0})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        args = _struct(parse_json(await request.read()), {"new_version": _Field((str,)),
                                                          "abort_all_requests": _Field((bool,), True)})
        if args["abort_all_requests"]:
            await self.backend.abort("", abort_all=True)
        self.backend.set_weight_version(args["new_version"])
        return json_response({"success": True, "message": f"Weight version updated to {args['new_version']}",
                              "new_version": args["new_version"]})

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = parse_json(raw) if raw.strip() else dict(request.query)
        if "truncate_size" in body and isinstance(body["truncate_size"], str) and body["truncate_size"].isdigit():
            body["truncate_size"] = int(body["truncate_size"])
        args = _struct(body, {"name": _Field((str,)), "truncate_size": _Field((int,), 100)})
        rows = await self.backend.get_weights_by_name(args["name"], args["truncate_size"])
        if rows is None:
            return json_response({"error": {"message": "Get parameter by name failed"}}, status=400)
        return json_response(rows)


# ---- helpers -------------------------------------------------------------------------------------------------------


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


def error_reply(message: str, status: int) -> web.Response:
    """SGLang's ErrorResponse; a 503 (overload) also carries Retry-After, and clients retry it (engine/client.py)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.Response(body=dumps(error_response(message, status)), status=status, content_type="application/json",
                        headers=headers)


async def _all_or_none(coros: list[Awaitable[T]]) -> list[T]:
    """Await every sample of a call. If one fails, cancel the others (their backends abort them) and wait for that
    before re-raising: the call is about to release its reader share, and nothing of it may run on without one."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _bound_address(request: web.Request) -> tuple[str, int]:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return (sock[0], sock[1]) if sock else ("", 0)


FRONT = web.AppKey("front", Front)
"""The app's Front (its protocol state), for in-process callers."""


def create_app(backend: Backend, cfg: ServingConfig) -> web.Application:
    """The aiohttp application for `backend`. The backend is started on app start-up and closed on clean-up."""
    front = Front(backend, cfg)
    app = web.Application(middlewares=[front.middleware], client_max_size=cfg.max_body_bytes)
    app.add_routes(front.routes())
    app.on_startup.append(front.on_startup)
    app.on_cleanup.append(front.on_cleanup)
    app[FRONT] = front
    return app


async def run_app(app: web.Application, host: str, port: int, *, on_bound: Callable[[str], None],
                  log_requests: bool = False) -> None:
    """Serve until cancelled. `on_bound(url)` is called once the port is open (port 0 = pick a free one).
    `log_requests`: one access-log line per HTTP request (ServingConfig.log_requests)."""
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=75.0,
                           access_log=logging.getLogger("aiohttp.access") if log_requests else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound_port = runner.addresses[0][1]
        on_bound(f"http://{host}:{bound_port}")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

