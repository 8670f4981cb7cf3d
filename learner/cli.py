"""`ssp learner train`: resolve the [learner] config, save it in the run folder, and launch torchrun on it.
`ssp export`: write a learner checkpoint as a Hugging Face model directory (ssp.learner.export)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ssp.cli import add_config_args
from ssp.processes import free_port


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
        epilog="Example (from a file of frames, no weight push): ssp learner train --config configs/demo.toml "
        "--trajectories artifacts/runs/<run>/samples.frames --set learner.out_dir=artifacts/learner-offline",
    )
    add_config_args(train)
    train.add_argument("--trajectories", required=True, metavar="FILE|tcp://HOST:PORT",
                       help="trajectory stream: frames of 4-byte big-endian length + msgpack (ssp.engine.trajectory); "
                       "over tcp:// the engine must hold the run key ([stream] key_file, or $SSP_RUN_KEY)")
    train.add_argument("--server", action="append", default=[], metavar="URL",
                       help="inference server to push weights to after every step (repeatable; none = no push)")
    train.set_defaults(run=run_train)

    export = sub.add_parser(
        "export",
        help="write a learner checkpoint (any tensor_parallel) as a Hugging Face model directory",
        description="Merge the TP shards of a learner checkpoint into a Hugging Face model directory: "
        "model.safetensors, config.json, and the generation config and tokenizer files of the base model (the one "
        "the run started from, as recorded in the run's learner_config.json, or --base-model). The result loads with "
        "transformers' AutoModelForCausalLM.from_pretrained and serves with `ssp model serve --model HF_DIR`.",
        epilog="Example: `ssp export --checkpoint artifacts/runs/demo/learner/checkpoints --out "
        "artifacts/models/demo-step-latest` (the latest checkpoint; name a step-NNNNNN folder for another one).",
    )
    export.add_argument("--checkpoint", type=Path, required=True, metavar="DIR",
                        help="a run's checkpoints folder (LEARNER_OUT_DIR/checkpoints: its latest checkpoint) or "
                        "one of its step-NNNNNN folders")
    export.add_argument("--out", type=Path, required=True, metavar="HF_DIR",
                        help="folder to write (created; a previous export there is replaced)")
    export.add_argument("--base-model", type=Path, metavar="DIR",
                        help="the HF directory the run started from, for config and tokenizer (default: the "
                        "model_dir in the run's learner_config.json)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the base model's)")
    export.set_defaults(run=run_export)


def run_train(args: argparse.Namespace) -> int:
    from ssp.config import load_config, to_dict, to_toml
    from ssp.metrics import plot_metrics, read_metrics
    from ssp.run_config import SSPConfig, check_sampling_matches_learner

    root = load_config(SSPConfig, args.config, args.overrides)
    check_sampling_matches_learner(root)
    cfg = root.learner
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.toml").write_text(to_toml(root))
    section = cfg.out_dir / "learner_config.json"
    section.write_text(json.dumps(to_dict(cfg), indent=1))
    stream = cfg.out_dir / "stream_config.json"  # the key file's path, never the key
    stream.write_text(json.dumps(to_dict(root.stream), indent=1))
    nproc = cfg.tensor_parallel * cfg.data_parallel * cfg.pipeline_parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "ssp.learner.trainer", "--config-json", str(section),
           "--stream-json", str(stream), "--trajectories", args.trajectories]
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


def run_export(args: argparse.Namespace) -> int:
    from ssp.learner.export import ExportError, export_checkpoint, resolve_checkpoint
    from ssp.learner.model import ModelConfigError

    try:
        step_dir = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(step_dir, args.out, base_model=args.base_model, dtype=args.dtype)
    except (ExportError, ModelConfigError) as e:
        print(f"ssp export: {e}", file=sys.stderr)
        return 2
    print(f"ssp export: wrote {out} from {step_dir}", file=sys.stderr)
    return 0
