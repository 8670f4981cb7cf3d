"""The reference server computes what transformers computes: greedy tokens equal `model.generate`, and every
returned logprob equals log_softmax(logits / T) from a plain forward pass over the same tokens, within 1e-4 (fp32).
Concurrent requests (one padded batch in the server) must agree too: that is what continuous batching risks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?"]
NEW_TOKENS = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Iterator[tuple[Any, list[list[int]]]]:
    """The same checkpoint in transformers, and chat-formatted prompts of different lengths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the server: multi-threaded small matmuls crawl on a busy shared CPU
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    yield model, prompts
    torch.set_num_threads(threads)


async def generate(session: aiohttp.ClientSession, url: str, prompt: list[int], params: dict[str, Any]) -> Any:
    async with session.post(url + "/generate", json={"input_ids": prompt, "return_logprob": True,
                                                     "sampling_params": params}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


@torch.no_grad()
def reference_logprobs(model: Any, prompt: list[int], output: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) of each output token, from one forward pass over prompt + output."""
    ids = torch.tensor([prompt + output])
    logits = model(ids).logits[0, len(prompt) - 1: len(prompt) + len(output) - 1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(output).unsqueeze(1)).squeeze(1).tolist()


def served_logprobs(out: dict[str, Any]) -> list[float]:
    return [e[0] for e in out["meta_info"]["output_token_logprobs"]]


async def test_greedy_matches_transformers_generate(ref_server: str, hf: tuple[Any, list[list[int]]]) -> None:
    model, prompts = hf
    async with aiohttp.ClientSession() as session:
        out = await generate(session, ref_server, prompts[0], {"temperature": 0, "max_new_tokens": NEW_TOKENS})
    expected = model.generate(torch.tensor([prompts[0]]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out["output_ids"] == expected[0, len(prompts[0]):].tolist()
    ref = reference_logprobs(model, prompts[0], out["output_ids"], 1.0)
    assert served_logprobs(out) == pytest.approx(ref, abs=TOL)


async def test_concurrent_greedy_requests_match_one_by_one(ref_server: str,
                                                           hf: tuple[Any, list[list[int]]]) -> None:
    model, prompts = hf
    async with aiohttp.ClientSession() as session:
        outs = await asyncio.gather(*(generate(session, ref_server, p, {"temperature": 0,
                                                                        "max_new_tokens": NEW_TOKENS})
                                      for p in prompts))
    for prompt, out in zip(prompts, outs):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out["output_ids"] == expected[0, len(prompt):].tolist()
        assert served_logprobs(out) == pytest.approx(reference_logprobs(model, prompt, out["output_ids"], 1.0),
                                                     abs=TOL)


async def test_sampled_logprobs_are_temperature_scaled(ref_server: str, hf: tuple[Any, list[list[int]]]) -> None:
    """T = 0.7 with top-p/top-k: the logprob is of the T-scaled full distribution, before truncation (SGLang)."""
    model, prompts = hf
    params = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_new_tokens": NEW_TOKENS, "sampling_seed": 7,
              "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        out = await generate(session, ref_server, prompts[1], params)
    assert len(out["output_ids"]) == NEW_TOKENS
    ref = reference_logprobs(model, prompts[1], out["output_ids"], 0.7)
    assert served_logprobs(out) == pytest.approx(ref, abs=TOL)
    unscaled = reference_logprobs(model, prompts[1], out["output_ids"], 1.0)
    assert served_logprobs(out) != pytest.approx(unscaled, abs=TOL), "logprobs must use the temperature"


async def test_prefix_cache_reuse_computes_the_same(ref_server: str, hf: tuple[Any, list[list[int]]]) -> None:
    """A second turn that extends a finished request reuses its KV (cached_tokens) and still matches transformers."""
    model, prompts = hf
    async with aiohttp.ClientSession() as session:
        first = await generate(session, ref_server, prompts[2], {"temperature": 0, "max_new_tokens": 3,
                                                                 "ignore_eos": True})
        turn2 = prompts[2] + first["output_ids"] + prompts[0][-4:]
        second = await generate(session, ref_server, turn2, {"temperature": 0, "max_new_tokens": 3})
    assert second["meta_info"]["cached_tokens"] >= len(prompts[2]) + 2
    expected = model.generate(torch.tensor([turn2]), max_new_tokens=3, do_sample=False)
    assert second["output_ids"] == expected[0, len(turn2):].tolist()
    assert served_logprobs(second) == pytest.approx(
        reference_logprobs(model, turn2, second["output_ids"], 1.0), abs=TOL)
