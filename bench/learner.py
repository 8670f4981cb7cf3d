"""`ssp bench learner`: tokens/s of one learner training step at TP=1 and TP=2, side by side in one run.

Each configuration runs under torchrun (`bench/learner_worker.py`, gloo on CPU, NCCL on GPU): a megatron GPTModel
of the chosen shape with random weights, synthetic trajectory groups (GRPO solver groups + proposers), a warm-up
step, then `--steps` timed optimizer steps (forward with recomputed logprobs, PPO loss, backward, clip, AdamW).
Prints tokens/s, seconds per step and model TFLOP/s (6 x params x tokens / s) per TP size, the ratio TP=2 / TP=1,
and MFU when --peak-tflops is given (on GPU). Writes artifacts/bench/learner.json (+ .md).

Shapes: "tiny" (a 2-layer Llama, seconds on a laptop), "smollm2" (SmolLM2-135M's shape; TP must divide 3 KV
heads, so only TP=1 and TP=3), "qwen2-1b" (a ~1B Qwen2-shaped model for a GPU run, bf16).
NOTE: on a shared 2-core machine TP=2 mostly measures contention; the ratio is meaningful on idle cores or GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher.processes import free_port
from ssp.paths import PROJECT_ROOT, artifacts_dir

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(architectures=["LlamaForCausalLM"], vocab_size=4096, hidden_size=256, intermediate_size=768,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096),
    "smollm2": dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2-1b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=2048,
                     intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=2,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                     max_position_embeddings=32768),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes to compare (default: 1 2)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per TP size (default: 3)")
    p.add_argument("--groups", type=int, default=4, help="trajectory groups per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per trajectory (default: 256)")
    p.add_argument("--micro-batch-tokens", type=int, default=2048, help="token budget per micro-batch")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="accelerator peak TFLOP/s for MFU (e.g. 989 for an H100 in bf16); 0 = no MFU")
    p.add_argument("--out", type=Path, help="JSON report path (default: artifacts/bench/learner.json)")


def _run_tp(args: argparse.Namespace, tp: int, out_dir: Path) -> dict[str, Any]:
    result = out_dir / f"learner_tp{tp}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(PROJECT_ROOT / "bench" / "learner_worker.py"),
           "--shape-json", json.dumps(SHAPES[args.shape]), "--steps", str(args.steps), "--groups", str(args.groups),
           "--seq-len", str(args.seq_len), "--micro-batch-tokens", str(args.micro_batch_tokens),
           "--out", str(result)]
    # The same threads per rank in every configuration (what the largest TP can have): oversubscribed OpenMP
    # threads on a busy machine spin and distort the comparison far more than the TP split itself.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(args.tp)))}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TP={tp} bench failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def run(args: argparse.Namespace) -> int:
    out = args.out or artifacts_dir() / "bench" / "learner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for tp in args.tp:
        print(f"learner bench: shape {args.shape}, TP={tp} ...", file=sys.stderr)
        r = _run_tp(args, tp, out.parent)
        r["model_tflops"] = 6 * r["params"] * r["tokens_per_s"] / 1e12
        if args.peak_tflops:
            r["mfu"] = r["model_tflops"] / (args.peak_tflops * tp)
        rows.append(r)
    base = rows[0]["tokens_per_s"]
    threads = max(1, (os.cpu_count() or 1) // max(args.tp))
    lines = [f"# ssp bench learner ({args.shape}, {rows[0]['device']}, {rows[0]['dtype']}, {threads} thread(s) per rank)",
             "",
             "| TP | params | tokens/step | s/step | tokens/s | model TFLOP/s | vs first |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tp']} | {r['params'] / 1e6:.1f} M | {r['tokens_per_step']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.4f} | {r['tokens_per_s'] / base:.2f}x |"
                     + (f" MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    table = "\n".join(lines)
    print(table)
    out.write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"learner bench: wrote {out}", file=sys.stderr)
    return 0
