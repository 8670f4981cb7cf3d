"""`ssp index build|search` and `ssp retriever serve`: the command-line face of retriever/."""

import argparse
import sys
from pathlib import Path

from ssp.cli import add_config_args


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    index = sub.add_parser(
        "index",
        help="build or search a Tantivy index of passages",
        description="Build a BM25 Tantivy index from JSONL corpora, or search one from the command line.",
    )
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = index_sub.add_parser(
        "build",
        help="index JSONL(.gz) corpora into a directory",
        description="Stream corpora ({id, title, text} or Search-R1 {id, contents} lines, plain or .gz) into a new "
        "Tantivy index. The index appears at --out only when complete: a failed or interrupted build leaves "
        "nothing there. Analyzer: Unicode words, lowercased, ASCII-folded, English-stemmed "
        "(retriever/index_format.py).",
        epilog="Example: ssp index build --corpus data/corpus/*.jsonl --out artifacts/index/demo --if-missing",
    )
    build.add_argument("--corpus", type=Path, nargs="+", required=True, metavar="FILE", help="corpus files, in order")
    build.add_argument("--out", type=Path, required=True, metavar="DIR", help="index directory to create")
    build.add_argument("--threads", type=int, default=2, help="Tantivy indexing threads (default: 2)")
    build.add_argument(
        "--skip-bad", action="store_true", help="skip malformed lines (counted and reported) instead of failing"
    )
    build.add_argument(
        "--if-missing", action="store_true", help="do nothing when --out already holds a complete index"
    )
    build.set_defaults(run=run_build)

    search = index_sub.add_parser(
        "search",
        help="search an index and print JSON",
        description="Search an index with one or more queries; prints a JSON list of {query, results} with each "
        "result's id, title, text and BM25 score.",
        epilog="Example: ssp index search --index artifacts/index/demo -k 3 \"Scott Derrickson\"",
    )
    search.add_argument("--index", type=Path, required=True, metavar="DIR", help="index directory")
    search.add_argument("-k", type=int, default=3, help="results per query (default: 3)")
    search.add_argument("queries", nargs="+", metavar="QUERY", help="free text; query syntax is not interpreted")
    search.set_defaults(run=run_search)

    retriever = sub.add_parser(
        "retriever", help="run the retrieval server", description="Serve an index over HTTP (Search-R1 protocol)."
    )
    retriever_sub = retriever.add_subparsers(dest="retriever_command", required=True, metavar="ACTION")
    serve = retriever_sub.add_parser(
        "serve",
        help="serve POST /retrieve (Search-R1 protocol) and GET /health",
        description="Serve a Tantivy index with Search-R1's /retrieve protocol (JSON or msgpack bodies) until "
        "Ctrl-C. Request limits are in the [retrieval_server] config section (`ssp config show`); --index, "
        "--host and --port override its keys.",
        epilog="Example: ssp retriever serve --index artifacts/index/demo --port 8000",
    )
    serve.add_argument("--index", type=Path, metavar="DIR", help="index directory (retrieval_server.index_dir)")
    serve.add_argument("--host", help="listen address (retrieval_server.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port, 0 = any free one (retrieval_server.port, default 8000)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key "
                       "(retrieval_server.api_key_file); anyone reaching the port can then search")
    add_config_args(serve)
    serve.set_defaults(run=run_serve)


def run_build(args: argparse.Namespace) -> int:
    from ssp.retriever.errors import RetrieverError
    from ssp.retriever.index_build import build_index

    try:
        report = build_index(
            args.corpus, args.out, threads=args.threads, skip_bad=args.skip_bad, if_missing=args.if_missing
        )
    except RetrieverError as e:
        print(f"ssp index build: {e}", file=sys.stderr)
        return 1
    if report.reused:
        print(f"index {report.out} already complete ({report.docs} passages); --if-missing: kept it")
        return 0
    rate = report.docs / report.seconds if report.seconds else 0.0
    print(f"indexed {report.docs} passages into {report.out} in {report.seconds:.1f} s ({rate:,.0f} docs/s)")
    if report.skipped_lines:
        print(f"skipped {report.skipped_lines} malformed line(s) (--skip-bad); first ones:")
        for example in report.bad_examples:
            print(f"  {example}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from ssp.retriever.errors import RetrieverError
    from ssp.retriever.tantivy_index import TantivySearcher, check_k

    try:
        check_k(args.k)
        searcher = TantivySearcher(args.index)
    except (RetrieverError, ValueError) as e:
        print(f"ssp index search: {e}", file=sys.stderr)
        return 1
    out = [
        {"query": q, "results": [{**asdict(d), "score": round(d.score, 4)} for d in docs]}
        for q, docs in zip(args.queries, searcher.search_many(args.queries, args.k))
    ]
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import uvloop

    from ssp.config import load_config
    from ssp.paths import default_index_dir
    from ssp.retriever.config import RetrievalServerConfig
    from ssp.retriever.errors import RetrieverError
    from ssp.retriever.server import serve
    from ssp.run_config import SSPConfig

    cfg: RetrievalServerConfig = load_config(SSPConfig, args.config, args.overrides).retrieval_server
    flags = {"index_dir": args.index, "host": args.host, "port": args.port}
    try:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
        uvloop.run(serve(cfg, cfg.index_dir or default_index_dir(), ready=lambda line: print(line, flush=True),
                         insecure=args.insecure))
    except (RetrieverError, ValueError) as e:
        print(f"ssp retriever serve: {e}", file=sys.stderr)
        return 1
    return 0
