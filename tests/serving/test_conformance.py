"""Conformance of a server with SGLang's native API subset (the routes an RL rollout uses, and their invariants).

Every test takes `url`, parameterised over two targets: "reference" (the session's `ref_server`, ssp's CPU server)
and "sglang" (a real SGLang server at $SSP_SGLANG_URL, skipped when unset). Run the suite against a real server with

    SSP_SGLANG_URL=http://gpu-host:30000 python -m pytest -q tests/serving/test_conformance.py -k sglang

Tests here assert only what SGLang itself does, so both targets must pass. Generation lengths stay tiny (CPU), and
"long" requests are ended by the abort/pause under test. Tests that need the reference server's internals
(retraction counts, /get_load, weights from disk) skip the sglang target.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
"""A chat-formatted question ("What is the capital of France?") for SmolLM2; arbitrary but valid ids elsewhere."""
LONG = 1500
"""max_new_tokens of requests that must still be running when the test aborts or pauses them."""
GREEDY = {"temperature": 0, "max_new_tokens": 4}


@pytest.fixture(params=["reference", "sglang"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "sglang":
        target = os.environ.get("SSP_SGLANG_URL")
        if not target:
            pytest.skip("set SSP_SGLANG_URL=http://host:port to run the conformance suite against a real SGLang")
        return target.rstrip("/")
    return str(request.getfixturevalue("ref_server"))


@pytest.fixture
def is_reference(url: str) -> bool:
    return url != os.environ.get("SSP_SGLANG_URL", "").rstrip("/")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session


async def call(http: aiohttp.ClientSession, url: str, path: str, body: Any = None, *, raw: bytes | None = None,
               method: str = "POST") -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with http.request(method, url + path, data=data, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except json.JSONDecodeError:
            return r.status, text


async def generate(http: aiohttp.ClientSession, url: str, **body: Any) -> Any:
    status, out = await call(http, url, "/generate", body)
    assert status == 200, out
    return out


async def stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> AsyncIterator[Any]:
    """Yield each SSE event's JSON (the final "[DONE]" as the string)."""
    async with http.post(url + "/generate", json={**body, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            text = line.decode().strip()
            if text.startswith("data: "):
                payload = text[len("data: "):]
                yield payload if payload == "[DONE]" else json.loads(payload)


async def wait_running(http: aiohttp.ClientSession, url: str, n: int = 1, timeout_s: float = 60.0) -> None:
    """Wait until the server reports at least n running requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        _, loads = await call(http, url, "/v1/loads", method="GET")
        if loads["loads"][0]["num_running_reqs"] >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} requests running after {timeout_s} s")


async def wait_idle(http: aiohttp.ClientSession, url: str, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        _, loads = await call(http, url, "/v1/loads", method="GET")
        if loads["loads"][0]["num_running_reqs"] == 0 and loads["loads"][0]["num_waiting_reqs"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"server not idle after {timeout_s} s")


def check_finished(out: dict[str, Any], *, logprobs: bool) -> None:
    """The invariants every finished response satisfies."""
    meta = out["meta_info"]
    n = len(out["output_ids"])
    assert meta["completion_tokens"] == n
    if logprobs:
        assert len(meta["output_token_logprobs"]) == n == meta["output_token_logprobs_length"]
        assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    spans = meta["weight_versions"]
    if n:
        assert spans[0]["start"] == 0 and spans[-1]["end"] == n
        assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:]))
        assert spans[-1]["version"] == meta["weight_version"]
    finish = meta["finish_reason"]
    if finish["type"] == "stop" and isinstance(finish["matched"], int):
        assert out["output_ids"][-1] == finish["matched"]
    if finish["type"] == "length":
        assert n == finish["length"]


async def assert_alive(http: aiohttp.ClientSession, url: str) -> None:
    out = await generate(http, url, input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 1})
    assert len(out["output_ids"]) == 1


# ---- /generate ---------------------------------------------------------------------------------------------------


async def test_single_greedy_invariants_and_argmax(http: aiohttp.ClientSession, url: str) -> None:
    body = {"input_ids": PROMPT, "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2}
    a = await generate(http, url, rid="conf-greedy-0001", **body)
    b = await generate(http, url, **body)
    check_finished(a, logprobs=True)
    assert a["meta_info"]["id"] == "conf-greedy-0001"
    assert a["meta_info"]["prompt_tokens"] == len(PROMPT)
    assert a["output_ids"] == b["output_ids"], "greedy decoding must be deterministic"
    for tok, entry, top in zip(a["output_ids"], a["meta_info"]["output_token_logprobs"],
                               a["meta_info"]["output_top_logprobs"]):
        assert top[0][1] == tok, "a greedy token must be the arg-max"
        assert top[0][0] == pytest.approx(entry[0], abs=1e-5)
        assert entry[0] <= 0.0 and entry[2] is None
    assert a["meta_info"]["input_token_logprobs"] == []


async def test_text_input_and_logprob_start_len(http: aiohttp.ClientSession, url: str) -> None:
    out = await generate(http, url, text="The capital of France is", sampling_params=GREEDY, return_logprob=True,
                         logprob_start_len=0, return_prompt_token_ids=True, return_text_in_logprobs=True)
    check_finished(out, logprobs=True)
    prompt = out["prompt_token_ids"]
    entries = out["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt
    assert entries[0][0] is None and all(e[0] is not None and e[0] <= 0 for e in entries[1:])
    assert all(isinstance(e[2], str) for e in out["meta_info"]["output_token_logprobs"])
    later = await generate(http, url, input_ids=prompt, sampling_params=GREEDY, return_logprob=True,
                           logprob_start_len=len(prompt) - 2)
    tail = later["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in tail] == prompt[-2:] and tail[0][0] is None
    assert tail[1][0] == pytest.approx(entries[-1][0], abs=1e-4)


async def test_batch_rids_and_order(http: aiohttp.ClientSession, url: str) -> None:
    prompts = [PROMPT, PROMPT[:5]]
    outs = await generate(http, url, input_ids=prompts, rid="conf-batch", sampling_params=GREEDY)
    assert [o["meta_info"]["id"] for o in outs] == ["conf-batch_0", "conf-batch_1"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [len(PROMPT), 5]
    outs = await generate(http, url, input_ids=prompts, rid=["conf-b-x", "conf-b-y"],
                          sampling_params=[GREEDY, {**GREEDY, "max_new_tokens": 2}])
    assert [o["meta_info"]["id"] for o in outs] == ["conf-b-x", "conf-b-y"]
    assert len(outs[1]["output_ids"]) <= 2
    status, err = await call(http, url, "/generate", {"input_ids": prompts, "rid": ["only-one"]})
    assert status == 400 and "rids length mismatch" in err["error"]["message"]


async def test_n_samples_prompt_major_with_fresh_ids(http: aiohttp.ClientSession, url: str) -> None:
    outs = await generate(http, url, input_ids=[PROMPT, PROMPT[:5]], rid="conf-n",
                          sampling_params={"n": 2, "temperature": 1.0, "max_new_tokens": 2})
    assert len(outs) == 4
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [len(PROMPT), len(PROMPT), 5, 5]
    ids = [o["meta_info"]["id"] for o in outs]
    assert len(set(ids)) == 4 and not any(i.startswith("conf-n") for i in ids)
    for o in outs:
        check_finished(o, logprobs=False)


async def test_stop_token_ids_stop_strings_and_trim(http: aiohttp.ClientSession, url: str) -> None:
    base = await generate(http, url, input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 6},
                          return_logprob=True)
    ids = base["output_ids"]
    assert len(ids) >= 3, "the greedy answer is expected to be longer than 3 tokens"
    target = ids[2]
    out = await generate(http, url, input_ids=PROMPT, return_logprob=True,
                         sampling_params={**GREEDY, "max_new_tokens": 6, "stop_token_ids": [target]})
    check_finished(out, logprobs=True)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert out["output_ids"] == ids[: ids.index(target) + 1]
    ignored = await generate(http, url, input_ids=PROMPT, sampling_params={
        **GREEDY, "max_new_tokens": 4, "stop_token_ids": [target], "ignore_eos": True})
    assert ignored["meta_info"]["finish_reason"]["type"] == "length", "ignore_eos also disables stop_token_ids"

    stop = base["text"][2:5] if len(base["text"]) >= 5 else base["text"]
    for no_trim in (False, True):
        out = await generate(http, url, input_ids=PROMPT, sampling_params={
            **GREEDY, "max_new_tokens": 6, "stop": [stop], "no_stop_trim": no_trim})
        check_finished(out, logprobs=False)
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert (stop in out["text"]) is no_trim
        assert out["output_ids"] == ids[: len(out["output_ids"])]


async def test_max_new_tokens_zero_and_min_new_tokens(http: aiohttp.ClientSession, url: str) -> None:
    out = await generate(http, url, input_ids=PROMPT, sampling_params={"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"]["type"] == "length"
    out = await generate(http, url, input_ids=PROMPT, sampling_params={
        "temperature": 0, "max_new_tokens": 3, "min_new_tokens": 3})
    assert len(out["output_ids"]) == 3


async def test_seeded_sampling_is_reproducible(http: aiohttp.ClientSession, url: str) -> None:
    params = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_new_tokens": 4, "sampling_seed": 1234}
    a = await generate(http, url, input_ids=PROMPT, sampling_params=params)
    b = await generate(http, url, input_ids=PROMPT, sampling_params=params)
    assert a["output_ids"] == b["output_ids"]


async def test_stream_chunks_are_cumulative(http: aiohttp.ClientSession, url: str) -> None:
    events = [e async for e in stream(http, url, {"input_ids": PROMPT, "sampling_params": GREEDY,
                                                  "return_logprob": True})]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    final = chunks[-1]
    check_finished(final, logprobs=True)
    for a, b in zip(chunks, chunks[1:]):
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
    assert "index" not in final
    batch = [e async for e in stream(http, url, {"input_ids": [PROMPT, PROMPT[:5]], "sampling_params": GREEDY})]
    assert batch[-1] == "[DONE]"
    finals = {c["index"]: c for c in batch[:-1] if c["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1]


# ---- malformed requests: exact error shapes, and the server stays up ---------------------------------------------


MALFORMED: list[tuple[str, bytes, str, Any]] = [
    ("bad json", b'{"input_ids": [1, 2', "request", None),
    ("not an object", b"[1, 2, 3]", "request", None),
    ("unknown sampling key", json.dumps({"input_ids": PROMPT, "sampling_params": {"foo": 1}}).encode(),
     "contract", "unknown field `foo`"),
    ("float max_new_tokens", json.dumps({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1.5}}).encode(),
     "contract", "invalid type: floating point `1.5`, expected i64"),
    ("string temperature", json.dumps({"input_ids": PROMPT, "sampling_params": {"temperature": "x"}}).encode(),
     "contract", 'invalid type: string "x", expected f64'),
    ("no input", json.dumps({"sampling_params": {}}).encode(), "invalid",
     "Either text, input_ids or input_embeds should be provided."),
    ("empty input_ids", json.dumps({"input_ids": []}).encode(), "invalid", "input_ids cannot be empty."),
    ("top_p zero", json.dumps({"input_ids": PROMPT, "sampling_params": {"top_p": 0}}).encode(), "invalid",
     "top_p must be in (0, 1], got 0.0."),
    ("top_k zero", json.dumps({"input_ids": PROMPT, "sampling_params": {"top_k": 0}}).encode(), "invalid",
     "top_k"),
    ("negative temperature", json.dumps({"input_ids": PROMPT, "sampling_params": {"temperature": -1}}).encode(),
     "invalid", "temperature"),
    ("min over max", json.dumps({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2,
                                                                          "min_new_tokens": 3}}).encode(),
     "invalid", "min_new_tokens"),
    ("logprob_start_len past prompt", json.dumps({"input_ids": PROMPT, "return_logprob": True,
                                                  "logprob_start_len": len(PROMPT) + 5}).encode(),
     "invalid", "logprob_start_len"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_malformed_request_shapes(http: aiohttp.ClientSession, url: str, case: tuple[Any, ...]) -> None:
    _, raw, kind, message = case
    status, err = await call(http, url, "/generate", raw=raw)
    assert status == 400, err
    if kind == "request":
        assert err["object"] == "error" and err["code"] == 400 and err["type"] == "Bad Request"
        assert isinstance(err["message"], str) and err["param"] is None
    elif kind == "contract":
        assert isinstance(err["error"], str) and message in err["error"]
    else:
        assert message in err["error"]["message"]
    await assert_alive(http, url)


async def test_over_long_prompts(http: aiohttp.ClientSession, url: str) -> None:
    _, info = await call(http, url, "/server_info", method="GET")
    context = info["context_length"]
    status, err = await call(http, url, "/generate", {"input_ids": [PROMPT[1]] * context})
    assert status == 400
    assert f"longer than the model's context length ({context} tokens)" in err["error"]["message"]
    status, err = await call(http, url, "/generate", {"input_ids": PROMPT,
                                                     "sampling_params": {"max_new_tokens": context}})
    assert status == 400
    assert f"maximum context length of {context} tokens" in err["error"]["message"]
    await assert_alive(http, url)


async def test_value_errors_in_a_stream_are_sse_events(http: aiohttp.ClientSession, url: str) -> None:
    events = [e async for e in stream(http, url, {"input_ids": PROMPT, "sampling_params": {"top_p": 0}})]
    assert events[-1] == "[DONE]"
    assert "top_p" in events[0]["error"]["message"]
    status, err = await call(http, url, "/generate", {"input_ids": PROMPT, "stream": True,
                                                     "sampling_params": {"bogus": 1}})
    assert status == 400 and "unknown field `bogus`" in err["error"]


async def test_duplicate_live_rid_is_rejected(http: aiohttp.ClientSession, url: str) -> None:
    body = {"input_ids": PROMPT, "rid": "conf-dup-0001",
            "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True, "temperature": 0}}
    first = asyncio.create_task(call(http, url, "/generate", body))
    await wait_running(http, url)
    status, err = await call(http, url, "/generate", body)
    assert status == 400 and err["error"]["message"] == "Duplicate request ID detected: conf-dup-0001"
    await call(http, url, "/abort_request", {"rid": "conf-dup-0001"})
    status, out = await first
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"


# ---- abort -------------------------------------------------------------------------------------------------------


async def test_abort_by_rid_prefix_leaves_others(http: aiohttp.ClientSession, url: str) -> None:
    long = {"max_new_tokens": LONG, "ignore_eos": True, "temperature": 0}
    a = asyncio.create_task(generate(http, url, input_ids=PROMPT, rid="conf-ab-1", sampling_params=long,
                                     return_logprob=True))
    b = asyncio.create_task(generate(http, url, input_ids=PROMPT, rid="conf-ab-12", sampling_params=long))
    await wait_running(http, url, 2)
    other = asyncio.create_task(generate(http, url, input_ids=PROMPT, rid="conf-ab-2",
                                         sampling_params={**GREEDY, "ignore_eos": True}))
    status, body = await call(http, url, "/abort_request", {"rid": "conf-ab-1"})
    assert status == 200 and body == ""
    for task in (a, b):
        out = await task
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        check_finished(out, logprobs=task is a)
        assert len(out["output_ids"]) < LONG
    done = await other
    assert done["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    # Unknown rids and an empty body are fine.
    assert (await call(http, url, "/abort_request", {"rid": "conf-nobody"}))[0] == 200
    assert (await call(http, url, "/abort_request", {}))[0] == 200


async def test_abort_all(http: aiohttp.ClientSession, url: str) -> None:
    long = {"max_new_tokens": LONG, "ignore_eos": True, "temperature": 0}
    tasks = [asyncio.create_task(generate(http, url, input_ids=PROMPT, sampling_params=long)) for _ in range(2)]
    await wait_running(http, url, 2)
    await call(http, url, "/abort_request", {"abort_all": True})
    for out in await asyncio.gather(*tasks):
        assert out["meta_info"]["finish_reason"]["type"] == "abort"


async def test_client_disconnect_aborts(http: aiohttp.ClientSession, url: str) -> None:
    body = {"input_ids": PROMPT, "stream": True, "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}
    async with aiohttp.ClientSession() as other:
        async with other.post(url + "/generate", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: "):
                    break  # got the first chunk: the request runs; now hang up
    await wait_idle(http, url)


# ---- pause / continue --------------------------------------------------------------------------------------------


async def test_pause_abort_returns_after_in_flight_and_holds_new(http: aiohttp.ClientSession, url: str) -> None:
    running = asyncio.create_task(generate(http, url, input_ids=PROMPT, sampling_params={
        "max_new_tokens": LONG, "ignore_eos": True}))
    await wait_running(http, url)
    status, body = await call(http, url, "/pause_generation", {"mode": "abort"})
    try:
        assert status == 200 and body == {"message": "Generation paused successfully.", "status": "ok"}
        assert running.done(), "pause(abort) returns only after in-flight requests returned"
        assert running.result()["meta_info"]["finish_reason"]["type"] == "abort"
        held = asyncio.create_task(generate(http, url, input_ids=PROMPT, sampling_params=GREEDY))
        await asyncio.sleep(0.5)
        assert not held.done(), "new requests are held while paused"
        assert (await call(http, url, "/ready", method="GET"))[0] == 503
    finally:
        status, body = await call(http, url, "/continue_generation", {})
    assert body == {"message": "Generation continued successfully.", "status": "ok"}
    check_finished(await held, logprobs=False)
    assert (await call(http, url, "/ready", method="GET"))[0] == 200


async def test_pause_retract_then_version_splits_spans(http: aiohttp.ClientSession, url: str,
                                                      is_reference: bool) -> None:
    _, info = await call(http, url, "/model_info", method="GET")
    before = info["weight_version"]
    n = 12 if is_reference else 1000  # long enough to still be running when the pause lands
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"max_new_tokens": n, "ignore_eos": True, "temperature": 0}}
    chunks: list[Any] = []

    async def consume() -> None:
        async for event in stream(http, url, body):
            chunks.append(event)

    task = asyncio.create_task(consume())
    while not chunks:
        await asyncio.sleep(0.01)
    status, _ = await call(http, url, "/pause_generation", {"mode": "retract"})
    assert status == 200
    try:
        await asyncio.sleep(0.2)
        assert not task.done(), "retract keeps the request open"
        status, reply = await call(http, url, "/update_weight_version",
                                   {"new_version": "conf-retract", "abort_all_requests": False})
        assert status == 200 and reply["success"] and reply["new_version"] == "conf-retract"
    finally:
        await call(http, url, "/continue_generation", {})
    await task
    final = chunks[-2]
    check_finished(final, logprobs=True)
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    spans = final["meta_info"]["weight_versions"]
    assert [s["version"] for s in spans] == [before, "conf-retract"]
    assert final["meta_info"]["weight_version"] == "conf-retract"
    if is_reference:
        assert final["meta_info"]["num_retractions"] >= 1
    _, info = await call(http, url, "/model_info", method="GET")
    assert info["weight_version"] == "conf-retract"


async def test_pause_in_place_blocks_flush_then_resumes(http: aiohttp.ClientSession, url: str) -> None:
    task = asyncio.create_task(generate(http, url, input_ids=PROMPT, sampling_params={
        "max_new_tokens": LONG, "ignore_eos": True, "temperature": 0}))
    await wait_running(http, url)
    assert (await call(http, url, "/pause_generation", {"mode": "in_place"}))[0] == 200
    try:
        status, text = await call(http, url, "/flush_cache")
        assert status == 400 and text == "Flush cache failed.\n"
        _, loads = await call(http, url, "/v1/loads", method="GET")
        paused_tokens = loads["loads"][0]["num_used_tokens"]
        await asyncio.sleep(0.3)
        assert not task.done()
    finally:
        await call(http, url, "/continue_generation", {})
    await asyncio.sleep(0.5)
    await call(http, url, "/abort_request", {"abort_all": True})
    out = await task
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(PROMPT) + len(out["output_ids"]) > paused_tokens - 1, "generation went on after continue"


async def test_flush_cache_idle_vs_busy(http: aiohttp.ClientSession, url: str) -> None:
    await wait_idle(http, url)
    status, text = await call(http, url, "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed.")
    assert (await call(http, url, "/flush_cache", method="GET"))[0] == 200
    task = asyncio.create_task(generate(http, url, input_ids=PROMPT, sampling_params={
        "max_new_tokens": LONG, "ignore_eos": True}))
    await wait_running(http, url)
    status, text = await call(http, url, "/flush_cache")
    assert status == 400 and text == "Flush cache failed.\n"
    await call(http, url, "/abort_request", {"abort_all": True})
    await task
    status, _ = await call(http, url + "", "/flush_cache?timeout=30")
    assert status == 200


# ---- info, health, weight-update session rules -------------------------------------------------------------------


async def test_health_and_info_routes(http: aiohttp.ClientSession, url: str, is_reference: bool) -> None:
    for path in ("/health", "/health_generate", "/ready"):
        assert (await call(http, url, path, method="GET"))[0] == 200
    for path in ("/model_info", "/get_model_info"):
        status, info = await call(http, url, path, method="GET")
        assert status == 200 and info["is_generation"] is True
        assert {"model_path", "served_model_name", "tokenizer_path", "weight_version"} <= set(info)
    for path in ("/server_info", "/get_server_info"):
        status, info = await call(http, url, path, method="GET")
        assert status == 200
        assert {"model_path", "tp_size", "dp_size", "context_length", "max_running_requests",
                "max_total_num_tokens", "max_req_input_len", "version"} <= set(info)
    status, models = await call(http, url, "/v1/models", method="GET")
    assert status == 200 and models["data"][0]["max_model_len"] > 0
    status, loads = await call(http, url, "/v1/loads", method="GET")
    assert {"num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens",
            "max_running_requests", "token_usage", "gen_throughput"} <= set(loads["loads"][0])
    if is_reference:
        status, legacy = await call(http, url, "/get_load", method="GET")
        assert status == 200 and {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(legacy[0])


async def test_weight_update_session_rules(http: aiohttp.ClientSession, url: str) -> None:
    status, reply = await call(http, url, "/end_weight_update", {})
    assert status == 400 and "no weight-update session is open" in reply["message"]
    status, reply = await call(http, url, "/update_weights_from_distributed",
                               {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]})
    assert status == 400 and reply["success"] is False
    assert "must run between begin_weight_update() and end_weight_update()" in reply["message"]
    assert (await call(http, url, "/begin_weight_update", {}))[1]["success"] is True
    try:
        status, reply = await call(http, url, "/begin_weight_update", {})
        assert status == 400 and "already open" in reply["message"]
    finally:
        assert (await call(http, url, "/end_weight_update", {}))[1]["success"] is True
    status, reply = await call(http, url, "/update_weights_from_distributed", {"names": ["x"]})
    assert status == 400, "missing required keys are a body validation error"
    status, reply = await call(http, url, "/destroy_weights_update_group", {"group_name": "conf-no-such-group"})
    assert status == 400 and reply["message"] == "The group to be destroyed does not exist."


async def test_get_weights_by_name(http: aiohttp.ClientSession, url: str) -> None:
    status, rows = await call(http, url, "/get_weights_by_name",
                              {"name": "model.layers.0.input_layernorm.weight", "truncate_size": 3})
    assert status == 200 and len(rows) == 3 and all(isinstance(x, float) for x in rows)
    status, rows = await call(http, url, "/get_weights_by_name", {"name": "model.embed_tokens.weight",
                                                                 "truncate_size": 2})
    assert status == 200 and len(rows) == 2 and isinstance(rows[0], list)
    status, err = await call(http, url, "/get_weights_by_name", {"name": "no.such.weight"})
    assert status == 400 and err == {"error": {"message": "Get parameter by name failed"}}
