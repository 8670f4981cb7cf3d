"""`ssp bench <name>`: throughput benchmarks, one subcommand and one function per bench.

Each bench lives in its own module `bench/<name>.py` with a `run(args) -> int`, imported only when its subcommand
runs, and writes a JSON report under artifacts/bench/. To add one: give the module a docstring, `add_arguments(p)`
and `run(args)`, and add its `_add_module` line in `add_commands`.
"""

import argparse
from pathlib import Path


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    bench = sub.add_parser(
        "bench",
        help="throughput benchmarks (ratios measured side by side in one run)",
        description="Run one benchmark; each prints a table and writes JSON under artifacts/bench/.",
        epilog="Example: ssp bench learner --tp --model-dir artifacts/models/SmolLM2-135M-Instruct --steps 3 "
        "(`just bench` runs every part's quick version and writes artifacts/bench/REPORT.md)",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    _add_retrieval(bench_sub)
    _add_engine(bench_sub)
    _add_module(bench_sub, "inference",
                "requests/s: InferencePool vs direct clients over sim servers; the sim loop's CPU cost per token")
    _add_module(bench_sub, "async-vs-sync",
                "trained trajectories/s: async (g serve, G-g train, eta) vs sync and lock-step (all G serve, then all G "
                "train), each against its own bound")
    _add_module(bench_sub, "scale", "per-turn overhead p50/p99, loop lag, memory per rollout at 1k/5k/10k rollouts")
    _add_module(bench_sub, "report", "artifacts/bench/REPORT.md (tables, PNG plots, ratio lines) from the parts' results")
    _add_module(bench_sub, "search", "searches/s through the SearchBatcher: coalesced vs one retriever call per query")
    _add_module(bench_sub, "push", "weight push (WeightPusher into a real server) vs raw broadcast, GB/s and ratio")
    _add_module(bench_sub, "serving", "continuous batching: N concurrent requests vs the same N one by one, ratio")
    _add_module(bench_sub, "learner", "learner training step tokens/s at TP=1 vs TP=2 (megatron, gloo/NCCL)")
    _add_module(bench_sub, "learning",
                "held-out scores of a trained arm vs a control arm (lr = 0), same seeds; exits 1 if nothing rose")


def _add_retrieval(bench_sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = bench_sub.add_parser(
        "retrieval",
        help="queries/s and answer-hit@3: raw tantivy-py vs TantivyRetriever vs the HTTP server; exits 1 below 4x",
        description="On one index and the same NQ questions, measure queries/s, CPU ms per query and answer-hit@3 "
        "of (a) raw tantivy-py (parse_query over title and text) on 1 and 2 threads, (b) TantivyRetriever "
        "(common terms pruned, retriever/query.py) on 1 and 2 threads, (c) the /retrieve server (its own process) "
        "under concurrent clients sending one query per request, (d) the same server behind the engine's search "
        "batcher, as rollouts reach it. Exits 1 unless (d) reaches 4x (a) on 1 thread with answer-hit@3 within 1 "
        "point.",
    )
    p.add_argument(
        "--corpus",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="corpus to index (default: the demo corpora in data/corpus, where the 4x goal is out of reach; "
        "docs/benchmarks.md says what the goal was measured on)",
    )
    p.add_argument("--queries", type=int, default=1000, help="queries in the query set (default: 1000)")
    p.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients for (c) (default: 64)")
    p.add_argument("--rollouts", type=int, default=256,
                   help="concurrent searching rollouts for (d), through one search batcher (default: 256)")
    p.add_argument("-k", type=int, default=3, help="documents per query (default: 3)")
    p.add_argument("--out", type=Path, help="JSON report path (default: artifacts/bench/retrieval.json)")

    def run(args: argparse.Namespace) -> int:
        from ssp.bench.retrieval import run as run_retrieval

        return run_retrieval(args)

    p.set_defaults(run=run)


def _add_engine(bench_sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = bench_sub.add_parser(
        "engine",
        help="rollouts in flight, per-turn overhead, event-loop lag and slot occupancy on one core; async vs sync",
        description="Against the simulated server (its own process) and the demo index: keep --rollouts episodes in "
        "flight on one core and report rollouts in flight, per-turn engine overhead p50/p99, event-loop lag and "
        "stalls over 50 ms, slot occupancy; then the same episode budget in async and sync mode side by side.",
    )
    p.add_argument("--rollouts", type=int, default=2000, help="episodes in flight at once (default: 2000)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured after the ramp (default: 30)")
    p.add_argument("--ramp", type=float, default=15.0, help="seconds of ramp-up not measured (default: 15)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulated seconds per wall second of the sim server (default: 1, real time)")
    p.add_argument("--compare-episodes", type=int, default=64,
                   help="episodes per mode in the async vs sync comparison (0 = skip it; default: 64)")
    p.add_argument("--compare-inflight", type=int, default=32,
                   help="episodes at a time (sync: per step) in the comparison (default: 32)")
    p.add_argument("--out", type=Path, help="JSON report path (default: artifacts/bench/engine.json)")

    def run(args: argparse.Namespace) -> int:
        from ssp.bench.engine import run as run_engine_bench

        return run_engine_bench(args)

    p.set_defaults(run=run)


def _add_module(bench_sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, help_text: str) -> None:
    """A bench whose module `bench/<name>.py` (dashes in `name` become underscores) documents itself and declares
    its flags (`add_arguments`, `run`)."""
    import importlib

    module_name = f"ssp.bench.{name.replace('-', '_')}"
    module = importlib.import_module(module_name)
    p = bench_sub.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(run=lambda args: importlib.import_module(module_name).run(args))
