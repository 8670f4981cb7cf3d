"""`ssp bench retrieval`: is ssp's search faster than what a user writes in raw tantivy-py, at the same quality?

On one index and one set of NQ questions, side by side in one run:
  (a) raw tantivy-py, the baseline: `parse_query` of the question over title and text, search, fetch the stored
      passages, in a plain loop on 1 thread (and on 2 threads: raw at its best on 2 cores, and the GIL check);
  (b) `TantivyRetriever` (ssp's query: common terms pruned, no title boost; see retriever/query.py) on batches of
      BATCH queries, on 1 and on 2 threads: ssp against raw at equal threads;
  (c) `ssp retriever serve` in its own process with its default search threads, under --clients concurrent
      `HttpRetriever` callers, one query per request (what a client without batching sends);
  (d) the same server as the engine reaches it: --rollouts concurrent searching rollouts through the engine's
      `SearchBatcher` with the [search] defaults, which coalesces their queries into batched requests.
Every arm's queries/s, CPU ms per query (all processes: load-independent) and answer-hit@3: the share of the
questions with a gold answer (SQuAD-normalised) in one of its top 3 passages (title and text). Hit rates are over
every question of QA_FILE, the same questions and index for every arm; speed is over --queries of them.

Goal (issue 15): (d), the server as ssp uses it, >= GOAL_SPEEDUP x (a) on 1 thread, with (d)'s answer-hit@3 at most
HIT_TOLERANCE_POINTS below (a)'s; (c)'s ratio is printed beside it. The bench exits 1 when it misses. Each speed runs
REPEATS times, interleaved so a burst of load from other processes hits all arms alike; the best counts (the load
average is reported). Writes artifacts/bench/retrieval.json and retrieval.md.

Reading it on a busy machine: Linux schedules by session (autogroup), and the server and its clients run in the
bench's session, so when other work saturates the cores every arm gets the same CPU share and the ratios tend to the
ratios of their "CPU ms/query" columns instead of showing the second core's gain. The load line says when: raw on
2 threads runs near 2x its 1-thread rate only when the bench has both cores.

Corpus: --corpus (docs/benchmarks.md: the goal was measured on a 211k-passage enwiki corpus), else the demo corpora
in data/corpus. On those 19k passages the goal is out of reach and the bench says so (exit 1): a raw search there
costs about 0.2 ms of CPU and ssp's about 0.1 ms, so pruning saves little and (d) reached 2.3x (on the 211k-passage
corpus: raw 1.75 ms, ssp 0.30 ms, (d) 9.3x).
"""

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from ssp.engine.search_batcher import SearchStats
from ssp.paths import DATA_DIR, DEMO_CORPORA, PROJECT_ROOT, artifacts_dir

QA_FILE = DATA_DIR / "qa" / "nq_test500_questions.jsonl"
BATCH = 64
REPEATS = 5
GOAL_SPEEDUP = 4.0
HIT_TOLERANCE_POINTS = 1.0
GIL_CHECK_POSTINGS = 10_000_000


class Question(NamedTuple):
    """One line of QA_FILE: the question as asked, and its gold answers (any alias counts)."""

    text: str
    answers: list[str]


class Measurement(NamedTuple):
    """Throughput, and CPU time spent per query by every process involved (load-independent efficiency)."""

    qps: float
    cpu_ms_per_query: float


Passages = list[list[tuple[str, str]]]
"""Per query, its top-k passages as (title, text)."""


class Arm(NamedTuple):
    """One way of searching, measured like the others."""

    label: str
    threads: int
    """Threads that run searches (the HTTP server: its search threads, next to its event loop)."""
    search: Callable[[list[str]], Passages]
    server_pid: int | None
    """The process besides this one whose CPU time counts (the HTTP server), or None."""


