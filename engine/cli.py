"""`ssp rollout` (play SSP episodes, write trajectory frames to a file) and `ssp inspect` (read such a file)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ssp.cli import add_config_args

if TYPE_CHECKING:
    from ssp.engine.chat import ChatTokenizer
    from ssp.engine.trajectory import Trajectory


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    rollout = sub.add_parser(
        "rollout",
        help="play SSP episodes against the inference servers and write the trajectories to a file",
        description="Play self-play episodes (proposer -> checks -> RAG verification -> solver group -> rewards) "
        "with the configured inference servers ([inference]) and retriever ([retriever]), and write one frame per "
        "episode to --out (the exact frames the learner reads). Prints a summary; see `ssp inspect` to read them.",
        epilog="Example (the demo's servers started first: `ssp model serve &`): ssp rollout --config configs/demo.toml "
        "--episodes 8 --out artifacts/runs/demo.frames",
    )
    add_config_args(rollout)
    rollout.add_argument("--episodes", type=int, default=8, help="episodes to play (default: 8)")
    rollout.add_argument("--out", type=Path, required=True, help="frames file to write (appended to if it exists)")
    rollout.add_argument("--metrics", type=Path, default=None,
                         help="JSONL metrics file (default: next to --out, with suffix .metrics.jsonl)")
    rollout.set_defaults(run=run_rollout)

    inspect = sub.add_parser(
        "inspect",
        help="print the trajectories of a frames file readably, or as JSON",
        description="Read a frames file (from `ssp rollout --out` or a spill file). By default prints each "
        "trajectory with its masks: generated text as is, tool output (loss mask 0) in [[ ]] and dimmed on a "
        "terminal. --json prints one JSON object per trajectory with the schema fields.",
        epilog="Example: ssp inspect artifacts/runs/<run>/samples.frames --role proposer --limit 3",
    )
    inspect.add_argument("file", type=Path, help="frames file")
    inspect.add_argument("--json", action="store_true", help="one JSON object per trajectory (schema fields)")
    inspect.add_argument("--role", choices=("proposer", "verifier", "solver"), default=None,
                         help="only trajectories of this role")
    inspect.add_argument("--limit", type=int, default=None, help="print at most this many trajectories")
    inspect.add_argument("--tokenizer", type=Path, default=None,
                         help="HF directory whose tokenizer decodes the ids (default: the prepared SmolLM2)")
    inspect.set_defaults(run=run_inspect)


def run_rollout(args: argparse.Namespace) -> int:
    import uvloop

    from ssp.config import load_config
    from ssp.engine.assemble import run_engine
    from ssp.run_config import SSPConfig

    if args.episodes < 1:
        print(f"ssp rollout: --episodes {args.episodes}: must be >= 1", file=sys.stderr)
        return 2
    from ssp.engine.errors import InferenceError
    from ssp.engine.seeds import SeedError
    from ssp.retriever.errors import RetrieverError

    cfg = load_config(SSPConfig, args.config, args.overrides).engine()
    metrics = args.metrics or args.out.with_suffix(".metrics.jsonl")
    from tqdm import tqdm

    from ssp.metrics import plot_metrics, read_metrics

    with tqdm(total=args.episodes, desc="episodes", unit="ep") as bar:
        def on_episode(finished: bool) -> None:
            bar.update(1)
            if not finished:
                bar.set_postfix_str("some failed, see the log")

        try:
            summary = uvloop.run(run_engine(cfg, episodes=args.episodes, out=args.out, metrics_path=metrics,
                                            on_episode=on_episode))
        except (InferenceError, RetrieverError, SeedError, FileNotFoundError, ConnectionError, ValueError) as e:
            print(f"ssp rollout: {e}", file=sys.stderr)
            return 2
    print(format_summary(summary))
    plot = metrics.with_suffix(".png")
    plot_metrics(read_metrics(metrics), ["episodes_per_s", "tokens_per_s", "validity_rate", "solver_accuracy",
                                         "slot_occupancy", "loop_lag_p99_ms"], plot, x_key="time_s",
                 title=f"ssp rollout {args.out.name}")
    print(f"frames: {args.out}   metrics: {metrics}   plot: {plot}")
    return 0 if summary["episodes_finished"] > 0 else 1


def format_summary(s: dict[str, object]) -> str:
    keys = ("episodes_finished", "episodes_failed", "failure_reasons", "elapsed_s", "episodes_per_s", "tokens_per_s",
            "extraction_rate", "validity_rate", "invalid_reasons", "solver_accuracy", "proposer_reward_mean",
            "zero_variance_groups", "trajectories", "frames_sent", "frames_spilled", "spill_path",
            "turn_overhead_p50_ms", "turn_overhead_p99_ms", "loop_lag_p99_ms", "slot_occupancy_mean",
            "search_batch_mean", "judge")
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {s.get(k)}" for k in keys if k in s)


def run_inspect(args: argparse.Namespace) -> int:
    from ssp.engine.stream import FrameError, read_frames
    from ssp.engine.trajectory import SchemaError, unpack_group

    try:
        groups = [unpack_group(p) for p in read_frames(args.file)]
    except FileNotFoundError:
        print(f"ssp inspect: {args.file} does not exist", file=sys.stderr)
        return 2
    except (FrameError, SchemaError) as e:
        print(f"ssp inspect: {args.file}: {e}", file=sys.stderr)
        return 2
    trajectories = [t for g in groups for t in g if args.role is None or t.role == args.role]
    if args.limit is not None:
        trajectories = trajectories[:args.limit]
    if args.json:
        try:
            for t in trajectories:
                print(json.dumps(t.to_dict()))
        except BrokenPipeError:  # e.g. piped into `head`
            sys.stdout = open(os.devnull, "w")
        return 0
    from ssp.engine.chat import ChatTokenizer
    from ssp.paths import default_model_dir

    chat = ChatTokenizer.load(args.tokenizer or default_model_dir())
    color = sys.stdout.isatty()
    for t in trajectories:
        print(render_trajectory(t, chat, color=color))
    print(f"{len(groups)} groups, {len(trajectories)} trajectories shown")
    return 0


def render_trajectory(t: Trajectory, chat: ChatTokenizer, *, color: bool) -> str:
    """Header, then the prompt, then the response span by span: generated as is, tool output in [[...]]."""
    dim, bold, reset = ("\x1b[2m", "\x1b[1m", "\x1b[0m") if color else ("", "", "")
    versions = sorted({v for v in t.policy_versions if v >= 0})
    meta = {k: v for k, v in t.meta.items() if k != "segments"}
    lines = [
        f"{bold}=== {t.role} · group {t.group_id} · reward {t.reward:g} · "
        f"{sum(t.loss_mask)}/{len(t.response_ids)} trained tokens · policy versions {versions}{reset}",
        f"meta: {json.dumps(meta, ensure_ascii=False)}",
        f"{dim}--- prompt ({len(t.prompt_ids)} tokens) ---{reset}",
        f"{dim}{chat.decode(t.prompt_ids)}{reset}",
        f"--- response ({len(t.response_ids)} tokens; [[ ]] = tool output, loss mask 0) ---",
    ]
    parts, i, n = [], 0, len(t.response_ids)
    while i < n:
        j = i
        while j < n and t.loss_mask[j] == t.loss_mask[i]:
            j += 1
        text = chat.decode(t.response_ids[i:j])
        parts.append(text if t.loss_mask[i] else f"{dim}[[{text}]]{reset}")
        i = j
    lines.append("".join(parts))
    return "\n".join(lines) + "\n"
