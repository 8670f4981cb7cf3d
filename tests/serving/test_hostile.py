"""Hostile requests against the reference server: every request cap, malformed bodies of every kind, overload, and a
request that makes the scheduler raise. Each answer must be a clear error in SGLang's shape, and afterwards the
server must still serve: a well-formed request sent alongside completes, and nothing is left holding the reader
share that weight updates wait for.

The server runs in this process over a real socket on 127.0.0.1 (`ssp.serving.app.run_app`), with the real scheduler
and a tiny random Llama (SmolLM2's tokenizer, a 256-token vocabulary), so that caps can be set small, the front's
state can be read, and a fault can be planted in the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from ssp.serving import batcher as batcher_module
from ssp.serving.app import FRONT, Front, create_app, run_app
from ssp.serving.config import ServingConfig
from ssp.serving.model_backend import ModelBackend

VOCAB = 256
CONTEXT = 4096
PROMPT = [1, 17, 42, 99, 7, 3, 200, 12]
QUICK = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}
LONG = {"temperature": 0, "max_new_tokens": 4000, "ignore_eos": True}
"""Requests that must still be running when the test aborts them (the tiny model decodes ~1,000 tokens a second)."""
CAPS = dict(max_running_requests=2, max_queued_requests=6, max_concurrent_requests=6, max_body_bytes=64 * 1024,
            max_batch_size=4, max_n=3, max_top_logprobs_num=5, max_token_ids_logprob=4, max_stop_strings=3,
            max_stop_string_chars=8, max_rid_chars=32)
"""Small caps, so that each can be reached with small requests. The queue holds as many samples as the calls the
server takes, so that calls released together (after a pause) never overflow it by arriving in one scheduler turn."""


@dataclass(frozen=True)
class Server:
    url: str
    front: Front
    model_dir: Path


def _tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    """A random 1-layer Llama with SmolLM2's tokenizer files (ids below VOCAB decode fine; EOS is id 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
async def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    tiny = _tiny_model(tmp_path_factory.mktemp("tiny-serving"), model_dir)
    cfg = ServingConfig(model=tiny, port=0, device="cpu", threads=0, prefix_cache_tokens=0, **CAPS)
    app = create_app(ModelBackend(cfg), cfg)
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_app(app, "127.0.0.1", 0, on_bound=bound.set_result))
    url = await asyncio.wait_for(bound, 120)
    yield Server(url, app[FRONT], tiny)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: Any


