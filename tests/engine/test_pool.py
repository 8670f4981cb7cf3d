"""InferencePool over real simulated servers (separate processes, 127.0.0.1): affinity, least-loaded routing, slots
and the waiting queue, a killed server (requests rerouted, none lost) and its re-admission, abort by rid and by
cancellation, admin fan-out, router mode, lifecycle and config errors."""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import pytest

from ssp.config import ConfigError, load_config
from ssp.engine.errors import BadRequest, ConnectionFailed, NoServerAvailable
from ssp.engine.generation import SLOT_PRIORITY, SamplingParams
from ssp.engine.inference_config import InferenceConfig
from ssp.engine.pool import InferencePool
from ssp.processes import free_port
from ssp.run_config import SSPConfig

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 2, 198, 1, 4093, 198]
SHORT = SamplingParams(max_new_tokens=300)
LONG = SamplingParams(max_new_tokens=2000, ignore_eos=True)  # the sim runs these to the budget (~0.7 s at 20x)


@pytest.fixture(scope="module")
def pair(sim_launcher) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    return sim_launcher().url, sim_launcher().url


def _cfg(urls: tuple[str, ...], **kw: object) -> InferenceConfig:
    base: dict[str, object] = dict(server_urls=urls, health_check_interval_s=0.2, health_timeout_s=2.0,
                                   retry_backoff_s=0.05, request_timeout_s=60, admin_timeout_s=60)
    return InferenceConfig(**{**base, **kw})  # type: ignore[arg-type]


async def test_affinity_sticks_and_new_affinities_spread(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair, capacity_per_server=8)) as pool:
        first = await pool.generate(PROMPT, SHORT, affinity="rollout-1")
        for _ in range(3):
            assert (await pool.generate(PROMPT, SHORT, affinity="rollout-1")).server == first.server
        results = await asyncio.gather(*(pool.generate(PROMPT, SHORT, affinity=f"group-{i}") for i in range(8)))
        per_server = collections.Counter(r.server for r in results)
        assert per_server == {pair[0]: 4, pair[1]: 4}  # least-loaded placement of 8 concurrent new affinities
        metrics = pool.metrics()
        assert metrics.requests == 12 and metrics.retries == 0 and metrics.queue_depth == 0


async def test_capacity_bounds_in_flight_and_queues_the_rest(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair, capacity_per_server=2)) as pool:
        peak: dict[str, int] = collections.defaultdict(int)

        async def watch() -> None:
            while True:
                for s in pool.metrics().servers:
                    peak[s.url] = max(peak[s.url], s.in_flight)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        budget = SamplingParams(max_new_tokens=300, ignore_eos=True)
        results = await asyncio.gather(*(pool.generate(PROMPT, budget, affinity=f"a{i}") for i in range(12)))
        watcher.cancel()
        assert all(len(r.output_ids) == 300 for r in results)
        metrics = pool.metrics()
        assert max(peak.values()) == 2 and all(s.in_flight == 0 for s in metrics.servers)
        assert metrics.max_queue_depth >= 8 and metrics.queued_total >= 8 and metrics.queue_wait_s_max > 0
        assert all(0 < s.mean_occupancy <= 1 for s in metrics.servers)
        assert metrics.to_json()["servers"][0]["capacity"] == 2


