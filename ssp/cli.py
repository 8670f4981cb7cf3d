"""The `ssp` command line: one entry point whose subcommands each belong to a room.

Each room module in COMMAND_MODULES exposes `add_commands(subparsers)`, which adds its subcommands and sets
`run=<function(args) -> int>` on each. Rooms import heavy dependencies (torch, transformers) inside those functions,
so `ssp --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

COMMAND_MODULES = (
    # running: train (one machine), launch (a cluster), eval, rollout and inspect (ssp.engine.cli)
    "ssp.launcher.train_cli",
    "ssp.launcher.cli",
    "ssp.launcher.eval_cli",
    "ssp.engine.cli",
    # the pieces alone: learner and export, model (serving), index and retriever
    "ssp.learner.cli",
    "ssp.serving.cli",
    "ssp.retriever.cli",
    # tools
    "ssp.bench.cli",
    "ssp.config_cli",
)
"""In the order `ssp --help` lists their commands: what users run first, then the pieces, then the tools."""


def add_config_args(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    """The two config flags every config-driven command takes: --config FILE and repeated --set KEY=VALUE."""
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"TOML config file (default: {default or 'built-in defaults'}); see configs/ and `ssp config show`",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set scheduler.max_inflight=64 (repeatable; VALUE is a TOML literal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssp",
        description=(
            "Search Self-Play: train LLM deep-search agents by self-play between a question proposer and a "
            "search-using solver, without human labels."
        ),
        epilog=("Commands: train / launch / eval / rollout / inspect run and read training; learner, export, "
                "model, index and retriever start or convert one piece; bench and config are tools. Run `ssp "
                "COMMAND --help` for each command's options and an example. Quick start: `just demo`."),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from ssp.config import ConfigError

    try:
        return int(args.run(args) or 0)
    except ConfigError as e:
        print(f"ssp: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
