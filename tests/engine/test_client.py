"""ServerClient against a real server over 127.0.0.1 (the simulated server behind serving's HTTP front): parsing of
every response field, finish shapes, abort by rid, pause/continue, control calls, and errors that carry the server's
message and URL. Response parsing edge cases are also checked on hand-written payloads (pure logic)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ssp.engine.client import ServerClient, parse_generate_response
from ssp.engine.errors import (
    BadRequest,
    ConnectionFailed,
    FatalError,
    ProtocolError,
    RequestTimeout,
    RetryableError,
    ServerOverloaded,
)
from ssp.engine.generation import GenerateResult, SamplingParams
from ssp.engine.ids import RID_LENGTH, RequestIds
from ssp.engine.rollout import token_versions
from ssp.engine.trajectory import UNKNOWN_VERSION

IDS = RequestIds()
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 2, 198, 1, 4093, 198]  # a ChatML-looking prompt


@pytest.fixture
async def client(sim_server: str) -> AsyncIterator[ServerClient]:
    async with aiohttp.ClientSession() as session:
        yield ServerClient(sim_server, session, request_timeout_s=60, admin_timeout_s=60)


async def _until_stop(client: ServerClient, sampling: SamplingParams, rid: str | None = None) -> GenerateResult:
    """Generate until a turn ends by a stop rule: the sim lets 0.2 % of turns run away to the budget, like a model."""
    for _ in range(5):
        result = await client.generate(PROMPT, sampling, rid or IDS.next())
        if result.finish.type == "stop":
            return result
    raise AssertionError(f"five turns in a row ran to max_new_tokens: {result.finish}")


async def test_generate_parses_ids_logprobs_finish_and_versions(client: ServerClient) -> None:
    rid = IDS.next()
    result = await _until_stop(client, SamplingParams(max_new_tokens=2000), rid)
    assert result.rid == rid and result.server == client.url
    assert len(result.output_ids) == len(result.logprobs) > 0
    assert all(lp <= 0 for lp in result.logprobs)
    assert result.prompt_tokens == len(PROMPT)
    assert result.finish.type == "stop" and result.finish.matched == 2  # the tokenizer's EOS id, an integer
    assert result.output_ids[-1] == 2
    assert result.weight_versions[0].start == 0 and result.weight_versions[-1].end == len(result.output_ids)
    assert result.weight_versions[-1].version == result.weight_version
    assert "<think>" in result.text
    assert 0 < result.client_s < 1 and result.client_cpu_s >= 0  # the client's encode + decode, for turn overhead
    # The moments the rollout's end-to-end turn latency is measured from, in the order they happen.
    assert result.request_started_at is not None and result.request_sent_at is not None
    assert result.answer_received_at is not None
    assert result.request_started_at <= result.request_sent_at < result.answer_received_at


async def test_finish_shapes_stop_string_and_length(client: ServerClient) -> None:
    stop = SamplingParams(max_new_tokens=2000, stop=("</search>", "</answer>"), no_stop_trim=True)
    result = await _until_stop(client, stop)
    assert result.finish.type == "stop" and result.finish.matched in ("</search>", "</answer>")
    assert result.text.endswith(result.finish.matched)  # no_stop_trim keeps it in the text
    short = await client.generate(PROMPT, SamplingParams(max_new_tokens=3, ignore_eos=True), IDS.next())
    assert short.finish.type == "length" and short.finish.matched == 3 and len(short.output_ids) == 3


async def test_abort_by_rid_returns_partial_output(client: ServerClient) -> None:
    rid = IDS.next()
    long = SamplingParams(max_new_tokens=8000, ignore_eos=True)  # the sim then runs to the budget
    task = asyncio.create_task(client.generate(PROMPT, long, rid))
    await asyncio.sleep(0.5)
    await client.abort(rid)
    result = await asyncio.wait_for(task, 30)
    assert result.finish.type == "abort"
    assert 0 < len(result.output_ids) < 8000 and len(result.logprobs) == len(result.output_ids)


async def test_pause_holds_new_requests_until_continue(client: ServerClient) -> None:
    paused = await client.pause("in_place")
    assert paused.success, paused.message
    try:
        task = asyncio.create_task(client.generate(PROMPT, SamplingParams(max_new_tokens=5), IDS.next()))
        await asyncio.sleep(0.5)
        assert not task.done(), "a paused server must hold new requests"
    finally:
        resumed = await client.continue_()
    assert resumed.success
    assert (await asyncio.wait_for(task, 30)).finish.type in ("stop", "length")


async def test_info_health_flush_and_version(client: ServerClient) -> None:
    assert await client.health() == 200
    info = await client.server_info()
    assert info["max_running_requests"] == 4096 and info["context_length"] == 12288
    assert (await client.model_info())["tokenizer_path"].endswith("SmolLM2-135M-Instruct")
    assert (await client.flush_cache()).success
    try:
        assert (await client.update_weight_version("7")).success
        result = await client.generate(PROMPT, SamplingParams(max_new_tokens=4), IDS.next())
        assert result.weight_version == "7" and {s.version for s in result.weight_versions} == {"7"}
        assert (await client.model_info())["weight_version"] == "7"
    finally:
        await client.update_weight_version("default")


async def test_weight_update_calls_return_success_and_message(client: ServerClient) -> None:
    names, dtypes, shapes = ["model.embed_tokens.weight"], ["bfloat16"], [[16, 8]]
    outside = await client.update_weights_from_distributed(names=names, dtypes=dtypes, shapes=shapes)
    assert not outside.success and "begin_weight_update" in outside.message
    assert (await client.init_weights_update_group(master_address="127.0.0.1", master_port=1, rank_offset=1,
                                                   world_size=2, backend="gloo")).success
    assert (await client.pause("retract")).success
    try:
        assert (await client.begin_weight_update()).success
        again = await client.begin_weight_update()
        assert not again.success and "already open" in again.message
        inside = await client.update_weights_from_distributed(names=names, dtypes=dtypes, shapes=shapes,
                                                              weight_version="3")
        assert inside.success and "3" in inside.message, inside.message
        assert (await client.end_weight_update()).success
    finally:
        await client.continue_()
    assert (await client.update_weights_from_disk("/ckpt/step-1", weight_version="default")).success
    assert (await client.destroy_weights_update_group()).success
    with pytest.raises(BadRequest):  # the sim holds no parameters: SGLang's "Get parameter by name failed"
        await client.get_weights_by_name("model.embed_tokens.weight")


async def test_errors_carry_server_message_and_url(client: ServerClient) -> None:
    with pytest.raises(BadRequest, match="longer than the model's context length") as too_long:
        await client.generate(list(range(100, 100 + 12288)), SamplingParams(max_new_tokens=4), IDS.next())
    assert client.url in str(too_long.value) and too_long.value.status == 400
    assert isinstance(too_long.value, FatalError)
    with pytest.raises(BadRequest, match=r"top_p must be in \(0, 1\]"):
        await client.generate(PROMPT, SamplingParams(top_p=0.0), IDS.next())
    rid = IDS.next()
    first = asyncio.create_task(client.generate(PROMPT, SamplingParams(max_new_tokens=4000, ignore_eos=True), rid))
    await asyncio.sleep(0.3)
    with pytest.raises(BadRequest, match="Duplicate request ID"):
        await client.generate(PROMPT, SamplingParams(max_new_tokens=4), rid)
    await client.abort(rid)
    assert (await first).finish.type == "abort"


async def test_timeout_is_retryable_and_may_still_run(sim_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        impatient = ServerClient(sim_server, session, request_timeout_s=0.3)
        rid = IDS.next()
        with pytest.raises(RequestTimeout, match="no answer within 0.3 s") as e:
            await impatient.generate(PROMPT, SamplingParams(max_new_tokens=8000, ignore_eos=True), rid)
        assert e.value.may_be_running and isinstance(e.value, RetryableError)
        await impatient.abort(rid)  # what the pool does before re-sending


async def test_queue_full_is_a_retryable_503(sim_launcher) -> None:  # type: ignore[no-untyped-def]
    full = sim_launcher(extra_args=("--set", "serving.max_queued_requests=0"))  # every generate: queue full
    async with aiohttp.ClientSession() as session:
        client = ServerClient(full.url, session)
        with pytest.raises(ServerOverloaded, match="The request queue is full") as e:
            await client.generate(PROMPT, SamplingParams(max_new_tokens=4), IDS.next())
        assert isinstance(e.value, RetryableError) and e.value.status == 503 and not e.value.may_be_running
    full.stop()


async def test_unreachable_server_is_a_retryable_connection_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        client = ServerClient(f"http://127.0.0.1:{port}", session)
        with pytest.raises(ConnectionFailed) as e:
            await client.generate(PROMPT, SamplingParams(), IDS.next())
        assert isinstance(e.value, RetryableError) and not e.value.may_be_running
        assert f"127.0.0.1:{port}" in str(e.value)
        assert await client.health(timeout_s=1) is None


# ---- parsing on hand-written payloads ------------------------------------------------------------------------------


def _payload(**meta: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "r", "finish_reason": {"type": "length", "length": 2}, "weight_version": "5",
                               "output_token_logprobs": [[-0.5, 7, None], [None, 8, None]]}
    return {"text": "ab", "output_ids": [7, 8], "meta_info": {**base, **meta}}


@pytest.mark.parametrize("entries, bad", [
    ([["1.5", 7, None], [-1.0, 8, None]], 0),  # a logprob that is a string
    ([[-1.0, 7, None], 8], 1),  # an entry that is not a list
    ([[-1.0, 7, None], [-1.0]], 1),  # no token id
    ([[-1.0, 7, None], {"a": 1}], 1),
    ([[-1.0, 7, None], [-1.0, 8.5, None]], 1),  # a token id that is not an int
])
def test_malformed_logprob_entries_are_named(entries: list[object], bad: int) -> None:
    with pytest.raises(ProtocolError, match=f"logprob entry {bad} .* is not \\[logprob, token_id, text\\]"):
        parse_generate_response(_payload(output_token_logprobs=entries), prompt_len=1, url="u")


def test_parse_defaults_and_null_logprob() -> None:
    result = parse_generate_response(_payload(), prompt_len=3, url="u")
    assert result.logprobs.tolist() == [-0.5, float("-inf")]  # orjson writes -inf as null
    assert result.output_ids.tolist() == [7, 8]
    assert result.prompt_tokens == 3 and result.cached_tokens == 0  # missing on an abort while queued
    # An older server reports no spans: which weights sampled the tokens is unknown, not guessed from the version
    # of the last one (a weight update mid-request would make that too new).
    assert result.weight_versions == () and result.weight_version == "5"
    assert token_versions(result).tolist() == [UNKNOWN_VERSION, UNKNOWN_VERSION]


def test_parse_truncates_extra_logprob_and_rejects_misalignment() -> None:
    empty = {"text": "", "output_ids": [], "meta_info": {"id": "r", "finish_reason": {"type": "abort",
             "message": "Aborted"}, "output_token_logprobs": [[-1.0, 5, None]]}}
    result = parse_generate_response(empty, prompt_len=1, url="u")
    assert len(result.logprobs) == 0 and result.weight_versions == () and result.finish.message == "Aborted"
    with pytest.raises(ProtocolError, match="only 1 logprobs"):
        parse_generate_response(_payload(output_token_logprobs=[[-1.0, 7, None]]), prompt_len=1, url="u")
    with pytest.raises(ProtocolError, match="is for token 9"):
        parse_generate_response(_payload(output_token_logprobs=[[-1.0, 7, None], [-1.0, 9, None]]), prompt_len=1,
                                url="u")
    with pytest.raises(ProtocolError, match="not contiguous"):
        parse_generate_response(_payload(weight_versions=[{"version": "1", "start": 0, "end": 1},
                                                          {"version": "2", "start": 0, "end": 2}]),
                                prompt_len=1, url="u")
    with pytest.raises(ProtocolError, match="finish_reason"):
        parse_generate_response(_payload(finish_reason={"type": "weird"}), prompt_len=1, url="u")


def test_request_ids_fixed_width_and_never_prefixes() -> None:
    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000 and {len(i) for i in ids} == {RID_LENGTH}
    assert a.prefix != b.prefix
    ordered = sorted(ids)  # a prefix would sort right before the ids it prefixes
    assert not any(y.startswith(x) for x, y in zip(ordered, ordered[1:]))
    with pytest.raises(ValueError, match="exactly 12"):
        RequestIds("r-1")
