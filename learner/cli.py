"""`ssp learner train`: resolve the [learner] config, save it in the run folder, and launch torchrun on it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from launcher.processes import free_port
from ssp.cli import add_config_args


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    learner = sub.add_parser("learner", help="the Megatron learner: train on a trajectory stream, push weights",
                             description="The Megatron learner (megatron-core GPTModel, TP x DP under torchrun).")
    learner_sub = learner.add_subparsers(dest="learner_command", required=True, metavar="SUBCOMMAND")
    train = learner_sub.add_parser(
        "train",
        help="train on trajectories (a file of frames or tcp://HOST:PORT), pushing weights after each step",
        description="Launch torchrun with learner.tensor_parallel x learner.data_parallel ranks. Each step consumes "
        "learner.groups_per_step trajectory groups, takes one AdamW step, checkpoints (atomically) and pushes the "
        "weights to every --server. Re-running the same command resumes from the last complete checkpoint in "
        "learner.out_dir without training any trajectory twice. Metrics: OUT_DIR/metrics.jsonl (+ metrics.png).",
    )
    add_config_args(train)
    train.add_argument("--trajectories", required=True, metavar="FILE|tcp://HOST:PORT",
                       help="trajectory stream: frames of 4-byte big-endian length + msgpack (engine.trajectory)")
    train.add_argument("--server", action="append", default=[], metavar="URL",
                       help="inference server to push weights to after every step (repeatable; none = no push)")
    train.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ssp.config import load_config, to_dict, to_toml
    from ssp.metrics import plot_metrics, read_metrics
    from ssp.run_config import SSPConfig

    root = load_config(SSPConfig, args.config, args.overrides)
    cfg = root.learner
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.toml").write_text(to_toml(root))
    section = cfg.out_dir / "learner_config.json"
    section.write_text(json.dumps(to_dict(cfg), indent=1))
    nproc = cfg.tensor_parallel * cfg.data_parallel * cfg.pipeline_parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "learner.trainer", "--config-json", str(section),
           "--trajectories", args.trajectories]
    for url in args.server:
        cmd += ["--server", url]
    print(f"ssp learner: launching {nproc} rank(s): {' '.join(cmd)}", file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    rc = subprocess.call(cmd, env=env)
    metrics_path = cfg.out_dir / "metrics.jsonl"
    if metrics_path.is_file():
        records = [r for r in read_metrics(metrics_path) if r.get("trained")]
        if records:
            plot_metrics(records, ["loss", "pg_loss", "grad_norm", "logprob_mismatch_mean", "clip_frac",
                                   "tokens_per_s"], cfg.out_dir / "metrics.png", title="learner")
            last = records[-1]
            print(f"ssp learner: {len(records)} step(s) logged, last step {last['step']}: loss {last['loss']:.4g}, "
                  f"logprob mismatch {last['logprob_mismatch_mean']:.2e}, {last['tokens_per_s']:.0f} tok/s; "
                  f"metrics in {metrics_path}", file=sys.stderr)
    return rc
