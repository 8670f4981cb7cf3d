"""The invariants every trajectory must satisfy, checked against the real tokenizer, retriever and server.

Used by the end-to-end tests: lengths line up, tool spans are masked and are exactly the rendered information
blocks of the recorded searches, generated spans are unmasked and carry logprobs and policy versions, and the
recorded logprobs are the server's own (re-scored by a prefill of prompt + response).
"""

from __future__ import annotations

import math

import aiohttp

from ssp.engine.chat import ChatTokenizer
from ssp.engine.prompts import INFO_FOOTER, INFO_HEADER, information_block
from ssp.engine.trajectory import Trajectory
from ssp.retriever.protocol import Retriever


async def check_trajectory(t: Trajectory, chat: ChatTokenizer, retriever: Retriever | None, k: int) -> None:
    t.validate()
    n = len(t.response_ids)
    segments = t.meta["segments"]
    assert [s[1] for s in segments] == [0, *(s[2] for s in segments[:-1])] and (not segments or segments[-1][2] == n)
    tools = [s for s in segments if s[0] == "tool"]
    assert len(tools) == len(t.meta["searches"]), (tools, t.meta["searches"])
    for kind, start, end in segments:
        for i in range(start, end):
            if kind == "gen":
                assert t.loss_mask[i] == 1 and t.policy_versions[i] >= 0
                assert math.isfinite(t.rollout_logprobs[i]) and t.rollout_logprobs[i] <= 0.0
            else:
                assert t.loss_mask[i] == 0 and t.policy_versions[i] == -1 and t.rollout_logprobs[i] == 0.0
    for (_, start, end), query in zip(tools, t.meta["searches"]):
        text = chat.decode(t.response_ids[start:end])
        assert text.startswith(INFO_HEADER) and text.endswith(INFO_FOOTER)
        if retriever is not None:
            (docs,) = await retriever.search([query], k)
            assert text == information_block(docs), "the tool span must be the rendered block of its search"
    generated = "".join(chat.decode(t.response_ids[s:e]) for kind, s, e in segments if kind == "gen")
    if t.meta["finish_reason"] == "answer":
        assert "</answer>" in generated
    if t.meta["finish_reason"] == "question":
        assert "</question>" in generated


async def rescore(url: str, t: Trajectory) -> list[float | None]:
    """The server's logprob of every response token given everything before it (one prefill, nothing generated)."""
    body = {"input_ids": t.prompt_ids + t.response_ids, "return_logprob": True,
            "logprob_start_len": len(t.prompt_ids) - 1,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/generate", json=body) as r:
        assert r.status == 200, await r.text()
        data = await r.json()
    entries = data["meta_info"]["input_token_logprobs"]
    # Entry 0 is the last prompt position (always null); entry j + 1 scores response token j.
    assert len(entries) == len(t.response_ids) + 1
    assert [e[1] for e in entries[1:]] == t.response_ids
    return [e[0] for e in entries[1:]]


async def check_logprobs(url: str, t: Trajectory) -> None:
    scored = await rescore(url, t)
    diffs = [abs(scored[i] - lp) for i, (lp, m) in enumerate(zip(t.rollout_logprobs, t.loss_mask))  # type: ignore[operator]
             if m == 1]
    assert diffs and max(diffs) < 0.05 and sum(diffs) / len(diffs) < 5e-3, (max(diffs), sum(diffs) / len(diffs))