async def send(http: aiohttp.ClientSession, url: str, path: str, body: Any = None, *, raw: bytes | None = None,
               method: str = "POST") -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with http.request(method, url + path, data=data, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = text
        return Reply(r.status, parsed, r.headers)


async def loads(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    return (await send(http, url, "/v1/loads", method="GET")).body["loads"][0]


async def wait_for_load(http: aiohttp.ClientSession, url: str, *, running: int, waiting: int) -> None:
    for _ in range(600):
        load = await loads(http, url)
        if load["num_running_reqs"] == running and load["num_waiting_reqs"] == waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {running} running and {waiting} waiting, got {load}")


def good_body() -> dict[str, Any]:
    return {"input_ids": PROMPT, "sampling_params": QUICK, "return_logprob": True}


def check_good(reply: Reply) -> None:
    assert reply.status == 200, reply.body
    assert reply.body["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert len(reply.body["meta_info"]["output_token_logprobs"]) == 2


async def alongside(http: aiohttp.ClientSession, url: str, bad: Any) -> Reply:
    """Send the hostile request while a well-formed one runs; the well-formed one must complete."""
    good = asyncio.create_task(send(http, url, "/generate", good_body()))
    reply = await bad
    check_good(await good)
    return reply


def check_shape(reply: Reply, kind: str, fragment: str, status: int = 400) -> None:
    """SGLang's three error shapes (serving/protocol.py): request, contract, invalid."""
    assert reply.status == status, (reply.status, reply.body)
    body = reply.body
    if kind == "request":
        assert body["object"] == "error" and body["code"] == status and body["param"] is None, body
        assert fragment in body["message"], body
    elif kind == "contract":
        assert isinstance(body["error"], str) and fragment in body["error"], body
    else:
        assert fragment in body["error"]["message"], body


# ---- malformed bodies ----------------------------------------------------------------------------------------------


def _j(**body: Any) -> bytes:
    return json.dumps(body).encode()


def _s(**params: Any) -> bytes:
    """A body with these sampling_params."""
    return _j(input_ids=PROMPT, sampling_params=params)


MALFORMED: list[tuple[str, bytes, str, str]] = [
    # JSON itself
    ("truncated json", b'{"input_ids": [1, 2', "request", "JSON decode error"),
    ("not json", b"hello", "request", "JSON decode error"),
    ("empty body", b"", "request", "Field required"),
    ("whitespace body", b"  \n ", "request", "Field required"),
    ("invalid utf-8", b'{"text": "\xff\xfe"}', "request", "JSON decode error"),
    ("NaN literal", b'{"input_ids": [1], "sampling_params": {"temperature": NaN}}', "request", "JSON decode error"),
    ("Infinity literal", b'{"input_ids": [1], "sampling_params": {"top_p": Infinity}}', "request",
     "JSON decode error"),
    ("nesting past the parser's depth", b"[" * 5000 + b"]" * 5000, "request", "JSON decode error"),
    ("top-level array", b"[1, 2, 3]", "request", "Input should be a JSON object"),
    ("top-level string", b'"generate"', "request", "Input should be a JSON object"),
    ("top-level null", b"null", "request", "Input should be a JSON object"),
    # top-level field types
    ("input_ids a string", _j(input_ids="1 2 3"), "request", "body.input_ids"),
    ("input_ids floats", _j(input_ids=[1.0, 2.5]), "request", "body.input_ids"),
    ("input_ids booleans", _j(input_ids=[True, False]), "request", "body.input_ids"),
    ("input_ids three levels deep", _j(input_ids=[[[1]]]), "request", "body.input_ids"),
    ("input_ids mixed int and list", _j(input_ids=[1, [2]]), "request", "body.input_ids"),
    ("text a number", _j(text=42), "request", "body.text"),
    ("text list with a number", _j(text=["a", 1]), "request", "body.text"),
    ("rid a number", _j(input_ids=PROMPT, rid=7), "request", "body.rid"),
    ("rid list with a number", _j(input_ids=[PROMPT], rid=[7]), "request", "body.rid"),
    ("stream a string", _j(input_ids=PROMPT, stream="yes"), "request", "body.stream"),
    ("return_prompt_token_ids a number", _j(input_ids=PROMPT, return_prompt_token_ids=1), "request",
     "body.return_prompt_token_ids"),
    ("return_logprob a string", _j(input_ids=PROMPT, return_logprob="true"), "request", "body.return_logprob"),
    ("logprob_start_len a float", _j(input_ids=PROMPT, return_logprob=True, logprob_start_len=1.5), "request",
     "body.logprob_start_len"),
    ("top_logprobs_num a string", _j(input_ids=PROMPT, return_logprob=True, top_logprobs_num="3"), "request",
     "body.top_logprobs_num"),
    ("token_ids_logprob a string", _j(input_ids=PROMPT, return_logprob=True, token_ids_logprob="1,2"), "request",
     "body.token_ids_logprob"),
    # the contract gate
    ("sampling_params a list of ints", _j(input_ids=PROMPT, sampling_params=[1, 2]), "contract",
     "expected struct SamplingParams"),
    ("sampling_params a string", _j(input_ids=PROMPT, sampling_params="greedy"), "contract",
     "expected struct SamplingParams"),
    ("unknown sampling key", _s(beam=4), "contract", "unknown field `beam`"),
    ("max_new_tokens a float", _s(max_new_tokens=1.5), "contract", "expected i64"),
    ("max_new_tokens a string", _s(max_new_tokens="8"), "contract", "expected i64"),
    ("max_new_tokens past u64", b'{"input_ids": [1], "sampling_params": {"max_new_tokens": 1' + b"0" * 30 + b"}}",
     "contract", "expected i64"),
    ("max_new_tokens past i64", _s(max_new_tokens=2**64 - 1), "contract",
     "invalid value: integer `18446744073709551615`, expected i64"),
    ("sampling_seed past i64", _s(sampling_seed=2**63), "contract", "expected i64"),
    ("temperature a string", _s(temperature="hot"), "contract", "expected f64"),
    ("ignore_eos a number", _s(ignore_eos=1), "contract", "expected a boolean"),
    ("stop a number", _s(stop=5), "contract", "a string or a sequence of strings"),
    ("stop list with a number", _s(stop=["a", 5]), "contract", "a string or a sequence of strings"),
    ("stop_token_ids a string", _s(stop_token_ids="2"), "contract", "expected a sequence"),
    ("stop_token_ids past i64", _s(stop_token_ids=[2**64 - 1]), "contract", "expected i64"),
    ("return_text_in_logprobs a list", _j(input_ids=PROMPT, return_text_in_logprobs=[True]), "contract",
     "expected a boolean"),
    # values
    ("no input", _j(sampling_params={}), "invalid", "Either text, input_ids or input_embeds should be provided."),
    ("empty object", b"{}", "invalid", "Either text, input_ids or input_embeds should be provided."),
    ("empty input_ids", _j(input_ids=[]), "invalid", "input_ids cannot be empty."),
    ("empty prompt in a batch", _j(input_ids=[PROMPT, []]), "invalid", "input_ids cannot be empty."),
    ("empty text batch", _j(text=[]), "invalid", "The batch is empty"),
    ("token id at the vocabulary size", _j(input_ids=[1, VOCAB]), "invalid", f"token id {VOCAB}, outside"),
    ("negative token id", _j(input_ids=[1, -1]), "invalid", "token id -1, outside"),
    ("huge token id", _j(input_ids=[1, 2**63 - 1]), "invalid", "outside the vocabulary"),
    ("text beyond the model's vocabulary", _j(text="The capital of France is"), "invalid", "outside the vocabulary"),
    ("prompt as long as the context", _j(input_ids=[5] * CONTEXT), "invalid", "longer than the model's context"),
    ("negative max_new_tokens", _s(max_new_tokens=-1), "invalid", "max_new_tokens must be at least 0"),
    ("max_new_tokens past the context", _s(max_new_tokens=CONTEXT), "invalid", "maximum context length"),
    ("max_new_tokens at i64 max", _s(max_new_tokens=2**63 - 1), "invalid", "maximum context length"),
    ("negative temperature", _s(temperature=-0.5), "invalid", "temperature must be non-negative"),
    ("top_p zero", _s(top_p=0), "invalid", "top_p must be in (0, 1]"),
    ("top_p above one", _s(top_p=1.5), "invalid", "top_p must be in (0, 1]"),
    ("top_k -5", _s(top_k=-5), "invalid", "top_k must be -1"),
    ("min_p two", _s(min_p=2), "invalid", "min_p must be in [0, 1]"),
    ("min_new_tokens above max_new_tokens", _s(max_new_tokens=2, min_new_tokens=3), "invalid", "min_new_tokens"),
    ("negative min_new_tokens", _s(min_new_tokens=-3), "invalid", "min_new_tokens"),
    ("stream_interval zero", _s(stream_interval=0), "invalid", "stream_interval must be at least 1"),
    ("stream_interval negative", _s(stream_interval=-3), "invalid", "stream_interval must be at least 1"),
    ("stop token id out of vocabulary", _s(stop_token_ids=[VOCAB + 1]), "invalid", "stop_token_ids must be in"),
    ("negative stop token id", _s(stop_token_ids=[-4]), "invalid", "stop_token_ids must be in"),
    ("unsupported penalty", _s(frequency_penalty=0.5), "invalid", "frequency_penalty=0.5 is not supported"),
    ("unsupported logit_bias", _s(logit_bias={"5": 1.0}), "invalid", "logit_bias"),
    ("n negative", _s(n=-2), "invalid", "n must be at least 1"),
    ("n differs within a batch", _j(input_ids=[PROMPT, PROMPT], sampling_params=[{"n": 1}, {"n": 2}]), "invalid",
     "must be the same for all samples"),
    ("sampling_params list too short", _j(input_ids=[PROMPT, PROMPT], sampling_params=[{}]), "invalid",
     "The length of sampling_params (1) does not match the batch size (2)."),
    ("per-prompt list with n > 1", _j(input_ids=[PROMPT], sampling_params={"n": 2}, return_logprob=[True]),
     "invalid", "return_logprob must be a scalar when n > 1"),
    ("return_logprob list too long", _j(input_ids=[PROMPT], return_logprob=[True, False]), "invalid",
     "The length of return_logprob (2) does not match the batch size (1)."),
    ("rid list longer than the batch", _j(input_ids=[PROMPT], rid=["a", "b"]), "invalid", "rids length mismatch"),
    ("duplicate rids in a batch", _j(input_ids=[PROMPT, PROMPT, PROMPT], rid=["x", "y", "x"]), "invalid",
     "Duplicate request ID detected: x"),
    ("logprob_start_len past the prompt", _j(input_ids=PROMPT, return_logprob=True, logprob_start_len=99),
     "invalid", "logprob_start_len=99 is higher"),
    ("logprob_start_len below -1", _j(input_ids=PROMPT, return_logprob=True, logprob_start_len=-5), "invalid",
     "logprob_start_len=-5"),
    ("negative top_logprobs_num", _j(input_ids=PROMPT, return_logprob=True, top_logprobs_num=-1), "invalid",
     "top_logprobs_num must be at least 0"),
    ("token_ids_logprob out of vocabulary", _j(input_ids=PROMPT, return_logprob=True, token_ids_logprob=[VOCAB]),
     "invalid", f"token_ids_logprob contains {VOCAB}"),
]

CAPPED: list[tuple[str, bytes, str]] = [
    ("n above max_n", _s(n=4), "n must be at most 3 (serving.max_n), got 4"),
    ("n at i64 max", _s(n=2**63 - 1), "serving.max_n"),
    ("prompts x n above max_batch_size", _j(input_ids=[PROMPT, PROMPT], sampling_params={"n": 3}),
     "expands into 6 samples (2 prompts x n=3), more than 4 (serving.max_batch_size)"),
    ("batch above max_batch_size", _j(input_ids=[PROMPT] * 5), "expands into 5 samples"),
    ("text batch above max_batch_size", _j(text=["a"] * 5), "expands into 5 samples"),
    ("rid list above max_batch_size", _j(input_ids=[PROMPT], rid=[f"r{i}" for i in range(500)]),
     "rid lists 500 ids, more than 4 per call (serving.max_batch_size)"),
    ("rid too long", _j(input_ids=PROMPT, rid="r" * 33), "rid must be at most 32 characters"),
    ("rid in a list too long", _j(input_ids=[PROMPT], rid=["r" * 100]), "rid must be at most 32 characters"),
    ("top_logprobs_num above the vocabulary", _j(input_ids=PROMPT, return_logprob=True, top_logprobs_num=VOCAB + 1),
     f"top_logprobs_num must be at most the vocabulary size ({VOCAB}), got {VOCAB + 1}"),
    ("top_logprobs_num above its cap", _j(input_ids=PROMPT, return_logprob=True, top_logprobs_num=6),
     "top_logprobs_num must be at most 5 (serving.max_top_logprobs_num), got 6"),
    ("top_logprobs_num above its cap, per prompt", _j(input_ids=[PROMPT, PROMPT], return_logprob=True,
                                                      top_logprobs_num=[1, 9]), "got 9"),
    ("token_ids_logprob above its cap", _j(input_ids=PROMPT, return_logprob=True, token_ids_logprob=[1, 2, 3, 4, 5]),
     "token_ids_logprob must list at most 4 ids (serving.max_token_ids_logprob), got 5"),
    ("too many stop strings", _s(stop=["a", "b", "c", "d"]), "stop must contain at most 3 strings, got 4"),
    ("stop string too long", _s(stop=["</answer>"]), "stop strings must be at most 8 characters long, got one of 9"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_malformed_body_is_refused_alone(server: Server, http: aiohttp.ClientSession,
                                                case: tuple[str, bytes, str, str]) -> None:
    _, raw, kind, fragment = case
    reply = await alongside(http, server.url, send(http, server.url, "/generate", raw=raw))
    check_shape(reply, kind, fragment)


@pytest.mark.parametrize("case", CAPPED, ids=[c[0] for c in CAPPED])
async def test_request_caps(server: Server, http: aiohttp.ClientSession, case: tuple[str, bytes, str]) -> None:
    _, raw, fragment = case
    check_shape(await alongside(http, server.url, send(http, server.url, "/generate", raw=raw)), "invalid", fragment)
    # In a stream, a value error is an SSE error event after a 200 (SGLang's streaming path).
    streamed = json.loads(raw)
    streamed["stream"] = True
    reply = await send(http, server.url, "/generate", streamed)
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    event = json.loads(reply.body.split("\n\n")[0].removeprefix("data: "))
    assert fragment in event["error"]["message"]


async def test_requests_at_the_caps_run(server: Server, http: aiohttp.ClientSession) -> None:
    """The caps are inclusive: a call at every limit at once is served."""
    reply = await alongside(http, server.url, send(http, server.url, "/generate", {
        "input_ids": [PROMPT], "rid": ["r" * 32], "return_logprob": True, "top_logprobs_num": 5,
        "token_ids_logprob": [1, 2, 3, 4], "sampling_params": {**QUICK, "n": 3, "stop": ["abcdefgh"] * 3}}))
    assert reply.status == 200, reply.body
    assert len(reply.body) == 3
    meta = reply.body[0]["meta_info"]
    assert [len(row) for row in meta["output_top_logprobs"]] == [5, 5]
    assert [len(row) for row in meta["output_token_ids_logprobs"]] == [4, 4]
    batch = await send(http, server.url, "/generate", {"input_ids": [PROMPT] * 4, "rid": ["b0", "b1", "b2", "b3"],
                                                      "sampling_params": QUICK})
    assert [o["meta_info"]["id"] for o in batch.body] == ["b0", "b1", "b2", "b3"]


def test_default_body_cap_fits_a_full_batch_at_a_12k_context() -> None:
    cfg = ServingConfig()
    id_bytes = len(str(10**7 - 1)) + 1  # the longest id of a vocabulary below 10M, and its comma
    assert cfg.max_body_bytes >= cfg.max_batch_size * 12288 * id_bytes + 4096
    assert cfg.max_body_bytes <= 16 * 2**20


async def test_oversized_body_gets_413(server: Server, http: aiohttp.ClientSession) -> None:
    raw = _j(input_ids=[5] * 30000)  # ~90 KB against a 64 KiB cap
    reply = await alongside(http, server.url, send(http, server.url, "/generate", raw=raw))
    check_shape(reply, "request", "larger than 65536 bytes", status=413)
    assert "serving.max_body_bytes" in reply.body["message"]
    control = await send(http, server.url, "/update_weights_from_disk", raw=json.dumps({"model_path": "x" * 70000})
                         .encode())
    check_shape(control, "request", "larger than 65536 bytes", status=413)


CONTROL: list[tuple[str, str, bytes, str]] = [
    ("abort rid a number", "/abort_request", _j(rid=5), "body.rid"),
    ("abort body an array", "/abort_request", b"[]", "Input should be a JSON object"),
    ("pause mode unknown", "/pause_generation", _j(mode="sideways"), "body.mode"),
    ("pause bad json", "/pause_generation", b"{mode", "JSON decode error"),
    ("update from disk without model_path", "/update_weights_from_disk", b"{}", "body.model_path: Field required"),
    ("distributed update with uneven lists", "/update_weights_from_distributed",
     _j(names=["a"], dtypes=[], shapes=[]), "must have the same length"),
    ("weights by name, name a number", "/get_weights_by_name", _j(name=3), "body.name"),
    ("version label a number", "/update_weight_version", _j(new_version=3), "body.new_version"),
]


@pytest.mark.parametrize("case", CONTROL, ids=[c[0] for c in CONTROL])
async def test_malformed_control_body(server: Server, http: aiohttp.ClientSession,
                                      case: tuple[str, str, bytes, str]) -> None:
    _, path, raw, fragment = case
    check_shape(await alongside(http, server.url, send(http, server.url, path, raw=raw)), "request", fragment)


async def test_flush_cache_timeout_not_a_number(server: Server, http: aiohttp.ClientSession) -> None:
    reply = await alongside(http, server.url, send(http, server.url, "/flush_cache?timeout=soon"))
    check_shape(reply, "request", "query.timeout")


# ---- overload: concurrent calls and the queue ----------------------------------------------------------------------


async def test_concurrent_calls_cap_answers_503_with_retry_after(server: Server, http: aiohttp.ClientSession) -> None:
    assert (await send(http, server.url, "/pause_generation", {"mode": "in_place"})).status == 200
    try:
        held = [asyncio.create_task(send(http, server.url, "/generate", good_body())) for _ in range(6)]
        for _ in range(500):
            if server.front.calls == 6:
                break
            await asyncio.sleep(0.01)
        assert server.front.calls == 6, "the paused server holds every call"
        reply = await send(http, server.url, "/generate", good_body())
        check_shape(reply, "request", "Too many concurrent requests", status=503)
        assert reply.body["type"] == "503" and "serving.max_concurrent_requests" in reply.body["message"]
        assert reply.headers["Retry-After"] == "1"
    finally:
        assert (await send(http, server.url, "/continue_generation", {})).status == 200
    for reply in await asyncio.gather(*held):
        check_good(reply)
    assert server.front.calls == 0


async def test_full_queue_answers_503_and_a_refused_batch_leaves_nothing_behind(
        server: Server, http: aiohttp.ClientSession) -> None:
    long = {"input_ids": PROMPT, "sampling_params": LONG}
    calls = [asyncio.create_task(send(http, server.url, "/generate", long)) for _ in range(2)]
    await wait_for_load(http, server.url, running=2, waiting=0)
    calls.append(asyncio.create_task(send(http, server.url, "/generate", {**long, "input_ids": [PROMPT] * 4})))
    await wait_for_load(http, server.url, running=2, waiting=4)
    # Three samples, room for two: the call fails with 503 as a whole, and the two samples it had queued are
    # withdrawn rather than left to run without their caller (and without its reader share).
    reply = await send(http, server.url, "/generate", {**long, "input_ids": [PROMPT] * 3})
    assert reply.status == 503 and reply.headers["Retry-After"] == "1"
    assert reply.body == {"object": "error", "message": "The request queue is full.", "type": "503", "param": None,
                          "code": 503}
    await wait_for_load(http, server.url, running=2, waiting=4)
    calls += [asyncio.create_task(send(http, server.url, "/generate", long)) for _ in range(2)]
    await wait_for_load(http, server.url, running=2, waiting=6)
    reply = await send(http, server.url, "/generate", long)
    assert reply.status == 503 and reply.body["message"] == "The request queue is full."
    assert (await send(http, server.url, "/abort_request", {"abort_all": True})).status == 200
    for reply in await asyncio.gather(*calls):
        assert reply.status == 200
        for out in reply.body if isinstance(reply.body, list) else [reply.body]:
            assert out["meta_info"]["finish_reason"]["type"] == "abort"
    check_good(await send(http, server.url, "/generate", good_body()))


# ---- a request that makes the scheduler raise -----------------------------------------------------------------------

FAULT_K = 4
"""top_logprobs_num that trips the planted fault (any other value samples normally)."""


@pytest.fixture
def planted_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Make the scheduler's top-k raise for requests asking for FAULT_K alternatives, from their `at`-th token on
    (`at` is the list's one item, set by the test): at 1 the failure is in the prefill, later in a decode step."""
    real = batcher_module.top_logprobs
    at = [1]
    seen = [0]

    def top_logprobs(logprobs_V: torch.Tensor, k: int) -> list[tuple[float, int]]:
        if k == FAULT_K:
            seen[0] += 1
            if seen[0] >= at[0]:
                raise RuntimeError("planted fault: top-k failed")
        return real(logprobs_V, k)

    monkeypatch.setattr(batcher_module, "top_logprobs", top_logprobs)
    yield at


@pytest.mark.parametrize("at_token", [1, 3], ids=["in-prefill", "in-decode"])
async def test_a_failing_request_fails_alone(server: Server, http: aiohttp.ClientSession, planted_fault: list[int],
                                             at_token: int) -> None:
    planted_fault[0] = at_token
    other = asyncio.create_task(send(http, server.url, "/generate", {
        "input_ids": PROMPT, "return_logprob": True, "sampling_params": {**LONG, "max_new_tokens": 120}}))
    await wait_for_load(http, server.url, running=1, waiting=0)
    bad = {"input_ids": PROMPT[:5], "return_logprob": True, "top_logprobs_num": FAULT_K, "sampling_params": LONG}
    reply = await asyncio.wait_for(send(http, server.url, "/generate", bad), 20)
    check_shape(reply, "request", "Internal error: planted fault: top-k failed", status=500)
    assert reply.body["type"] == "500"
    done = await asyncio.wait_for(other, 20)
    assert done.status == 200 and done.body["meta_info"]["finish_reason"] == {"type": "length", "length": 120}
    # Nothing holds a reader share: a weight update that takes the writer lock (not paused) goes through.
    update = await asyncio.wait_for(send(http, server.url, "/update_weights_from_disk",
                                         {"model_path": str(server.model_dir)}), 20)
    assert update.status == 200 and update.body["success"], update.body
    # And a pause that aborts in-flight calls returns: no call is stuck.
    assert (await asyncio.wait_for(send(http, server.url, "/pause_generation", {"mode": "abort"}), 20)).status == 200
    assert (await send(http, server.url, "/continue_generation", {})).status == 200
    # The same failure in a stream: the final chunk is the 500 abort, then [DONE].
    reply = await asyncio.wait_for(send(http, server.url, "/generate", {**bad, "stream": True}), 20)
    events = [e.removeprefix("data: ") for e in reply.body.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    finish = json.loads(events[-2])["meta_info"]["finish_reason"]
    assert finish["type"] == "abort" and finish["status_code"] == 500 and "planted fault" in finish["message"]
    check_good(await send(http, server.url, "/generate", good_body()))
