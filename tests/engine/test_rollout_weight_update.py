"""A weight update in the middle of rollouts (against a simulated server, real HTTP): with the servers paused in
"abort" mode the in-flight generations come back partial and are resumed (prompt + partial output re-sent), and
every token keeps the policy version that produced it; nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from scripted_policy import TinyRetriever

from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import RolloutConfig, SearchBatcherConfig
from ssp.engine.inference_config import InferenceConfig
from ssp.engine.pool import InferencePool
from ssp.engine.prompts import solver_messages
from ssp.engine.rollout import RolloutRunner, RolloutSpec
from ssp.engine.search_batcher import SearchBatcher


async def test_abort_pause_resumes_rollouts_and_keeps_versions(sim_launcher, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    server = sim_launcher(time_scale=2.0)  # slow enough that generations are in flight when the pause lands
    chat = ChatTokenizer.load(model_dir)
    spec = RolloutSpec(final_open="<answer>", final_close="</answer>", search=True, temperature=1.0)
    cfg = RolloutConfig(max_new_tokens_per_turn=400, max_turns=4, max_response_tokens=6000)
    batcher = SearchBatcher(TinyRetriever(), SearchBatcherConfig(window_ms=1), k=2)
    async with InferencePool(InferenceConfig(server_urls=(server.url,))) as pool:
        runner = RolloutRunner(pool, chat, batcher, cfg)
        prompt = await chat.render(solver_messages("Which river flows through the capital of Austria?"))
        tasks = [asyncio.create_task(runner.run(prompt, spec, affinity=f"r{i}")) for i in range(16)]
        await asyncio.sleep(0.5)
        assert runner.active > 0
        await pool.pause("abort")  # in-flight requests return partial output with finish "abort"
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/update_weight_version", json={"new_version": "1"}) as r:
                assert r.status == 200, await r.text()
        await pool.continue_()
        try:
            rollouts = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()
    assert sum(r.resumes for r in rollouts) >= 1
    for ro in rollouts:
        gen = [v for v, m in zip(ro.versions, ro.loss_mask) if m == 1]
        assert gen and all(v in (0, 1) for v in gen)
        assert gen == sorted(gen)  # old weights first, then the new ones; never back
        assert len(ro.response_ids) == len(ro.logprobs) == len(ro.versions) == len(ro.loss_mask)
    assert any(1 in ro.versions for ro in rollouts) and any(0 in ro.versions for ro in rollouts)
