"""`ssp bench inference`: does the pool keep up with its servers, and does the simulator keep up with its clock?

Side by side in one run, on the same workload (--requests solver turns: a ChatML prompt of about 230 tokens, up to
512 new tokens with Search-R1 stop strings) against --servers simulated servers (separate processes, 7B profile,
--time-scale):
  (a) direct: one `ServerClient` per server, requests dealt round-robin, at most --capacity in flight per server
      (a semaphore each): the client-side floor, no routing;
  (b) `InferencePool` with capacity_per_server = --capacity and one affinity per request.
The ratio (b)/(a) of requests per second is the pool's cost (goal: >= 0.9). Rounds interleave (a) and (b); the best
of REPEATS counts, since other processes share the machine.
  (c) in-process: --sim-requests concurrent requests of --sim-tokens tokens in one SimBackend whose clock never
      waits (time scale 1e9): CPU microseconds per simulated token and per step, i.e. how many concurrent rollouts
      one core can simulate at a given time scale.
Writes artifacts/bench/inference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir

REPEATS = 2


def run(args: argparse.Namespace) -> int:
    import uvloop

    from ssp.serving.server import READY_LINE

    procs: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for _ in range(args.servers):
            proc = subprocess.Popen([sys.executable, "-m", "ssp.cli", "model", "serve", "--sim", "--port", "0",
                                     "--sim-time-scale", str(args.time_scale)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith(READY_LINE):
                print(f"bench inference: a sim server did not start (got {line!r})", file=sys.stderr)
                return 1
            urls.append(line[len(READY_LINE):].strip())
        print(f"{args.servers} sim servers at time scale {args.time_scale}, {args.requests} requests, "
              f"{args.capacity} in flight per server, {os.cpu_count()} CPU cores; best of {REPEATS}")
        runs: dict[str, list[float]] = {"direct": [], "pool": []}
        for _ in range(REPEATS):
            runs["direct"].append(uvloop.run(_direct(urls, args)))
            runs["pool"].append(uvloop.run(_pool(urls, args)))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    direct, pool = max(runs["direct"]), max(runs["pool"])
    sim = uvloop.run(_sim_cost(args.sim_requests, args.sim_tokens))
    rows = [("(a) direct ServerClients, round-robin", f"{direct:,.0f} req/s", "1.00"),
            ("(b) InferencePool (affinity, slots, health)", f"{pool:,.0f} req/s", f"{pool / direct:.2f}"),
            (f"(c) sim loop, {args.sim_requests} concurrent", f"{sim['us_per_token']:.2f} us/token",
             f"{sim['us_per_step']:,.0f} us/step")]
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>16}  {ratio:>12}")
    print(f"pool/direct = {pool / direct:.2f} (goal >= 0.9); at time scale 1 one core simulates a batch of "
          f"{args.sim_requests} if a step's CPU ({sim['us_per_step'] / 1000:.1f} ms) stays under its modeled time")
    out = args.out or artifacts_dir() / "bench" / "inference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"direct_rps": runs["direct"], "pool_rps": runs["pool"], "ratio": pool / direct,
                               "sim": sim, "args": {k: str(v) for k, v in vars(args).items() if k != "run"}},
                              indent=2))
    print(f"wrote {out}")
    return 0


def _workload() -> tuple[list[int], Any]:
    from ssp.engine.generation import SamplingParams

    prompt = [1, 9690, 198] + [(i * 7919) % 40000 + 100 for i in range(220)] + [2, 198, 1, 520, 9531, 198]
    sampling = SamplingParams(max_new_tokens=512, stop=("</search>", "</answer>"))
    return prompt, sampling


async def _direct(urls: list[str], args: argparse.Namespace) -> float:
    import aiohttp

    from ssp.engine.client import ServerClient
    from ssp.engine.ids import RequestIds

    prompt, sampling = _workload()
    ids = RequestIds()
    connector = aiohttp.TCPConnector(limit_per_host=args.capacity + 8, keepalive_timeout=4.0)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [ServerClient(url, session) for url in urls]
        gates = [asyncio.Semaphore(args.capacity) for _ in urls]

        async def one(i: int) -> None:
            k = i % len(clients)
            async with gates[k]:
                await clients[k].generate(prompt, sampling, ids.next())

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        return float(args.requests / (time.perf_counter() - start))


async def _pool(urls: list[str], args: argparse.Namespace) -> float:
    from ssp.engine.inference_config import InferenceConfig
    from ssp.engine.pool import InferencePool

    prompt, sampling = _workload()
    cfg = InferenceConfig(server_urls=tuple(urls), capacity_per_server=args.capacity)
    async with InferencePool(cfg) as pool:
        start = time.perf_counter()
        await asyncio.gather(*(pool.generate(prompt, sampling, affinity=f"r{i}") for i in range(args.requests)))
        return float(args.requests / (time.perf_counter() - start))


async def _sim_cost(n_requests: int, n_tokens: int) -> dict[str, float]:
    from ssp.paths import default_model_dir
    from ssp.serving.backend import GenerateRequest, SamplingOptions
    from ssp.serving.sim import SimBackend
    from ssp.serving.sim_profile import load_profile
    from ssp.serving.sim_text import TokenizerFile

    backend = SimBackend(load_profile(), TokenizerFile(default_model_dir()), tokenizer_path="", time_scale=1e9)
    await backend.start()
    sampling = SamplingOptions(max_new_tokens=n_tokens, ignore_eos=True)
    reqs = [GenerateRequest(rid=f"b{i:08d}", input_ids=[1, 2, 3 + i % 50, 4] * 50, sampling=sampling)
            for i in range(n_requests)]

    async def one(r: GenerateRequest) -> None:
        async for _ in backend.generate(r):
            pass

    cpu0 = time.process_time()
    await asyncio.gather(*(one(r) for r in reqs))
    cpu = time.process_time() - cpu0
    await backend.close()
    stats = backend.stats
    tokens = n_requests * n_tokens  # every request runs to its budget (ignore_eos)
    return {"requests": n_requests, "tokens": tokens, "steps": stats.steps, "retractions": stats.retractions,
            "cpu_s": cpu, "us_per_token": 1e6 * cpu / tokens, "us_per_step": 1e6 * cpu / stats.steps,
            "sim_time_s": stats.sim_time_s}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", type=int, default=2, help="simulated servers (default: 2)")
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement (default: 2000)")
    p.add_argument("--capacity", type=int, default=128, help="in-flight requests per server (default: 128)")
    p.add_argument("--time-scale", type=float, default=20.0, help="sim seconds per wall second (default: 20)")
    p.add_argument("--sim-requests", type=int, default=4000, help="concurrent requests for (c) (default: 4000)")
    p.add_argument("--sim-tokens", type=int, default=200, help="tokens per request for (c) (default: 200)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/inference.json)")
