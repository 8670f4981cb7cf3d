"""`ssp eval`: score a model on QA benchmarks (Search-R1 protocol) and/or its proposer on held-out seed answers, and
print the tables with 95% intervals. The work is `ssp.engine.evaluation.evaluate`, which talks to servers by URL; for
`--model DIR` this command starts a reference server for the directory first (launcher/servers.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ssp.cli import add_config_args
from ssp.engine.eval_config import HELDOUT_SEEDS
from ssp.paths import DATA_DIR

if TYPE_CHECKING:
    from ssp.engine.evaluation import EvalResult
    from ssp.run_config import SSPConfig

DEFAULT_DATASETS = (
    DATA_DIR / "qa" / "hotpotqa_dev300_questions.jsonl",
    DATA_DIR / "qa" / "2wikimultihopqa_dev_subset_questions.jsonl",
)
"""The held-out demo QA sets, answerable from the demo index."""


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "eval",
        help="score a model's solver on QA benchmarks (EM, F1) and/or its proposer on held-out seeds (valid-question "
        "rate, solver accuracy), with 95%% intervals",
        description="Solver: the Search-R1 protocol, the solver prompt, greedy decoding, top-k documents per search "
        "from the [retriever], at most eval.max_turns turns. Scores exact match (SQuAD-normalised, against any golden "
        "answer) and token F1 per dataset and averaged over datasets. Proposer (--seeds): the game's own episode on "
        "each seed answer, greedy (eval.proposer_temperature, eval.verifier_temperature): the share of seeds with a "
        "question written, passing the rule checks and passing the RAG verification (valid), the verification pass "
        "rate, searches per proposer rollout, the invalid reasons, and the solver's accuracy on the valid questions "
        "(1 - the proposer's reward). Every score has a 95%% interval (Wilson for rates, Student t for means). "
        "Prints the tables and writes summary.json, records.jsonl (every question with its prediction, searches and "
        "full response) and proposer_records.jsonl (every seed with its question, reasons, verification and solver "
        "answer) to eval.out_dir. Protocol keys live in the [eval] config section.",
        epilog="Examples: `ssp eval --model artifacts/models/SmolLM2-135M-Instruct --limit 100` (QA only; starts a "
        "reference server for the directory); `ssp eval --model artifacts/models/SmolLM2-135M-Instruct --seeds "
        "--seeds-limit 50` (proposer only, 50 held-out seeds); `ssp eval --seeds --seeds-limit 16 --limit 20` "
        "(both, on the [inference] servers); `ssp eval --model http://gpu-node:30000 --dataset nq.jsonl "
        "hotpotqa.jsonl --set rollout.tokenizer_dir=/models/Qwen2.5-7B-Instruct` (any SGLang server).",
    )
    add_config_args(p)
    p.add_argument("--model", default=None, metavar="DIR|URL",
                   help="a Hugging Face model directory (a reference server is started for it on a free port and "
                   "stopped at the end) or a running server's base URL http://host:port (SGLang or `ssp model "
                   "serve`; its tokenizer is rollout.tokenizer_dir). Default: the servers of [inference]")
    p.add_argument("--dataset", nargs="+", type=Path, default=None, metavar="FILE",
                   help="JSONL files of {id, question, golden_answers}, one dataset each (default: the demo "
                   "HotpotQA and 2Wiki sets in data/qa/; with --seeds, none unless --dataset or --limit is given)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score a seeded random subset of N questions per file (default: eval.limit; 0 = all)")
    p.add_argument("--seeds", nargs="?", type=Path, const=HELDOUT_SEEDS, default=None, metavar="FILE",
                   help="evaluate the proposer on the seed answers of FILE ({answer, type, aliases?} JSONL, as "
                   f"data/seeds/); without FILE the held-out seeds {HELDOUT_SEEDS.relative_to(DATA_DIR.parent)}, "
                   "which training never draws")
    p.add_argument("--seeds-limit", type=int, default=None, metavar="N",
                   help="evaluate a seeded random subset of N seed answers (default: eval.seeds_limit; 0 = all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval)


def qa_files(dataset: list[Path] | None, *, seeds: Path | None, limit: int | None) -> list[Path]:
    """The QA files to score: those given with --dataset; else the demo sets, unless only the proposer was asked
    for (--seeds without --dataset or --limit), so `ssp eval --seeds` needs no QA file."""
    if dataset is not None:
        return dataset
    return list(DEFAULT_DATASETS) if seeds is None or limit is not None else []


def run_eval(args: argparse.Namespace) -> int:
    from ssp.config import load_config
    from ssp.engine.errors import InferenceError
    from ssp.engine.evaluation import EvalDataError, format_table
    from ssp.processes import ProcessFailed
    from ssp.retriever.errors import RetrieverError
    from ssp.run_config import SSPConfig

    cfg = load_config(SSPConfig, args.config, args.overrides)
    # SIGTERM (a scheduler or `timeout` stopping us) unwinds like Ctrl-C, so the server started for --model DIR is
    # stopped too: it runs in its own process group and would otherwise outlive this command.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = _evaluate(cfg, args)
    except (EvalDataError, FileNotFoundError) as e:
        print(f"ssp eval: {e}", file=sys.stderr)
        return 2
    except (InferenceError, ProcessFailed, RetrieverError) as e:
        print(f"ssp eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    files = [name for name, part in (("records.jsonl", result.average), ("proposer_records.jsonl", result.proposer))
             if part is not None]
    print(f"model: {result.model}   wall time: {result.wall_s:.1f} s   results: {result.out_dir}/summary.json, "
          + ", ".join(f"{result.out_dir}/{name}" for name in files))
    if result.errors:
        print(f"ssp eval: {result.errors} question(s) or seed(s) failed on infrastructure errors (scored 0, a seed "
              f"as invalid); see the 'error' field in {' and '.join(f'{result.out_dir}/{name}' for name in files)}",
              file=sys.stderr)
        return 1
    return 0


def _evaluate(cfg: SSPConfig, args: argparse.Namespace) -> EvalResult:
    """`evaluate` on the [inference] servers, on the server at --model URL, or on a reference server started here
    for --model DIR (its log in the results folder; stopped at the end)."""
    from ssp.config import to_toml
    from ssp.engine.evaluation import EvalDataError, eval_out_dir, evaluate
    from ssp.launcher.servers import reference_server

    common = dict(limit=args.limit, progress=not args.no_progress, seeds=args.seeds, seeds_limit=args.seeds_limit)
    datasets = qa_files(args.dataset, seeds=args.seeds, limit=args.limit)
    if args.model is None or args.model.startswith(("http://", "https://")):
        return evaluate(cfg.engine(), datasets, server_url=args.model, **common)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise EvalDataError(f"--model {model_dir}: no config.json there; pass a Hugging Face model directory (e.g. "
                            "the one `ssp model prepare` prints) or a server URL http://host:port")
    out = eval_out_dir(cfg.eval)
    config_path = out / "server-config.toml"
    config_path.write_text(to_toml(cfg), encoding="utf-8")
    with reference_server(model_dir, config_path=config_path, log_path=out / "logs" / "server.log",
                          timeout_s=cfg.eval.server_start_timeout_s) as (url, process):
        return evaluate(cfg.engine(), datasets, server_url=url, server_process=process, tokenizer_dir=model_dir,
                        model_label=str(model_dir), out_dir=out, **common)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