async def test_a_freed_slot_goes_to_the_most_urgent_waiter(pair: tuple[str, str]) -> None:
    """Slots go by SLOT_PRIORITY (lowest first), then arrival, across the server's own queue (requests bound to it)
    and the pool queue (new affinities): the scheduler's earliest-deadline-first order for episodes."""
    async with InferencePool(_cfg(pair[:1], capacity_per_server=1)) as pool:
        served: list[str] = []
        short = SamplingParams(max_new_tokens=20, ignore_eos=True)

        async def request(affinity: str, priority: int) -> None:
            SLOT_PRIORITY.set(priority)  # the task's own context, as an episode task sets it
            await pool.generate(PROMPT, short, affinity=affinity)
            served.append(f"{affinity}@{priority}")

        await pool.generate(PROMPT, short, affinity="bound")  # binds "bound" to the server
        holder = asyncio.create_task(pool.generate(PROMPT, LONG, affinity="holder"))
        await asyncio.sleep(0.1)
        waiting = []
        for affinity, priority in [("new-a", 5), ("bound", 5), ("new-b", 1), ("new-c", 5), ("new-d", 3)]:
            waiting.append(asyncio.create_task(request(affinity, priority)))
            await asyncio.sleep(0.02)  # queued in this order
        assert pool.metrics().queue_depth == 5
        await asyncio.gather(holder, *waiting)
        # new-b and new-d jump the queue; at 5 the bound request wins the tie against the pool queue's new-a,
        # then arrival order.
        assert served == ["new-b@1", "new-d@3", "bound@5", "new-a@5", "new-c@5"]


async def test_capacity_defaults_to_server_max_running_requests(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair)) as pool:
        assert [s.capacity for s in pool.metrics().servers] == [4096, 4096]
        layout = await pool.weight_update_layout()
        assert layout.world_size == 3 and sorted(layout.rank_offsets.values()) == [1, 2]


async def test_queue_timeout_names_the_key(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair[:1], capacity_per_server=1, queue_timeout_s=0.3)) as pool:
        holder = asyncio.create_task(pool.generate(PROMPT, LONG, affinity="holder"))
        await asyncio.sleep(0.1)
        with pytest.raises(NoServerAvailable, match="queue_timeout_s"):
            await pool.generate(PROMPT, SHORT, affinity="late")
        assert len((await holder).output_ids) == 2000
        assert pool.metrics().servers[0].in_flight == 0  # the timed-out waiter left no slot behind
        assert (await pool.generate(PROMPT, SHORT, affinity="after")).finish.type in ("stop", "length")


async def test_killed_server_requests_rerouted_none_lost_then_readmitted(sim_launcher) -> None:  # type: ignore[no-untyped-def]
    doomed, survivor = sim_launcher(), sim_launcher()
    # Generous health limits: only the killed server may be ejected, even on a loaded machine.
    cfg = _cfg((doomed.url, survivor.url), capacity_per_server=64, health_timeout_s=10.0, eject_after_failures=5)
    async with InferencePool(cfg) as pool:
        tasks = [asyncio.create_task(pool.generate(PROMPT, LONG, affinity=f"r{i}")) for i in range(40)]
        await asyncio.sleep(0.4)
        assert pool.metrics().servers[0].in_flight > 0
        doomed.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert len(results) == 40 and all(len(r.output_ids) == 2000 for r in results)
        assert all(r.finish.type == "length" for r in results)
        assert collections.Counter(r.server for r in results) == {survivor.url: 40}
        metrics = pool.metrics()
        assert metrics.retries >= 1 and metrics.ejections == 1 and not metrics.servers[0].healthy
        # After a restart on the same port the health loop re-admits it and new affinities use it again.
        revived = sim_launcher(port=doomed.port)
        for _ in range(100):
            if pool.metrics().servers[0].healthy:
                break
            await asyncio.sleep(0.1)
        assert pool.metrics().readmissions == 1
        again = await asyncio.gather(*(pool.generate(PROMPT, SHORT, affinity=f"new{i}") for i in range(4)))
        assert revived.url in {r.server for r in again}
    doomed.stop()
    survivor.stop()
    revived.stop()


