"""`ssp bench search`: retrieval as the engine sees it: the SearchBatcher coalescing concurrent searches into
batched Retriever calls, against one retriever call per query.

--clients coroutines (rollouts waiting on a <search>) each issue their share of --queries searches one after
another, through an `ssp.engine.search_batcher.SearchBatcher` over the configured retriever (default: the Tantivy demo
index, in-process):
  (a) one call per query: max_batch 1, no window (what a naive engine does);
  (b) coalesced: the engine's [search] defaults (max_batch 64, window 5 ms).
Rounds interleave (a) and (b); the best of each counts. Prints queries/s, batch sizes (mean, p50, max) and the ratio
(b)/(a). The raw index throughput (no engine) is `ssp bench retrieval`. Writes artifacts/bench/search.json (+ .md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=int, default=2000, help="searches per measurement (default: 2000)")
    p.add_argument("--clients", type=int, default=256, help="concurrent searching rollouts (default: 256)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best counts (default: 2)")
    p.add_argument("--index", type=Path, help="Tantivy index searched (default: the demo index, artifacts/index/demo)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/search.json)")


def _queries(n: int) -> list[str]:
    """Entity-style queries from the seed answers the engine plays with (what proposers search for)."""
    from ssp.engine.config import SchedulerConfig
    from ssp.engine.seeds import load_seed_answers

    answers = [s.aliases[0] for s in load_seed_answers(SchedulerConfig().seeds_file)]
    rng = random.Random(0)
    suffixes = ("", " born", " film", " history", " founded", " capital", " director")
    return [rng.choice(answers) + rng.choice(suffixes) for _ in range(n)]


async def measure(queries: list[str], clients: int, *, max_batch: int, window_ms: float,
                  index_dir: Path | None = None) -> dict[str, Any]:
    """queries/s and batch sizes of `clients` coroutines searching through one SearchBatcher."""
    from ssp.engine.config import SearchBatcherConfig
    from ssp.engine.search_batcher import SearchBatcher, SearchStats
    from ssp.retriever.config import RetrieverConfig
    from ssp.retriever.registry import make_retriever

    rcfg = RetrieverConfig(index_dir=index_dir)
    retriever = make_retriever(rcfg)
    batcher = SearchBatcher(retriever, SearchBatcherConfig(max_batch=max_batch, window_ms=window_ms), k=rcfg.topk)
    try:
        await batcher.search(queries[0])  # open the index before the clock starts
        batcher.stats = SearchStats()
        shares = [queries[i::clients] for i in range(clients)]

        async def client(share: list[str]) -> None:
            for q in share:
                await batcher.search(q)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for s in shares))
        elapsed = time.perf_counter() - t0
        return {"queries_per_s": round(len(queries) / elapsed, 1), **batcher.stats.summary()}
    finally:
        await batcher.close()
        await retriever.close()


def run(args: argparse.Namespace) -> int:
    import uvloop

    from ssp.engine.config import SearchBatcherConfig

    out_json = args.out or artifacts_dir() / "bench" / "search.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    queries = _queries(args.queries)
    default = SearchBatcherConfig()
    runs: dict[str, list[dict[str, Any]]] = {"per_query": [], "coalesced": []}
    for _ in range(args.rounds):
        runs["per_query"].append(uvloop.run(measure(queries, args.clients, max_batch=1, window_ms=0.0,
                                                    index_dir=args.index)))
        runs["coalesced"].append(uvloop.run(measure(queries, args.clients, max_batch=default.max_batch,
                                                    window_ms=default.window_ms, index_dir=args.index)))
    best = {k: max(v, key=lambda r: r["queries_per_s"]) for k, v in runs.items()}
    result = {"queries": args.queries, "clients": args.clients, "max_batch": default.max_batch,
              "window_ms": default.window_ms, **best,
              "ratio": round(best["coalesced"]["queries_per_s"] / max(1e-9, best["per_query"]["queries_per_s"]), 3)}
    out_json.write_text(json.dumps(result, indent=2))
    report = markdown(result)
    out_json.with_suffix(".md").write_text(report)
    print(report)
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = ["## Search as the engine sees it", "",
             f"{r['queries']} searches from {r['clients']} concurrent rollouts through the SearchBatcher over the "
             "Tantivy demo index (in-process).", "",
             "| mode | queries/s | retriever calls | batch mean | batch p50 | batch max |", "|---|---|---|---|---|---|"]
    for name, label in (("per_query", "one call per query"),
                        ("coalesced", f"coalesced (max {r['max_batch']}, {r['window_ms']} ms window)")):
        m = r[name]
        lines.append(f"| {label} | {m['queries_per_s']} | {m['search_batches']} | {m['search_batch_mean']} | "
                     f"{m['search_batch_p50']} | {m['search_batch_max']} |")
    lines += ["", f"coalesced/per-query throughput ratio: {r['ratio']}", ""]
    return "\n".join(lines)