def run(args: argparse.Namespace) -> int:
    from ssp.retriever.index_build import build_index

    for flag, value in (("--queries", args.queries), ("--clients", args.clients), ("--rollouts", args.rollouts),
                        ("-k", args.k)):
        if value < 1:
            print(f"ssp bench retrieval: {flag} {value}: must be >= 1", file=sys.stderr)
            return 2
    out_json = args.out or artifacts_dir() / "bench" / "retrieval.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    corpora = list(args.corpus or DEMO_CORPORA)
    key = hashlib.sha256("\n".join(str(p.resolve()) for p in corpora).encode()).hexdigest()[:12]
    index_dir = artifacts_dir() / "index" / f"bench-{key}"
    print(f"index {index_dir} over {', '.join(map(str, corpora))}")
    build_index(corpora, index_dir, if_missing=True)
    questions = [Question(row["question"], row["golden_answers"]) for row in map(json.loads, _lines(QA_FILE))]
    queries = [questions[i % len(questions)].text for i in range(args.queries)]
    load_before = os.getloadavg()[0]
    print(f"{len(queries)} queries, k={args.k}, hit rates over {len(questions)} questions ({QA_FILE.name}), "
          f"load {load_before:.1f}; best of {REPEATS} runs each")

    with ExitStack() as stack:
        batch_stats = SearchStats()
        arms = _arms(index_dir, args.k, args.clients, args.rollouts, batch_stats, stack)
        # Quality first: every arm answers every question (this is also each arm's warm-up).
        hits = {name: count_hits(questions, arm.search([q.text for q in questions])) for name, arm in arms.items()}
        runs: dict[str, list[Measurement]] = {name: [] for name in arms}
        for _ in range(REPEATS):
            for name, arm in arms.items():
                runs[name].append(_measure(len(queries), partial(arm.search, queries), arm.server_pid))
    best = {name: max(ms) for name, ms in runs.items()}
    speedup = best["http_engine"].qps / best["raw_1thread"].qps
    met = goal_met(speedup, hits["raw_1thread"], hits["http_engine"], len(questions))
    rate = {name: 100 * n / len(questions) for name, n in hits.items()}
    search_ms, stall_ms = _gil_stall(index_dir)
    cores = best["raw_2threads"].qps / best["raw_1thread"].qps  # about 2 when the bench had two free cores
    load = (
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores; "
        f"raw on 2 threads ran {cores:.2f}x its 1-thread rate"
        + (": other work held a core, and (c) and (d), which need two, were measured on about one" if cores < 1.5
           else "")
    )

    base = best["raw_1thread"]
    table = (
        f"| arm | threads | queries/s | x (a) 1 thread | CPU ms/query (all processes) | answer-hit@3, {len(questions)} "
        "NQ questions |\n|---|---:|---:|---:|---:|---:|\n"
        + "".join(
            f"| {arm.label} | {arm.threads} | {best[name].qps:,.1f} | {best[name].qps / base.qps:.2f} | "
            f"{best[name].cpu_ms_per_query:.2f} | {rate[name]:.1f}% |\n"
            for name, arm in arms.items()
        )
    )
    equal = (
        f"equal threads: ssp/raw {best['ssp_1thread'].qps / base.qps:.2f}x on 1 thread, "
        f"{best['ssp_2threads'].qps / best['raw_2threads'].qps:.2f}x on 2; CPU per query raw "
        f"{base.cpu_ms_per_query:.2f} ms, ssp {best['ssp_1thread'].cpu_ms_per_query:.2f} ms"
    )
    batches = batch_stats.summary()
    coalesced = (
        f"(d) the search batcher sent {batches['search_batch_mean']:.1f} queries per request on average (p50 "
        f"{batches['search_batch_p50']}, max {batches['search_batch_max']}) over {batches['search_batches']:,} requests"
    )
    gil = (
        f"GIL: a {search_ms:.0f} ms search stalled a Python loop in another thread for at most {stall_ms:.0f} ms "
        f"(released: {'yes' if stall_ms < search_ms / 2 else 'NO'})"
    )
    report = {
        "corpus": [str(p) for p in corpora],
        "index": str(index_dir),
        "queries": len(queries),
        "questions": len(questions),
        "qa_file": str(QA_FILE.relative_to(PROJECT_ROOT)),
        "k": args.k,
        "clients": args.clients,
        "rollouts": args.rollouts,
        "batch": BATCH,
        "engine_batches": batches,
        "threads": {name: arm.threads for name, arm in arms.items()},
        "cpu_cores": os.cpu_count(),
        "load_average": load,
        "runs": {name: [m._asdict() for m in ms] for name, ms in runs.items()},
        "best": {name: m._asdict() for name, m in best.items()},
        "answer_hits_at_3": hits,
        "ratios": {
            "http_engine_over_raw": speedup,
            "http_per_query_over_raw": best["http_per_query"].qps / base.qps,
            "ssp_over_raw_1thread": best["ssp_1thread"].qps / base.qps,
            "ssp_over_raw_2threads": best["ssp_2threads"].qps / best["raw_2threads"].qps,
            "raw_2threads_over_1thread": best["raw_2threads"].qps / base.qps,
        },
        "goal": {"speedup": GOAL_SPEEDUP, "hit_tolerance_points": HIT_TOLERANCE_POINTS, "met": met},
        "gil": {"slow_search_ms": search_ms, "max_python_stall_ms": stall_ms},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print("\n" + table + "\n" + equal + "\n" + coalesced + "\n" + gil + "\n" + load + "\n" + verdict(report))
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    details = f"```json\n{json.dumps(report, indent=2)}\n```\n"
    paragraphs = [f"# ssp bench retrieval\n\n{table}", equal, coalesced, gil, load, verdict(report), details]
    markdown = "\n\n".join(paragraphs)
    out_json.with_suffix(".md").write_text(markdown)
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return 0 if met else 1


def verdict(report: dict[str, Any]) -> str:
    """The goal's line, from a saved report (the bench prints it; `ssp bench report` puts it in its summary)."""
    hits, n, goal = report["answer_hits_at_3"], report["questions"], report["goal"]
    ratios = report["ratios"]
    return (f"HTTP/raw = {ratios['http_engine_over_raw']:.2f}x through the engine's search batcher (one query per "
            f"request: {ratios['http_per_query_over_raw']:.2f}x) at answer-hit@3 "
            f"{100 * hits['http_engine'] / n:.1f}% vs raw {100 * hits['raw_1thread'] / n:.1f}% ({hits['http_engine']} "
            f"vs {hits['raw_1thread']} of {n} questions; goal >= {goal['speedup']:g}x, within "
            f"{goal['hit_tolerance_points']:g} point): {'met' if goal['met'] else 'NOT met'}")


def goal_met(speedup: float, raw_hits: int, http_hits: int, questions: int) -> bool:
    """The issue's goal: the server at least GOAL_SPEEDUP x raw, its hit rate at most HIT_TOLERANCE_POINTS worse.

    A better hit rate never misses: the goal guards against buying speed with quality, not against gaining both.
    Hits are counted, not divided, so that exactly one point worse is exactly one point.
    """
    return speedup >= GOAL_SPEEDUP and 100 * (raw_hits - http_hits) <= HIT_TOLERANCE_POINTS * questions


def _arms(index_dir: Path, k: int, clients: int, rollouts: int, batch_stats: SearchStats, stack: ExitStack
          ) -> dict[str, Arm]:
    """The arms of the comparison, in table order; `stack` closes the retrievers and stops the server; (d) adds
    its batches to `batch_stats`."""
    from ssp.retriever.config import RetrievalServerConfig

    server_threads = RetrievalServerConfig().search_threads  # what `ssp retriever serve` runs without a config
    raw = RawTantivy(index_dir)
    url, server_pid = stack.enter_context(_serve(index_dir))
    return {
        "raw_1thread": Arm("(a) raw tantivy-py `parse_query`", 1, lambda qs: raw.search(qs, k, 1), None),
        "raw_2threads": Arm("(a) raw tantivy-py `parse_query`", 2, lambda qs: raw.search(qs, k, 2), None),
        "ssp_1thread": Arm(f"(b) TantivyRetriever, batches of {BATCH}", 1, _in_process(index_dir, 1, k, stack), None),
        "ssp_2threads": Arm(f"(b) TantivyRetriever, batches of {BATCH}", 2, _in_process(index_dir, 2, k, stack), None),
        "http_per_query": Arm(f"(c) HTTP server, {clients} concurrent clients, one query per request",
                              server_threads, lambda qs: _over_http(url, qs, k, clients), server_pid),
        "http_engine": Arm(f"(d) HTTP server, {rollouts} rollouts through the engine's search batcher",
                           server_threads, lambda qs: _through_batcher(url, qs, k, rollouts, batch_stats), server_pid),
    }


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def count_hits(questions: list[Question], results: Passages) -> int:
    """Questions with a normalised gold answer, as whole words, in the title or text of one of their results."""
    from ssp.engine.judge import normalize_answer

    def hit(question: Question, passages: list[tuple[str, str]]) -> bool:
        golds = [f" {g} " for g in map(normalize_answer, question.answers) if g]
        texts = [f" {normalize_answer(title + ' ' + text)} " for title, text in passages]
        return any(g in t for g in golds for t in texts)

    return sum(map(hit, questions, results))


def _measure(n: int, work: Callable[[], object], server_pid: int | None = None) -> Measurement:
    cpu0, server0, start = time.process_time(), _process_cpu_s(server_pid), time.perf_counter()
    work()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + _process_cpu_s(server_pid) - server0
    return Measurement(n / wall, cpu * 1000 / n)


def _process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by another process, from /proc (Linux); 0 for none."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawTantivy:
    """The baseline: what a user writes in ten lines of tantivy-py, at its best (count=False: no match count).

    The words go through `query_text` only so that a question with a quote or a colon cannot make the parser raise;
    the NQ questions are plain lower-case words, which it leaves as they are.
    """

    def __init__(self, index_dir: Path) -> None:
        import tantivy

        from ssp.retriever.index_format import ANALYZER_NAME, make_analyzer

        self._index = tantivy.Index.open(str(index_dir))
        self._index.register_tokenizer(ANALYZER_NAME, make_analyzer())
        self._searcher = self._index.searcher()

    def _loop(self, queries: list[str], k: int, out: Passages) -> None:
        from ssp.retriever.index_format import query_text

        for q in queries:
            query = self._index.parse_query(query_text(q), ["title", "text"])
            docs = [self._searcher.doc(address) for _, address in self._searcher.search(query, k, count=False).hits]
            out.append([(d.get_first("title") or "", d.get_first("text") or "") for d in docs])

    def search(self, queries: list[str], k: int, threads: int) -> Passages:
        """Top-k passages of every query, in order; `threads` loops share the queries round-robin."""
        parts: list[Passages] = [[] for _ in range(threads)]
        workers = [threading.Thread(target=self._loop, args=(queries[i::threads], k, parts[i])) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return [parts[i % threads][i // threads] for i in range(len(queries))]


def _in_process(index_dir: Path, threads: int, k: int, stack: ExitStack) -> Callable[[list[str]], Passages]:
    """A search function over one TantivyRetriever with `threads` threads, sent batches of BATCH queries."""
    import uvloop

    from ssp.retriever.tantivy_index import TantivyRetriever

    retriever = TantivyRetriever(index_dir, threads=threads)
    stack.callback(lambda: uvloop.run(retriever.close()))

    async def batches(queries: list[str]) -> Passages:
        out: Passages = []
        for i in range(0, len(queries), BATCH):
            for docs in await retriever.search(queries[i : i + BATCH], k):
                out.append([(d.title, d.text) for d in docs])
        return out

    return lambda queries: uvloop.run(batches(queries))


@contextmanager
def _serve(index_dir: Path) -> Iterator[tuple[str, int]]:
    """`ssp retriever serve` as its own process on a free port: yields (url, pid), stops it afterwards."""
    cmd = [sys.executable, "-m", "ssp.cli", "retriever", "serve", "--index", str(index_dir), "--port", "0"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"the retrieval server did not start (exit {server.poll()}): {line!r}")
        yield line.rsplit(" on ", 1)[1].strip(), server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


def _over_http(url: str, queries: list[str], k: int, clients: int) -> Passages:
    """`clients` concurrent HttpRetriever callers on uvloop (as the engine runs), one query per request."""
    import uvloop

    from ssp.retriever.client import HttpRetriever

    async def drive() -> Passages:
        retriever = HttpRetriever(url, timeout_s=60, max_retries=0)
        out: Passages = [[] for _ in queries]
        todo = iter(range(len(queries)))

        async def client() -> None:
            for i in todo:  # the shared iterator hands each query to exactly one client
                out[i] = [(d.title, d.text) for d in (await retriever.search([queries[i]], k))[0]]

        try:
            await asyncio.gather(*(client() for _ in range(clients)))
        finally:
            await retriever.close()
        return out

    return uvloop.run(drive())


def _through_batcher(url: str, queries: list[str], k: int, rollouts: int, stats: SearchStats) -> Passages:
    """`rollouts` concurrent rollouts, each searching its next query once the last is answered, through one
    SearchBatcher with the [search] defaults over one HttpRetriever: the retrieval server as the engine uses it. The
    batcher counts into `stats` (a batcher lives in one event loop, so each call makes its own; they share stats)."""
    import uvloop

    from ssp.engine.config import SearchBatcherConfig
    from ssp.engine.search_batcher import SearchBatcher
    from ssp.retriever.client import HttpRetriever

    async def drive() -> Passages:
        retriever = HttpRetriever(url, timeout_s=60, max_retries=0)
        batcher = SearchBatcher(retriever, SearchBatcherConfig(), k=k)
        batcher.stats = stats
        out: Passages = [[] for _ in queries]
        todo = iter(range(len(queries)))

        async def rollout() -> None:
            for i in todo:  # the shared iterator hands each query to exactly one rollout
                out[i] = [(d.title, d.text) for d in await batcher.search(queries[i])]

        try:
            await asyncio.gather(*(rollout() for _ in range(rollouts)))
        finally:
            await batcher.close()
            await retriever.close()
        return out

    return uvloop.run(drive())


def _gil_stall(index_dir: Path) -> tuple[float, float]:
    """(duration of one slow search, longest gap between iterations of a Python loop while it runs), in ms.

    The slow search walks the posting list of "the" GIL_CHECK_POSTINGS / passages times, so it lasts tens of
    milliseconds on any index: long against CPython's 5 ms switch interval, which bounds the stall of a loop whose
    other thread runs Rust without the GIL. (A query of common words would not do: ssp and the parser count each
    word once, and on a small index it is over in a few ms.)
    """
    import tantivy

    from ssp.retriever.index_format import open_index

    index = open_index(index_dir)
    searcher = index.searcher()
    the = tantivy.Query.term_query(index.schema, "text", "the")
    slow = tantivy.Query.boolean_query([(tantivy.Occur.Should, the)] * max(1, GIL_CHECK_POSTINGS // searcher.num_docs))
    start = time.perf_counter()
    searcher.search(slow, 3)
    search_ms = (time.perf_counter() - start) * 1000
    done = threading.Event()
    worker = threading.Thread(target=lambda: ([searcher.search(slow, 3) for _ in range(3)], done.set()))
    last, stall = time.perf_counter(), 0.0
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        stall, last = max(stall, now - last), now
    worker.join()
    return search_ms, stall * 1000
