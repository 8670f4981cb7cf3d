"""`ssp config show`: print the resolved config (file + overrides + defaults) as documented TOML."""

import argparse

from ssp.cli import add_config_args


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    config = sub.add_parser("config", help="inspect configs: `ssp config show` prints one with every key documented",
                            description="Inspect ssp configs.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_sub.add_parser(
        "show",
        help="print the resolved config with every key documented",
        description="Print the config that a command would run with (defaults < --config file < --set), as TOML "
        "with each key's documentation as a comment. Save it, edit it, pass it back with --config.",
        epilog="Example: ssp config show --config configs/demo.toml --set train.steps=20 > mine.toml",
    )
    add_config_args(show)
    show.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    from ssp.config import load_config, to_toml
    from ssp.run_config import SSPConfig

    print(to_toml(load_config(SSPConfig, args.config, args.overrides)), end="")
    return 0
