"""ServerClient and InferencePool against the reference server (`ssp model serve`, SmolLM2-135M-Instruct on CPU):
the same parsing as against SGLang, on real model output (greedy determinism, every finish shape, abort, errors)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ssp.engine.client import ServerClient
from ssp.engine.errors import BadRequest
from ssp.engine.generation import SamplingParams
from ssp.engine.ids import RequestIds
from ssp.engine.inference_config import InferenceConfig
from ssp.engine.pool import InferencePool

pytestmark = pytest.mark.slow

IDS = RequestIds()
EOS = 2  # <|im_end|>


@pytest.fixture
async def client(ref_server: str) -> AsyncIterator[ServerClient]:
    async with aiohttp.ClientSession() as session:
        yield ServerClient(ref_server, session, request_timeout_s=120, admin_timeout_s=120)


@pytest.fixture(scope="module")
def prompt(model_dir: object) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False))


async def test_greedy_is_deterministic_and_parsed(client: ServerClient, prompt: list[int]) -> None:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(EOS,))
    a = await client.generate(prompt, greedy, IDS.next())
    b = await client.generate(prompt, greedy, IDS.next())
    assert a.output_ids == b.output_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len(a.output_ids) == len(a.logprobs) > 0 and all(lp <= 0 for lp in a.logprobs)
    assert a.prompt_tokens == len(prompt) and a.server == client.url
    assert a.weight_versions[-1].end == len(a.output_ids) and a.weight_versions[-1].version == a.weight_version
    if a.finish.type == "stop":
        assert a.finish.matched == EOS and a.output_ids[-1] == EOS
    else:
        assert a.finish.type == "length" and a.finish.matched == 12


async def test_stop_string_and_length_shapes(client: ServerClient, prompt: list[int]) -> None:
    short = await client.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True),
                                  IDS.next())
    assert short.finish.type == "length" and short.finish.matched == 3 and len(short.output_ids) == 3
    stop_word = short.text.strip().split()[0] if short.text.strip() else short.text
    stopped = await client.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=4, stop=(stop_word,),
                                                           no_stop_trim=True), IDS.next())
    assert stopped.finish.type == "stop" and stopped.finish.matched == stop_word
    assert stopped.text.endswith(stop_word)


async def test_abort_by_rid_on_real_model(client: ServerClient, prompt: list[int]) -> None:
    rid = IDS.next()
    task = asyncio.create_task(client.generate(prompt, SamplingParams(max_new_tokens=400, ignore_eos=True), rid))
    await asyncio.sleep(1.0)
    await client.abort(rid)
    result = await asyncio.wait_for(task, 60)
    assert result.finish.type == "abort" and len(result.output_ids) < 400
    assert len(result.logprobs) == len(result.output_ids)


async def test_errors_and_info(client: ServerClient, prompt: list[int]) -> None:
    with pytest.raises(BadRequest, match="context length") as e:
        await client.generate(prompt * 200, SamplingParams(max_new_tokens=4), IDS.next())
    assert client.url in str(e.value)
    assert await client.health(timeout_s=30) == 200
    info = await client.server_info()
    assert info["context_length"] == 2048 and info["max_running_requests"] >= 1
    assert "weight_version" in await client.model_info()


async def test_pool_over_the_reference_server(ref_server: str, prompt: list[int]) -> None:
    cfg = InferenceConfig(server_urls=(ref_server,), request_timeout_s=120)
    async with InferencePool(cfg) as pool:
        results = await asyncio.gather(*(pool.generate(prompt, SamplingParams(max_new_tokens=4), affinity="g")
                                         for _ in range(2)))
        assert {r.server for r in results} == {ref_server}
        assert pool.metrics().servers[0].capacity == (await pool.server_infos())[ref_server]["max_running_requests"]
