"""The engine end to end on real parts: the SmolLM2 reference server, the Tantivy demo index, real sockets.

- `ssp rollout`'s function against the reference server writes frames whose trajectories line up with the real
  tokenizer, retriever and server (every invariant in invariants.py, logprobs re-scored by the server);
- real self-play with prefilled opening tags (game.*_prefill) gives proposer, verifier and solver trajectories that
  line up the same way;
- the verifier and solver phases of the game on a given question, on the same server, line up the same way;
- a killed inference server (a simulated one, killed mid-run) and a retriever that stops answering lose no finished
  group: the run ends, reports the failed episodes, and every finished group is in the file.
"""

from __future__ import annotations

import asyncio
import json
from array import array
from pathlib import Path

import pytest
from invariants import check_logprobs, check_trajectory

from ssp.config import load_config
from ssp.engine.assemble import open_engine, run_engine, served_version
from ssp.engine.chat import ChatTokenizer
from ssp.engine.config import EngineConfig
from ssp.engine.game import Proposal
from ssp.engine.rollout import Rollout
from ssp.engine.seeds import Seed
from ssp.engine.stream import read_frames
from ssp.engine.trajectory import Trajectory, unpack_group
from ssp.paths import CONFIGS_DIR
from ssp.retriever.tantivy_index import TantivyRetriever
from ssp.run_config import SSPConfig

pytestmark = pytest.mark.slow

# Small budgets: the reference server runs a 135M model on 2 shared CPU cores.
TINY = [
    "rollout.max_turns=2", "rollout.max_new_tokens_per_turn=20", "rollout.max_response_tokens=300",
    "rollout.max_context_tokens=1500", "retriever.topk=2",
    "game.solver_group_size=2", "game.verify_samples=2", "game.verify_max_new_tokens=12", "game.distractors=1",
    # Lenient checks and threshold: a 135M model rarely writes a valid question; the test is about the plumbing.
    "game.checks.min_chars=1", "game.checks.min_words=1", "game.checks.min_searches=0",
    "game.checks.leak_in_search_queries=false", "game.verify_threshold=0.0",
    "scheduler.max_inflight=1", "scheduler.metrics_interval_s=1.0",
    # SSP's protocol, not the demo's tiny-model curriculum: no scaffold, the first turn opened with "<search>", 2-3 hops.
    "game.proposer_scaffold=false", 'game.proposer_prefill="<search>"', "scheduler.hops_min=2", "scheduler.hops_max=3",
]


def config(url: str, index: Path, model_dir: Path, *extra: str) -> EngineConfig:
    return load_config(SSPConfig, CONFIGS_DIR / "demo.toml", [
        f'inference.server_urls=["{url}"]', f'retriever.index_dir="{index}"', f'rollout.tokenizer_dir="{model_dir}"',
        *TINY, *extra]).engine()


# The simulated server needs realistic turn budgets: it takes a request with max_new_tokens <= 70 for a verifier's.
SIM = ["rollout.max_new_tokens_per_turn=200", "rollout.max_response_tokens=4000", "rollout.max_context_tokens=12000",
       "rollout.max_turns=4", "game.verify_max_new_tokens=70"]


def trajectories(path: Path) -> list[Trajectory]:
    return [t for payload in read_frames(path) for t in unpack_group(payload)]


async def test_rollout_on_the_reference_server_lines_up(ref_server: str, demo_index: Path, model_dir: Path,
                                                        tmp_path: Path) -> None:
    cfg = config(ref_server, demo_index, model_dir)
    out = tmp_path / "demo.frames"
    summary = await run_engine(cfg, episodes=1, out=out, metrics_path=tmp_path / "m.jsonl")
    assert summary["episodes_finished"] == 1 and summary["frames_sent"] == 1, summary
    trajs = trajectories(out)
    assert trajs[0].role == "proposer" and trajs[0].meta["hops"] in (2, 3)
    chat = ChatTokenizer.load(model_dir)
    retriever = TantivyRetriever(demo_index, threads=1)
    try:
        for t in trajs:
            await check_trajectory(t, chat, retriever, k=2)
        for t in {t.role: t for t in trajs}.values():  # re-score one trajectory per role (a prefill each)
            await check_logprobs(ref_server, t)
    finally:
        await retriever.close()
    from ssp.engine.prompts import proposer_messages

    p = trajs[0]
    assert p.prompt_ids == (await chat.render(proposer_messages(p.meta["answer"][0], p.meta["hops"]),
                                              prefill=cfg.game.proposer_prefill)).tolist()
    assert {t.group_id for t in trajs} == {p.group_id}
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["event"] == "summary"


