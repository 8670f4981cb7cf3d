"""`ssp train`: the command line of ssp.launcher.train (flags, exit codes, the messages a person reads)."""

from __future__ import annotations

import argparse
import shlex
import sys

from ssp.cli import add_config_args


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "train",
        help="train by search self-play: servers, retriever, learner and engine in one command",
        description="Start (or attach to) the inference servers, the retriever and the Megatron learner, run the "
        "engine streaming episodes to the learner for train.steps optimizer steps (weights pushed to the servers "
        "after each), with a live step table. Writes metrics.jsonl, train.png, samples.frames, summary.json, logs/ "
        "and the learner's checkpoints to the run folder (artifacts/runs/<train.name>). With train.eval_datasets, "
        "scores the policy before the first and after the last step. Any piece dying stops the run with its name "
        "and log; the last checkpoint stays resumable.",
        epilog="What is started vs attached to: [train] server_urls (empty = start train.servers reference servers), "
        "learner_address (unset = start torchrun here), start_retriever (with retriever.kind = \"http\"); see "
        "`ssp config`. Examples: `ssp train --config configs/demo.toml`; `ssp train --config configs/demo.toml "
        "--resume --set train.steps=6`.",
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its latest checkpoint (no group is trained twice)")
    p.add_argument("--no-progress", action="store_true", help="plain lines instead of progress bars")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ssp.config import load_config
    from ssp.launcher.monitor import ComponentFailed
    from ssp.launcher.run_folder import run_dir_of
    from ssp.launcher.run_summary import failure_hint, format_result
    from ssp.launcher.train import Interrupted, TrainError, train
    from ssp.run_config import SSPConfig

    cfg = load_config(SSPConfig, args.config, args.overrides)
    resume_cmd = " ".join(["ssp train", *(["--config", shlex.quote(str(args.config))] if args.config else []),
                           "--resume", *(f"--set {shlex.quote(o)}" for o in args.overrides)])
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except TrainError as e:
        print(f"ssp train: {e}", file=sys.stderr)
        return 2
    except ComponentFailed as e:
        print(f"ssp train: {e}\nssp train: {failure_hint(run_dir_of(cfg), resume_cmd)}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"ssp train: {e}; every process was stopped.\nssp train: {failure_hint(run_dir_of(cfg), resume_cmd)}",
              file=sys.stderr)
        return 130
    print(format_result(result))
    return 0