async def test_a_restarted_server_is_readmitted_only_at_the_admitted_weight_version(sim_launcher) -> None:  # type: ignore[no-untyped-def]
    """A server restarted after a crash answers /health with its initial weights; the pool routes to it again only
    once it serves a weight version the admitted servers serve (what the learner's next push brings it)."""
    doomed, survivor = sim_launcher(), sim_launcher()
    async with InferencePool(_cfg((doomed.url, survivor.url), health_timeout_s=10.0, eject_after_failures=1)) as pool:
        assert all(r.success for r in (await pool.update_weight_version("3")).values())
        doomed.kill()
        for _ in range(100):
            if not pool.metrics().servers[0].healthy:
                break
            await asyncio.sleep(0.1)
        assert pool.admitted_urls() == {survivor.url}
        revived = sim_launcher(port=doomed.port)
        await asyncio.sleep(1.5)  # several health rounds: it answers 200, at version "default"
        assert await pool.weight_versions() == {doomed.url: "default", survivor.url: "3"}
        assert pool.admitted_urls() == {survivor.url} and pool.metrics().readmissions == 0
        await pool.update_weight_version("3")
        for _ in range(100):
            if pool.metrics().servers[0].healthy:
                break
            await asyncio.sleep(0.1)
        assert pool.admitted_urls() == {doomed.url, survivor.url} and pool.metrics().readmissions == 1
    doomed.stop()
    survivor.stop()
    revived.stop()


async def test_retries_exhausted_and_no_server_left(sim_launcher) -> None:  # type: ignore[no-untyped-def]
    server = sim_launcher()
    async with InferencePool(_cfg((server.url,), capacity_per_server=4, max_retries=0, queue_timeout_s=0.5)) as pool:
        task = asyncio.create_task(pool.generate(PROMPT, LONG, affinity="a"))
        await asyncio.sleep(0.3)
        server.kill()
        with pytest.raises(ConnectionFailed) as lost:
            await task
        assert lost.value.may_be_running and server.url in str(lost.value)
        assert pool.metrics().ejections == 1 and pool.metrics().retries == 0
        with pytest.raises(NoServerAvailable, match="0 of 1 targets healthy"):
            await pool.generate(PROMPT, SHORT, affinity="b")
    server.stop()


async def test_503_is_retried_on_another_server_without_ejection(sim_launcher, pair) -> None:  # type: ignore[no-untyped-def]
    # One running request, one queued, and the next is refused with 503 "The request queue is full."
    full = sim_launcher(profile_toml="[server]\nmax_running_requests = 1\n", base_profile=False,
                        extra_args=("--set", "serving.max_queued_requests=1"))
    cfg = _cfg((full.url, pair[0]), capacity_per_server=8, health_check_interval_s=60.0)
    async with InferencePool(cfg) as pool:
        running = asyncio.create_task(pool.generate(PROMPT, LONG, affinity="x"))
        await asyncio.sleep(0.2)
        queued = asyncio.create_task(pool.generate(PROMPT, LONG, affinity="x"))
        await asyncio.sleep(0.2)
        refused = await pool.generate(PROMPT, SHORT, affinity="x")
        assert refused.server == pair[0]
        assert {(await running).server, (await queued).server} == {full.url}
        metrics = pool.metrics()
        assert metrics.retries == 1 and metrics.ejections == 0 and metrics.servers[0].failures == 1
    full.stop()


