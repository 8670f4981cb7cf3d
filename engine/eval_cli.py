"""`ssp eval`: score a model on QA benchmarks (Search-R1 protocol) and print a table; the work is
`engine.evaluation.evaluate`."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from pathlib import Path

from ssp.cli import add_config_args
from ssp.paths import DATA_DIR

DEFAULT_DATASETS = (
    DATA_DIR / "qa" / "hotpotqa_dev300_questions.jsonl",
    DATA_DIR / "qa" / "2wikimultihopqa_dev_subset_questions.jsonl",
)
"""The held-out demo QA sets, answerable from the demo index."""


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on QA benchmarks (EM, F1, answer rate, searches per question)",
        description="Evaluate with the Search-R1 protocol: the solver prompt, greedy decoding, top-k documents per "
        "search from the [retriever], at most eval.max_turns turns. Scores exact match (SQuAD-normalised, against "
        "any golden answer) and token F1 per dataset and averaged over datasets. Prints a table and writes "
        "summary.json and records.jsonl (every question with its prediction, searches and full response) to "
        "eval.out_dir. Protocol keys live in the [eval] config section.",
        epilog="Examples: `ssp eval --model artifacts/models/SmolLM2-135M-Instruct --limit 100` (starts a reference "
        "server for the directory); `ssp eval --model http://gpu-node:30000 --dataset nq.jsonl hotpotqa.jsonl "
        "--set rollout.tokenizer_dir=/models/Qwen2.5-7B-Instruct` (any SGLang server).",
    )
    add_config_args(p)
    p.add_argument("--model", default=None, metavar="DIR|URL",
                   help="a Hugging Face model directory (a reference server is started for it on a free port and "
                   "stopped at the end) or a running server's base URL http://host:port (SGLang or `ssp model "
                   "serve`; its tokenizer is rollout.tokenizer_dir). Default: the servers of [inference]")
    p.add_argument("--dataset", nargs="+", type=Path, default=list(DEFAULT_DATASETS), metavar="FILE",
                   help="JSONL files of {id, question, golden_answers}, one dataset each (default: the demo "
                   "HotpotQA and 2Wiki sets in data/qa/)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score a seeded random subset of N questions per file (default: eval.limit; 0 = all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from engine.errors import InferenceError
    from engine.evaluation import EvalDataError, evaluate, format_table
    from launcher.processes import ProcessFailed
    from retriever.errors import RetrieverError
    from ssp.config import load_config
    from ssp.run_config import SSPConfig

    cfg = load_config(SSPConfig, args.config, args.overrides)
    # SIGTERM (a scheduler or `timeout` stopping us) unwinds like Ctrl-C, so the server started for --model DIR is
    # stopped too: it runs in its own process group and would otherwise outlive this command.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = evaluate(cfg, args.dataset, model=args.model, limit=args.limit, progress=not args.no_progress)
    except (EvalDataError, FileNotFoundError) as e:
        print(f"ssp eval: {e}", file=sys.stderr)
        return 2
    except (InferenceError, ProcessFailed, RetrieverError) as e:
        print(f"ssp eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    print(f"model: {result.model}   wall time: {result.wall_s:.1f} s   results: {result.out_dir}/summary.json, "
          f"{result.out_dir}/records.jsonl")
    if result.average.errors:
        print(f"ssp eval: {result.average.errors} question(s) failed on infrastructure errors and scored 0; see "
              f"the 'error' field in {result.out_dir}/records.jsonl", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
