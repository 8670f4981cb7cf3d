"""The simulated backend: its timing model (step records follow the profile's formulas exactly), scheduling limits
(slots, chunked prefill, KV retraction, prefix cache), pause/abort/weight-version behaviour, and the SSP shapes of
what it says. Runs the backend in-process with the real SmolLM2 tokenizer and a fast time scale; the HTTP path is
exercised by tests/engine/test_client.py and test_pool.py."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import statistics
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ssp.config import ConfigError
from ssp.serving.backend import ABORTED, ABORTED_QUEUED, Finish, GenerateOutput, GenerateRequest, SamplingOptions
from ssp.serving.sim import SimBackend
from ssp.serving.sim_profile import DEFAULT_PROFILE, PROFILES_DIR, SimProfile, load_profile
from ssp.serving.sim_text import PROMPT_TAIL_TOKENS, SimText, TokenizerFile

Factory = Callable[..., SimBackend]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> TokenizerFile:
    return TokenizerFile(model_dir)


def _profile(**sections: dict[str, Any]) -> SimProfile:
    """The 7B profile with some fields of some sections replaced, e.g. server={"max_running_requests": 4}."""
    profile = load_profile()
    return dataclasses.replace(profile, **{name: dataclasses.replace(getattr(profile, name), **fields)
                                           for name, fields in sections.items()})


@pytest.fixture
async def make(tokenizer: TokenizerFile) -> AsyncIterator[Factory]:
    started: list[SimBackend] = []

    def factory(time_scale: float = 200.0, **sections: dict[str, Any]) -> SimBackend:
        backend = SimBackend(_profile(**sections), tokenizer, tokenizer_path="t", time_scale=time_scale)
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        await backend.close()


_counter = iter(range(10**9))


def _req(prompt: list[int], max_new_tokens: int = 100, *, ignore_eos: bool = True, **kw: Any) -> GenerateRequest:
    sampling = SamplingOptions(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, **kw)
    return GenerateRequest(rid=f"t-{next(_counter):09d}", input_ids=prompt, sampling=sampling, return_logprob=True)


async def _run(backend: SimBackend, req: GenerateRequest) -> GenerateOutput:
    last = None
    async for out in backend.generate(req):
        last = out
    assert last is not None and last.finish is not None
    return last


async def _run_all(backend: SimBackend, reqs: list[GenerateRequest]) -> list[GenerateOutput]:
    return list(await asyncio.gather(*(_run(backend, r) for r in reqs)))


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


async def test_single_request_steps_follow_the_formula(make: Factory) -> None:
    backend = make()
    await backend.start()
    out = await _run(backend, _req(_prompt(300), 20))
    assert len(out.output_ids) == len(out.output_logprobs) == 20 and out.finish == Finish("length", length=20)
    steps = list(backend.stats.recent)
    d, p = backend.profile.decode, backend.profile.prefill
    # Step 0 prefills the 300-token prompt (and yields the first token); then 19 decode steps, K growing by one.
    assert (steps[0].batch, steps[0].prefill_tokens) == (0, 300)
    assert steps[0].prefill_ms == pytest.approx(1000 * 300 * (1 + 150 / p.attn_ctx_half_tokens) / p.tokens_per_s)
    assert steps[0].decode_ms == pytest.approx(d.a_ms)
    assert [(s.batch, s.kv_tokens) for s in steps[1:]] == [(1, 301 + i) for i in range(19)]
    for s in steps[1:]:
        assert s.decode_ms == pytest.approx(d.a_ms + d.b_ms_per_request + d.c_ms_per_kv_token * s.kv_tokens)
        assert s.duration_s == pytest.approx(s.decode_ms / 1000)
    assert backend.stats.sim_time_s == pytest.approx(sum(s.duration_s for s in steps))


async def test_batch_limits_eager_penalty_and_token_accounting(make: Factory) -> None:
    backend = make(server={"max_running_requests": 32, "cuda_graph_max_bs": 8})
    await backend.start()
    outs = await _run_all(backend, [_req(_prompt(200, i % 3), 30 + i) for i in range(64)])
    steps = list(backend.stats.recent)
    d = backend.profile.decode
    assert max(s.batch for s in steps) == 32
    for s in steps:
        eager = d.eager_penalty_ms if s.batch > 8 else 0.0
        assert s.decode_ms == pytest.approx(d.a_ms + d.b_ms_per_request * s.batch + d.c_ms_per_kv_token * s.kv_tokens
                                            + eager)
        assert s.prefill_tokens <= backend.profile.server.chunked_prefill_tokens
    # Every output token but the first (made by the prefill step) comes from one decode step of the batch.
    assert sum(s.batch for s in steps) == sum(len(o.output_ids) - 1 for o in outs)
    assert sum(s.prefill_tokens for s in steps) == sum(o.prompt_tokens - o.cached_tokens for o in outs)
    assert any(o.cached_tokens > 0 for o in outs)  # later arrivals reuse the three shared prompts


async def test_chunked_prefill_spreads_a_long_prompt(make: Factory) -> None:
    backend = make(server={"chunked_prefill_tokens": 4096})
    await backend.start()
    await _run(backend, _req(_prompt(10000), 2))
    steps = list(backend.stats.recent)
    assert [s.prefill_tokens for s in steps[:3]] == [4096, 4096, 1808]
    p = backend.profile.prefill
    for s, before in zip(steps[:3], (0, 4096, 8192)):
        expected = 1000 * s.prefill_tokens * (1 + (before + s.prefill_tokens / 2) / p.attn_ctx_half_tokens)
        assert s.prefill_ms == pytest.approx(expected / p.tokens_per_s)


async def test_prefix_cache_hits_flush_and_disable(make: Factory) -> None:
    backend = make()
    await backend.start()
    prompt = _prompt(1000, 7)
    assert (await _run(backend, _req(prompt, 2))).cached_tokens == 0
    again = await _run(backend, _req(prompt + [5, 6], 2))
    assert again.cached_tokens == 960  # whole 64-token blocks of the shared prefix
    assert backend.stats.recent[-2].prefill_tokens == 1002 - 960
    await backend.flush_cache()
    assert (await _run(backend, _req(prompt, 2))).cached_tokens == 0
    off = make(prefix_cache={"enabled": False})
    await off.start()
    await _run(off, _req(prompt, 2))
    assert (await _run(off, _req(prompt, 2))).cached_tokens == 0


async def test_next_turn_hits_the_prompt_and_the_output_across_a_block_boundary(make: Factory) -> None:
    """A finished request's output continues its prompt's hash chain (the prompt is hashed once, on arrival): the
    next turn, prompt + output + a tool block, finds every whole block of prompt + output cached, including the
    block that straddles the two."""
    backend = make()
    await backend.start()
    prompt = _prompt(1000, 8)  # 15 whole 64-token blocks and 40 tokens over
    out = await _run(backend, _req(prompt, 100))
    turn = prompt + out.output_ids + _prompt(30, 9)
    assert (await _run(backend, _req(turn, 2))).cached_tokens == 1088  # 17 whole blocks of the 1100


async def test_kv_capacity_retracts_and_recomputes(make: Factory) -> None:
    backend = make(server={"kv_capacity_tokens": 2500})
    await backend.start()
    outs = await _run_all(backend, [_req(_prompt(500, i), 400) for i in range(4)])
    assert all(len(o.output_ids) == 400 and o.finish == Finish("length", length=400) for o in outs)
    assert backend.stats.retractions > 0 and sum(o.num_retractions for o in outs) == backend.stats.retractions
    assert all(s.kv_tokens <= 2500 for s in backend.stats.recent)


async def test_pause_retract_resume_splits_weight_spans(make: Factory) -> None:
    backend = make(time_scale=2.0)  # 300 steps of ~6.3 ms: about a second of wall time
    await backend.start()
    tasks = [asyncio.create_task(_run(backend, _req(_prompt(100, i), 300))) for i in range(3)]
    await asyncio.sleep(0.2)
    await backend.pause("retract")
    assert backend.is_idle(ignore_queued=True) and not backend.is_idle(ignore_queued=False)
    backend.set_weight_version("1")
    await backend.resume()
    outs = await asyncio.gather(*tasks)
    for out in outs:
        assert out.num_retractions == 1 and len(out.output_ids) == 300
        (v0, s0, e0), (v1, s1, e1) = out.weight_spans
        assert (v0, s0, v1, s1, e1) == ("default", 0, "1", e0, 300) and 0 < e0 < 300
        assert out.weight_version == "1"


async def test_sim_clock_splits_time_into_decode_prefill_recompute_and_pause(make: Factory) -> None:
    backend = make(time_scale=2.0)
    await backend.start()
    tasks = [asyncio.create_task(_run(backend, _req(_prompt(600, i), 300))) for i in range(3)]
    await asyncio.sleep(0.2)
    await backend.pause("retract")
    await backend.flush_cache()  # as a weight update does: the retracted requests lose their cached prompts
    await asyncio.sleep(0.1)
    await backend.resume()
    await asyncio.gather(*tasks)
    clock = backend.sim_clock()
    # 0.1 s of wall time at x2, plus the modeled pause and resume latencies.
    spec = backend.profile.weight_update
    assert clock["paused_s"] == pytest.approx(0.2 + (spec.pause_ms + spec.resume_ms) / 1000, abs=0.06)
    assert clock["decode_s"] + clock["prefill_s"] == pytest.approx(backend.stats.sim_time_s)
    # Decoded tokens: each (re)join's prefill step emits one of the 900 itself.
    assert clock["prefill_s"] > 0 and 900 - 2 * 3 <= clock["output_tokens"] < 900
    # Each comes back with its whole prompt and output so far to prefill again.
    assert clock["recomputed_tokens"] >= 3 * 600 and clock["retractions"] == 3
    assert clock["prefill_tokens"] >= 3 * 600 + clock["recomputed_tokens"]
    busy = clock["decode_s"] + clock["prefill_s"] + clock["paused_s"]
    assert busy <= clock["elapsed_s"] + 1e-6


async def test_lag_is_counted_from_arrival_and_kept_after_idle(make: Factory) -> None:
    """A host that blocks the server's loop when work arrives (here: 0.3 s of synchronous work right after the
    request) makes the server late by that much; the lag stays in sim_clock's behind_s after the server went idle,
    so a bench comparing two readings sees it whenever it happened."""
    import time

    backend = make(time_scale=1.0)
    await backend.start()
    await _run(backend, _req(_prompt(100), 5))  # a stretch on time first
    assert backend.sim_clock()["behind_s"] < 0.05
    task = asyncio.create_task(_run(backend, _req(_prompt(100, 1), 5)))
    await asyncio.sleep(0)  # the request arrives
    time.sleep(0.3)  # the host is busy elsewhere before the server's loop gets to step
    await task
    await asyncio.sleep(0.05)  # idle again
    behind = backend.sim_clock()["behind_s"]
    assert 0.25 <= behind < 0.6


async def test_abort_running_and_queued(make: Factory) -> None:
    backend = make(time_scale=20.0, server={"max_running_requests": 1})
    await backend.start()
    running = asyncio.create_task(_run(backend, _req(_prompt(50), 5000)))
    queued = asyncio.create_task(_run(backend, _req(_prompt(50), 5)))
    await asyncio.sleep(0.2)
    await backend.abort("", abort_all=True)
    r, q = await asyncio.gather(running, queued)
    assert r.finish == ABORTED and 0 < len(r.output_ids) < 5000 and r.ran
    assert q.finish == ABORTED_QUEUED and not q.ran and q.output_ids == []
    assert backend.is_idle(ignore_queued=False)


async def test_thousands_of_concurrent_requests(make: Factory) -> None:
    backend = make(time_scale=1000.0)
    await backend.start()
    outs = await _run_all(backend, [_req(_prompt(64, i % 10), 50) for i in range(3000)])
    assert len(outs) == 3000 and all(len(o.output_ids) == 50 for o in outs)
    assert max(s.batch for s in backend.stats.recent) > 1000  # one step decodes them together


# ---- what the sim says ---------------------------------------------------------------------------------------------


def _chat(tok: TokenizerFile, user: str) -> list[int]:
    return tok.encode(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def _rollout(text: SimText, tok: TokenizerFile, prompt: list[int]) -> tuple[int, list[int], str]:
    """(searches, generated tokens per turn, text of the last turn); a runaway last turn has no closing tag."""
    # Driven the way the engine does it: append the output ids and a tool result, repeat.
    ids, lengths = list(prompt), []
    sampling = SamplingOptions(max_new_tokens=2048, stop=("</search>", "</answer>", "</question>"))
    tool = tok.encode("\n\n<information>Doc 1 (Title: X) some text</information>\n\n", add_special_tokens=False)
    for _ in range(10):
        plan = text.plan(ids, sampling)
        ids += plan.output_ids
        lengths.append(len(plan.output_ids))
        if plan.finish.matched != "</search>":
            return len(lengths) - 1, lengths, "".join(plan.text_pieces)
        ids += tool
    return 10, lengths, "".join(plan.text_pieces)


def test_solver_searches_follow_the_profile_and_lengths_are_heavy_tailed(tokenizer: TokenizerFile) -> None:
    profile = load_profile()
    text = SimText(tokenizer, shapes=profile.shapes, spec=profile.sim, rng=random.Random(1))
    prompt = _chat(tokenizer, "Answer with search. Question: who founded the city?")
    rollouts = [_rollout(text, tokenizer, prompt) for _ in range(1500)]
    searches = collections.Counter(min(n, 9) for n, _, _ in rollouts)
    weights = profile.shapes.solver.search_weights
    for k in (0, 1, 2, 3):  # the common counts, within sampling error
        assert searches[k] / 1500 == pytest.approx(weights[k] * (1 - 0.02), abs=0.035)
    mean = statistics.mean(n for n, _, _ in rollouts)
    assert 2.2 < mean < 2.9  # the profile's solver search_weights average about 2.4
    search_turns = [n for _, lengths, _ in rollouts for n in lengths[:-1]]
    median = statistics.median(search_turns)
    assert 70 < median < 115  # gen_turn median 90 (plus the closing tags)
    assert statistics.quantiles(search_turns, n=100)[98] > 2.5 * median  # heavy tail
    finals = [final for n, lengths, final in rollouts if n < 10 and lengths[-1] < 2048]  # not a runaway turn
    assert len(finals) > 1400 and all("<answer>" in f and f.rstrip().endswith("</answer>") for f in finals)


def test_proposer_question_is_answered_by_a_later_solver(tokenizer: TokenizerFile) -> None:
    profile = load_profile()
    spec = dataclasses.replace(profile.sim, correct_answer_p=1.0)
    text = SimText(tokenizer, shapes=profile.shapes, spec=spec, rng=random.Random(2))
    proposer = _chat(tokenizer, "The answer I provided is: Marie Curie. You need to create a question.")
    final = ""
    while "<question>" not in final:  # a no-answer rollout ends at the turn cap without a question; draw again
        _, _, final = _rollout(text, tokenizer, proposer)
    question = final.split("<question>")[1].split("</question>")[0].strip()
    solver = _chat(tokenizer, f"Search as needed. Question: {question}")
    n, _, answer = _rollout(text, tokenizer, solver)
    if n < 10:
        assert "<answer> Marie Curie </answer>" in answer
    verifier = _chat(tokenizer, f"Documents:\nDoc 1 (Title: X) text\n\nUsing only the documents above, answer the "
                               f"question.\nQuestion: {question}")
    verify = text.plan(verifier, SamplingOptions(max_new_tokens=70))  # one short answer, no search
    assert verify.role == "verifier" and verify.finish.type == "stop"
    assert "Marie Curie" in "".join(verify.text_pieces)


class _CountingTokenizer:
    """A tokenizer that records how many ids each decode call got."""

    def __init__(self, tok: TokenizerFile) -> None:
        self._tok = tok
        self.eos_token_id = tok.eos_token_id
        self.decoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded.append(len(ids))
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self._tok)


def test_a_long_verifier_prompt_is_read_from_its_tail(tokenizer: TokenizerFile) -> None:
    """A verifier prompt with thousands of tokens of documents is recognised, and its question answered, from the
    end of the prompt alone: the sim decodes at most PROMPT_TAIL_TOKENS of it, once per distinct prompt."""
    profile = load_profile()
    counting = _CountingTokenizer(tokenizer)
    text = SimText(counting, shapes=profile.shapes, spec=dataclasses.replace(profile.sim, correct_answer_p=1.0),
                   rng=random.Random(3))
    proposer = _chat(tokenizer, "The answer I provided is: Marie Curie. You need to create a question.")
    final = ""
    while "<question>" not in final:
        _, _, final = _rollout(text, tokenizer, proposer)
    question = final.split("<question>")[1].split("</question>")[0].strip()
    documents = "\n\n".join(f"Doc {k} (Title: T{k})\n" + " ".join(["words of a passage"] * 40) for k in range(1, 30))
    verifier = _chat(tokenizer, f"Documents:\n{documents}\n\nUsing only the documents above, answer the question."
                                f"\nQuestion: {question}")
    assert len(verifier) > 4 * PROMPT_TAIL_TOKENS
    counting.decoded.clear()
    for _ in range(3):  # a verifier group: the same prompt again is not read again
        plan = text.plan(verifier, SamplingOptions(max_new_tokens=70))
        assert plan.role == "verifier" and "Marie Curie" in "".join(plan.text_pieces)
    assert [n for n in counting.decoded if n > 1] == [PROMPT_TAIL_TOKENS]


def test_profiles_load_and_bad_keys_name_the_file(tmp_path: Path) -> None:
    names = {p.name for p in PROFILES_DIR.glob("*.toml")}
    assert {"qwen2.5-7b-h100-tp1.toml", "qwen2.5-32b-h100-tp4.toml"} <= names
    big = load_profile(PROFILES_DIR / "qwen2.5-32b-h100-tp4.toml")
    assert (big.profile.gpus_per_server, big.decode.a_ms, big.server.kv_capacity_tokens) == (4, 9.2, 850_000)
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_PROFILE.read_text() + "\n[sim]\ntime_scael = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*unknown key 'sim\.time_scael'"):
        load_profile(bad)
