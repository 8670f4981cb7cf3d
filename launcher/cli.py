"""`ssp launch`: place a multi-node run (SGLang servers, retriever, Megatron learner, engine) and start it.

`just train-32b` calls it with configs/train-32b.toml. `--dry-run` prints and checks the placement plan and every
command without starting anything (no cluster needed).
"""

from __future__ import annotations

import argparse
import sys

from ssp.cli import add_config_args


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    launch = sub.add_parser(
        "launch",
        help="place and start a multi-node training run (SLURM or a host list); --dry-run checks the plan",
        description="Place every process of a multi-node run from the [cluster] section: SGLang servers (TP "
        "cluster.sglang_tp) on the rollout nodes, the Megatron learner (torchrun, TP cluster.train_tp x PP "
        "cluster.train_pp x derived DP) on the training nodes, the retriever server on a CPU node, and the engine "
        "(`ssp train` attached to all of them). The plan is validated first: TP must divide the heads, GPUs must "
        "add up, memory must fit cluster.gpu_memory_gib. Inside a SLURM allocation each process starts with srun "
        "on its node; with cluster.launcher = \"hosts\" over ssh. Logs go to <run>/logs/.",
        epilog="Example (inside a SLURM allocation of 4 x 8 GPUs): ssp launch --config configs/train-32b.toml "
        "--dry-run, then the same without --dry-run (`just train-32b`)",
    )
    add_config_args(launch)
    launch.add_argument("--dry-run", action="store_true",
                        help="print the placement plan, memory estimates and commands; start nothing")
    launch.set_defaults(run=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    from ssp.config import load_config
    from ssp.launcher.cluster_run import launch_run, prepare_launch
    from ssp.launcher.plan import PlanError, render_plan
    from ssp.run_config import SSPConfig, check_sampling_matches_learner
    from ssp.run_key import masked

    root = load_config(SSPConfig, args.config, args.overrides)
    check_sampling_matches_learner(root)
    try:
        prepared = prepare_launch(root, config_path=args.config, overrides=args.overrides,
                                  use_allocation=not args.dry_run)
    except PlanError as e:
        print(f"ssp launch: {e}", file=sys.stderr)
        return 2
    print(render_plan(root.cluster, prepared.plan))
    print(f"\nrun key {masked(prepared.run_key)} (written to {prepared.run_dir / 'stream.key'}, mode 0600, at start; "
          "every process below reads it from a file, never from its command line)")
    print("commands (run from the launching host):")
    for launch in prepared.launches:
        print(f"  [{launch.name} @ {launch.node}, key {masked(prepared.run_key)} via {launch.key_via}] "
              f"{launch.shell()}")
    if args.dry_run:
        return 0
    return launch_run(prepared)