async def test_abort_by_rid_and_by_cancellation(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair, capacity_per_server=8)) as pool:
        task = asyncio.create_task(pool.generate(PROMPT, SamplingParams(max_new_tokens=8000, ignore_eos=True),
                                                 affinity="victim"))
        while not pool.live_rids():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        (rid, url), = pool.live_rids().items()
        await pool.abort(rid)
        result = await asyncio.wait_for(task, 30)
        assert result.finish.type == "abort" and result.rid == rid and 0 < len(result.output_ids) < 8000
        # Cancelling generate() aborts the request on the server too.
        task = asyncio.create_task(pool.generate(PROMPT, SamplingParams(max_new_tokens=8000, ignore_eos=True),
                                                 affinity="victim"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            infos = await pool.server_infos()
            if infos[url]["internal_states"][0]["num_running_reqs"] == 0:
                break
            await asyncio.sleep(0.05)
        assert infos[url]["internal_states"][0]["num_running_reqs"] == 0
        assert pool.metrics().aborts_sent >= 1


async def test_pause_continue_fan_out(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair, capacity_per_server=8)) as pool:
        paused = await pool.pause("in_place")
        assert set(paused) == set(pair) and all(r.success for r in paused.values())
        task = asyncio.create_task(pool.generate(PROMPT, SHORT, affinity="held"))
        await asyncio.sleep(0.6)  # several health rounds: a paused server must not be ejected
        assert not task.done() and all(s.healthy for s in pool.metrics().servers)
        resumed = await pool.continue_()
        assert all(r.success for r in resumed.values())
        assert (await asyncio.wait_for(task, 30)).finish.type in ("stop", "length")
        flushed = await pool.flush_cache()
        assert all(r.success for r in flushed.values())
        aborted = await pool.abort_all()
        assert set(aborted) == set(pair)


async def test_fan_out_reports_a_dead_server_per_url(pair: tuple[str, str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with InferencePool(_cfg((pair[0], dead), capacity_per_server=4)) as pool:
        assert [s.healthy for s in pool.metrics().servers] == [True, False]  # the first health round ejected it
        results = await pool.begin_weight_update()
        assert results[pair[0]].success
        assert not results[dead].success and dead in results[dead].message
        assert (await pool.end_weight_update())[pair[0]].success
        # Requests still flow to the live server.
        assert (await pool.generate(PROMPT, SHORT, affinity="x")).server == pair[0]


async def test_bad_request_is_not_retried(pair: tuple[str, str]) -> None:
    async with InferencePool(_cfg(pair, capacity_per_server=4)) as pool:
        with pytest.raises(BadRequest, match="context length"):
            await pool.generate(list(range(100, 12400)), SHORT, affinity="big")
        assert pool.metrics().retries == 0


async def test_router_mode_sends_generate_to_router_and_control_to_workers(pair: tuple[str, str]) -> None:
    router, worker = pair  # a server stands in for the router: the pool only needs it to speak /generate
    async with InferencePool(_cfg((worker,), router_url=router, capacity_per_server=3)) as pool:
        assert [(s.url, s.capacity) for s in pool.metrics().servers] == [(router, 3)]
        results = await asyncio.gather(*(pool.generate(PROMPT, SHORT, affinity=f"a{i}") for i in range(4)))
        assert {r.server for r in results} == {router}
        assert set(await pool.pause("retract")) == {worker}
        assert set(await pool.continue_()) == {worker}


async def test_lifecycle_refuses_reuse(pair: tuple[str, str]) -> None:
    pool = InferencePool(_cfg(pair, capacity_per_server=2))
    with pytest.raises(RuntimeError, match="unopened"):
        await pool.generate(PROMPT, SHORT, affinity="x")
    async with pool:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await pool.generate(PROMPT, SHORT, affinity="x")
    with pytest.raises(RuntimeError, match="create a new one"):
        async with pool:
            pass


def test_config_section_and_errors() -> None:
    cfg = load_config(SSPConfig, None, ["inference.server_urls=['http://h1:30000', 'http://h2:30000']",
                                        "inference.capacity_per_server=128"]).inference
    assert cfg.server_urls == ("http://h1:30000", "http://h2:30000") and cfg.capacity_per_server == 128
    with pytest.raises(ConfigError, match="must start with http"):
        load_config(SSPConfig, None, ["inference.server_urls=['h1:30000']"])
    with pytest.raises(ConfigError, match="lists a server twice"):
        load_config(SSPConfig, None, ["inference.server_urls=['http://a:1', 'http://a:1']"])
    with pytest.raises(ValueError, match="queue_timeout_s = 0"):
        dataclasses.replace(InferenceConfig(), queue_timeout_s=0)