async def test_self_play_with_prefills_yields_all_three_roles_that_line_up(ref_server: str, demo_index: Path,
                                                                          model_dir: Path, tmp_path: Path) -> None:
    """Real self-play on SmolLM2: the game's own proposer writes the question that the verifier and solvers get.

    SmolLM2-135M never opens a tag by itself; with the proposer's turn prefilled with "<question>" (game.
    proposer_prefill) it writes one, and greedy decoding for the seed "M.I.T." closes it within the budget (it was
    picked for that: greedily 5 of 40 seed/hop prompts close the tag, at temperature 1 about 4 in 16 proposals do).
    Lenient checks let that question through, so the verifier and solver phases run on it."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"answer": "M.I.T.", "type": "entity"}\n')
    cfg = config(ref_server, demo_index, model_dir, f'scheduler.seeds_file="{seeds}"', "scheduler.hops_max=2",
                 "rollout.max_new_tokens_per_turn=32", 'game.proposer_prefill="<question>"',
                 "game.proposer_temperature=0.0", 'game.verifier_prefill="<answer>"', 'game.solver_prefill="<search>"')
    out = tmp_path / "self-play.frames"
    summary = await run_engine(cfg, episodes=1, out=out)
    assert summary["episodes_finished"] == 1, summary
    trajs = trajectories(out)
    roles = [t.role for t in trajs]
    assert roles == ["proposer", "verifier", "verifier", "solver", "solver"], [t.meta for t in trajs]
    p = trajs[0]
    assert p.meta["finish_reason"] == "question" and p.meta["question"]
    chat = ChatTokenizer.load(model_dir)
    from ssp.engine.prompts import proposer_messages, solver_messages

    # The prefill is the end of the prompt (never trained); the response starts after it.
    assert p.prompt_ids == (await chat.render(proposer_messages("M.I.T.", 2), prefill="<question>")).tolist()
    solver = trajs[3]
    assert solver.prompt_ids == (await chat.render(solver_messages(p.meta["question"]),
                                                  prefill="<search>")).tolist()
    assert chat.decode(trajs[1].prompt_ids).endswith("<answer>")
    retriever = TantivyRetriever(demo_index, threads=1)
    try:
        for t in trajs:
            await check_trajectory(t, chat, retriever, k=2)
            assert p.meta["question"] in chat.decode(t.prompt_ids) or t.role == "proposer"
        for t in {t.role: t for t in trajs}.values():  # one re-scored per role
            await check_logprobs(ref_server, t)
    finally:
        await retriever.close()


async def test_verifier_and_solvers_on_the_reference_server_line_up(ref_server: str, demo_index: Path,
                                                                    model_dir: Path) -> None:
    cfg = config(ref_server, demo_index, model_dir)
    async with open_engine(cfg) as parts:
        assert await served_version(parts.pool) == 0  # a server never updated reports "default": version 0
        game = parts.game
        # A proposal with a given question and real search results from the index as its documents.
        (docs,) = await parts.retriever.search(["Scott Derrickson director"], 2)
        rollout = Rollout(prompt_ids=array("l", [1]), docs=[docs])
        seed = Seed(("Scott Derrickson",), "person", 2)
        proposal = Proposal("e2e-0", seed, rollout, "Who directed the 2016 film Doctor Strange?", [])
        v = await game.verify(proposal)
        assert v is not None and v.passed and len(v.samples) == 2  # threshold 0: always passes
        solvers = await game.solve(proposal)
        result = game.assemble(proposal, v, solvers)
    roles = [t.role for t in result.trajectories]
    assert roles.count("verifier") == 2 and roles[0] == "proposer"
    chat = ChatTokenizer.load(model_dir)
    retriever = TantivyRetriever(demo_index, threads=1)
    try:
        for t in result.trajectories[1:]:  # the hand-made proposer record has no generated tokens
            await check_trajectory(t, chat, retriever, k=2)
            assert "Doctor Strange" in chat.decode(t.prompt_ids)
        for t in {t.role: t for t in result.trajectories[1:]}.values():  # one re-scored per role
            await check_logprobs(ref_server, t)
    finally:
        await retriever.close()
    assert len([t for t in result.trajectories if t.role == "solver"]) == 2


async def test_killed_server_loses_no_finished_group(sim_launcher, demo_index: Path, model_dir: Path,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    server = sim_launcher(time_scale=50.0)
    cfg = config(server.url, demo_index, model_dir, *SIM, "scheduler.max_inflight=4", "inference.max_retries=1",
                 "inference.queue_timeout_s=2.0", "inference.health_check_interval_s=0.5",
                 "inference.retry_backoff_s=0.05")
    out = tmp_path / "killed.frames"
    run = asyncio.create_task(run_engine(cfg, episodes=12, out=out))
    for _ in range(600):  # wait until some groups are on disk, then kill the server mid-run
        await asyncio.sleep(0.1)
        if out.exists() and len(read_frames(out)) >= 1:
            break
    server.kill()
    summary = await asyncio.wait_for(run, 120)
    assert summary["episodes_failed"] > 0, summary
    assert summary["episodes_finished"] + summary["episodes_failed"] == 12
    groups = read_frames(out)
    assert len(groups) == summary["episodes_finished"] >= 1 and summary["frames_spilled"] == 0
    assert set(summary["failure_reasons"]) <= {"ConnectionFailed", "NoServerAvailable", "RequestTimeout"}


async def test_retriever_that_stops_answering_fails_only_its_searches(sim_server: str, demo_index: Path,  # type: ignore[no-untyped-def]
                                                                      model_dir: Path, tmp_path: Path) -> None:
    cfg = config(sim_server, demo_index, model_dir, *SIM, "scheduler.max_inflight=4", "search.timeout_s=1.0",
                 'retriever.kind="faulty_retriever:HangAfter"',
                 f'retriever.options={{index_dir = "{demo_index}", hang_after = 6}}')
    out = tmp_path / "hang.frames"
    summary = await run_engine(cfg, episodes=12, out=out)
    assert summary["episodes_failed"] > 0 and summary["search_timeouts"] > 0, summary
    assert summary["failure_reasons"] == {"SearchError": summary["episodes_failed"]}
    assert summary["episodes_finished"] + summary["episodes_failed"] == 12
    assert len(read_frames(out)) == summary["episodes_finished"]
