"""Reference-server behaviour beyond the SGLang conformance suite: state is consistent when a response arrives,
and the prefix cache is dropped by /flush_cache."""

from __future__ import annotations

from typing import Any

import aiohttp

PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


async def generate(session: aiohttp.ClientSession, url: str, ids: list[int], n: int) -> Any:
    async with session.post(url + "/generate", json={"input_ids": ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": n, "ignore_eos": True}}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_flush_right_after_a_response_and_cache_reuse(ref_server: str) -> None:
    async with aiohttp.ClientSession() as s:
        first = await generate(s, ref_server, PROMPT, 2)
        # The finished request must already be out of the running batch when its response arrives.
        async with s.post(ref_server + "/flush_cache") as r:
            assert r.status == 200, await r.text()
        extended = PROMPT + first["output_ids"] + [198]
        again = await generate(s, ref_server, PROMPT, 2)
        assert again["meta_info"]["cached_tokens"] == 0, "the flush dropped the prefix cache"
        reuse = await generate(s, ref_server, extended, 1)
        assert reuse["meta_info"]["cached_tokens"] == len(PROMPT) + 1
