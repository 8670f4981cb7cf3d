"""`ssp bench learner`: tokens/s of one learner training step at TP=1 and TP=2, side by side in one run.

Each configuration runs under torchrun (`bench/learner_worker.py`, gloo on CPU, NCCL on GPU): a megatron GPTModel
of the chosen shape with random weights, synthetic trajectory groups (GRPO solver groups + proposers), a warm-up
step, then `--steps` timed optimizer steps (forward with recomputed logprobs, PPO loss, backward, clip, AdamW).
Prints tokens/s, seconds per step and model TFLOP/s (6 x params x tokens / s) per TP size, the ratio TP=2 / TP=1,
and MFU when --peak-tflops is given (on GPU). Writes artifacts/bench/learner.json (+ .md).

Shapes: "tiny" (a 2-layer Llama, seconds on a laptop), "smollm2" (SmolLM2-135M's shape; TP must divide 3 KV
heads, so only TP=1 and TP=3), "qwen2-1b" (a ~1B Qwen2-shaped model for a GPU run, bf16).
NOTE: on a shared 2-core machine TP=2 mostly measures contention; the ratio is meaningful on idle cores or GPUs.

The transformers arm (`--vs-transformers`, on by default) asks how close the learner comes to the plain library:
in this process, on all --threads cores, the learner (TP=1, `Trainer.train_step`) and a transformers
AutoModelForCausalLM of the same weights (fp32, train mode, dropout 0, SDPA attention) take turns on the very same
batch: the learner's own micro-batches (`ssp.learner.batching`: same rows, same right padding), the same PPO loss at
the same trained positions (transformers' lm_head also runs only there, as the learner's output layer does), then
gradient clipping and torch's AdamW with its defaults (what a plain training loop runs). Both arms therefore do
the same model FLOPs; the line `learner/transformers tokens/s ratio` compares whole steps, and forward+backward
alone is reported next to it. Each arm's GFLOP/s (6 x params x tokens / s: a yardstick, the same for both arms,
that counts the output layer at every token though both run it only at the trained ones, and leaves attention out)
is set against an fp32 GEMM of the MLP's shape at the same threads: the bound either arm could reach. The first step checks that both arms
computed the same loss. `--model-dir` uses a HF checkpoint (e.g. SmolLM2) instead of random weights of --shape,
`--frames` real trajectory groups (a `samples.frames` of a run) instead of synthetic ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from ssp.paths import PROJECT_ROOT, artifacts_dir
from ssp.processes import free_port

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
    p.add_argument("--tp", type=int, nargs="*", default=[1, 2],
                   help="TP sizes to compare (default: 1 2; none: only the transformers comparison)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per TP size and arm (default: 3)")
    p.add_argument("--groups", type=int, default=4, help="trajectory groups per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per trajectory (default: 256)")
    p.add_argument("--micro-batch-tokens", type=int, default=2048, help="token budget per micro-batch")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="accelerator peak TFLOP/s for MFU (e.g. 989 for an H100 in bf16); 0 = no MFU")
    p.add_argument("--vs-transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a plain transformers training step on the same batch, side by side with the "
                        "learner at TP=1, and print their tokens/s ratio (default: on)")
    p.add_argument("--model-dir", type=Path,
                   help="HF checkpoint both arms of the comparison load (default: random weights of --shape)")
    p.add_argument("--frames", type=Path,
                   help="trajectory frames (a run's samples.frames) for the comparison: its first --groups groups "
                        "(default: synthetic groups of --seq-len tokens)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the comparison, both arms (default: all cores)")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="untimed steps per arm before the comparison's timed ones (default: 2; the first steps of a "
                        "process also pay for growing its heap)")
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


def _random_checkpoint(shape: str, where: Path) -> Path:
    """A HF checkpoint of `shape` with transformers' own random initialisation (seeded), for both arms to load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[fields["architectures"][0]]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).save_pretrained(where)
    return where


def _comparison_groups(args: argparse.Namespace, vocab_size: int) -> list[list[Any]]:
    """The comparison's batch: the first --groups groups of --frames, else synthetic groups (as the TP arms')."""
    if args.frames is None:
        from ssp.bench.learner_worker import _groups as synthetic_groups

        return synthetic_groups(args.groups, args.seq_len, vocab_size, seed=0)
    from ssp.engine.stream import read_frames
    from ssp.engine.trajectory import unpack_group

    groups = [unpack_group(payload) for payload in read_frames(args.frames)][: args.groups]
    top = max((max(t.prompt_ids + t.response_ids, default=0) for g in groups for t in g), default=0)
    if top >= vocab_size:
        raise ValueError(f"{args.frames}: token id {top} is outside the model's vocabulary ({vocab_size}); pass the "
                         "--model-dir these trajectories were sampled from")
    return groups


def gemm_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of an fp32 (m, k) @ (k, n) matmul at the current torch threads: the rate the linear layers, most
    of a step's FLOPs, can reach at best on this machine."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    c = torch.mm(a, b)
    reps = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        torch.mm(a, b, out=c)
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


class TransformersArm:
    """A plain transformers training step on the learner's micro-batches: forward, the learner's PPO loss at the
    trained positions, backward, `clip_grad_norm_`, torch's AdamW with its defaults."""

    def __init__(self, model: Any, cfg: Any) -> None:
        import torch

        self.model = model
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)

    def step(self, micro_batches: list[Any], total_loss_tokens: int, total_seqs: int) -> tuple[float, float, float]:
        """One optimizer step over `micro_batches`; returns (forward+backward s, whole step s, loss)."""
        import torch

        from ssp.learner.loss import aggregation_weights, policy_loss

        started = time.perf_counter()
        self.optimizer.zero_grad()
        decoder, lm_head = self.model.base_model, self.model.get_output_embeddings()
        loss = 0.0
        for mb in micro_batches:
            weights = aggregation_weights(mb.loss_mask, self.cfg.loss.aggregation, total_tokens=total_loss_tokens,
                                          total_seqs=total_seqs) * mb.role_weights
            at = mb.loss_mask.nonzero(as_tuple=True)
            hidden = decoder(input_ids=mb.input_ids, position_ids=mb.position_ids).last_hidden_state
            logits = lm_head(hidden[at]).float()  # (K, V): the output layer only where the loss needs it
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, mb.targets[at].unsqueeze(-1)).squeeze(-1)
            parts = policy_loss(logprobs[None], mb.old_logprobs[at][None], mb.advantages[at][None],
                                weights[at][None], self.cfg.loss)
            parts.loss.backward()
            loss += parts.loss.item()
        fwd_bwd_done = time.perf_counter()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return fwd_bwd_done - started, time.perf_counter() - started, loss


def _timed_learner_step(trainer: Any, groups: list[list[Any]]) -> tuple[float, float, float]:
    """One `Trainer.train_step`; returns (forward+backward s, whole step s, loss). Forward+backward ends where the
    optimizer phase begins: the trainer's call of `collect_grads`."""
    optimizer = trainer.optimizer
    collect_grads = optimizer.collect_grads
    marks: list[float] = []

    def marked_collect_grads() -> None:
        marks.append(time.perf_counter())
        collect_grads()

    optimizer.collect_grads = marked_collect_grads
    try:
        started = time.perf_counter()
        result = trainer.train_step(groups, policy_version=0)
        finished = time.perf_counter()
    finally:
        del optimizer.collect_grads  # back to the class's method
    return marks[0] - started, finished - started, result.metrics["loss"]


def summarize_comparison(*, learner: list[tuple[float, float]], transformers: list[tuple[float, float]],
                         tokens: int, params: int, gemm_gflops: float) -> dict[str, Any]:
    """Per arm the medians of (forward+backward s, whole step s) over its timed steps, tokens/s, GFLOP/s
    (6 x params x tokens / s) and its share of the GEMM bound; then learner / transformers ratios (> 1: the learner
    is faster) of whole steps and of forward+backward alone."""
    def arm(times: list[tuple[float, float]]) -> dict[str, float]:
        step_s = statistics.median(t for _, t in times)
        gflops = 6 * params * tokens / step_s / 1e9
        return {"step_s": step_s, "fwd_bwd_s": statistics.median(f for f, _ in times),
                "optimizer_s": statistics.median(t - f for f, t in times), "tokens_per_s": tokens / step_s,
                "gflops": gflops, "of_gemm_bound": gflops / gemm_gflops}

    ours, theirs = arm(learner), arm(transformers)
    return {"learner": ours, "transformers": theirs, "tokens_per_step": tokens, "params": params,
            "gemm_gflops": gemm_gflops, "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "fwd_bwd_ratio": theirs["fwd_bwd_s"] / ours["fwd_bwd_s"]}


def ratio_line(c: dict[str, Any]) -> str:
    """The line the learner's speed is judged by."""
    ours, theirs = c["learner"], c["transformers"]
    return (f"learner/transformers tokens/s ratio: {c['ratio']:.2f} (learner {ours['tokens_per_s']:.1f} tokens/s, "
            f"{ours['gflops']:.1f} GFLOP/s = {ours['of_gemm_bound']:.0%} of the GEMM bound; transformers "
            f"{theirs['tokens_per_s']:.1f} tokens/s, {theirs['gflops']:.1f} GFLOP/s = {theirs['of_gemm_bound']:.0%}; "
            f"fp32 GEMM {c['gemm_gflops']:.1f} GFLOP/s; forward+backward alone {c['fwd_bwd_ratio']:.2f})")


def compare_with_transformers(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """The transformers arm (module docstring): both models from one checkpoint, one batch, steps taken in turns
    (the first of each pair alternates, so drift in the machine's speed falls on both arms alike)."""
    import torch
    from transformers import AutoModelForCausalLM

    # megatron-core announces at import that it falls back from apex / transformer-engine: expected on CPU.
    warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")
    from ssp.learner.batching import collate, pack, plan_batch, shard
    from ssp.learner.config import LearnerConfig
    from ssp.learner.convert import load_hf_into_model
    from ssp.learner.model import ModelShape, build_model, destroy_parallel, init_parallel
    from ssp.learner.trainer import Trainer

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or _random_checkpoint(args.shape, work_dir / f"random-{args.shape}")
    shape = ModelShape.from_dir(model_dir)
    cfg = LearnerConfig(model_dir=model_dir, micro_batch_tokens=args.micro_batch_tokens,
                        drop_zero_variance_groups=False, lr=1e-6, warmup_steps=0)
    groups = _comparison_groups(args, shape.vocab_size)
    par = init_parallel(tp=1, device="cpu")
    try:
        model = build_model(shape, par, vocab_divisor=cfg.vocab_divisor)
        load_hf_into_model(model, model_dir, shape, tp=1, tp_rank=0, vocab_divisor=cfg.vocab_divisor)
        trainer = Trainer(cfg, par, shape, model, None)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        hf_model.train()
        reference = TransformersArm(hf_model, cfg)
        # The learner's own micro-batches (trainer.train_step plans and packs them the same way, DP = 1).
        plan = plan_batch(groups, cfg, policy_version=0)
        micro_batches = [collate(samples, cfg.role_loss_weights, par.device)
                         for samples in pack(shard(plan.samples, 1, 0), cfg.micro_batch_tokens)]
        tokens = sum(mb.n_tokens for mb in micro_batches)
        # Positions the model runs on: a sample of n tokens is a row of n - 1 inputs, right-padded to the longest.
        positions = sum(mb.n_tokens - mb.input_ids.shape[0] for mb in micro_batches)
        padded = sum(mb.input_ids.numel() for mb in micro_batches)
        bound = gemm_gflops(max(mb.input_ids.numel() for mb in micro_batches), shape.hidden_size,
                            shape.ffn_hidden_size)
        times: dict[str, list[tuple[float, float]]] = {"learner": [], "transformers": []}
        losses: dict[str, float] = {}
        for step in range(args.warmup_steps + args.steps):
            for arm in (("learner", "transformers") if step % 2 == 0 else ("transformers", "learner")):
                if arm == "learner":
                    fwd_bwd_s, step_s, loss = _timed_learner_step(trainer, groups)
                else:
                    fwd_bwd_s, step_s, loss = reference.step(micro_batches, plan.total_loss_tokens, plan.total_seqs)
                if step >= args.warmup_steps:
                    times[arm].append((fwd_bwd_s, step_s))
                elif step == 0:  # both arms still hold the same weights
                    losses[arm] = loss
        params = sum(p.numel() for p in hf_model.parameters())
    finally:
        destroy_parallel()
    summary = summarize_comparison(learner=times["learner"], transformers=times["transformers"], tokens=tokens,
                                   params=params, gemm_gflops=bound)
    return {**summary, "model": str(args.model_dir) if args.model_dir else f"random {args.shape}",
            "batch": str(args.frames) if args.frames else f"synthetic {args.groups} groups x {args.seq_len} tokens",
            "micro_batches": len(micro_batches), "positions_per_step": positions, "padded_positions_per_step": padded,
            "threads": args.threads,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "first_loss": losses}


def comparison_markdown(c: dict[str, Any]) -> str:
    rows = ["## Learner vs plain transformers (TP=1, same batch, side by side)", "",
            f"Model: {c['model']}; batch: {c['batch']}: {c['tokens_per_step']} tokens in {c['micro_batches']} "
            f"micro-batches, {c['padded_positions_per_step']} positions run of which "
            f"{1 - c['positions_per_step'] / c['padded_positions_per_step']:.1%} padding; "
            f"{c['threads']} thread(s); median of {c['steps']} steps per arm after {c['warmup_steps']} warm-up "
            f"steps. First step's loss (same weights): learner {c['first_loss']['learner']:.7g}, transformers "
            f"{c['first_loss']['transformers']:.7g}.", "",
            "| arm | s/step | forward+backward s | optimizer s | tokens/s | GFLOP/s | of GEMM bound |",
            "|---|---|---|---|---|---|---|"]
    for name in ("learner", "transformers"):
        a = c[name]
        rows.append(f"| {name} | {a['step_s']:.3f} | {a['fwd_bwd_s']:.3f} | {a['optimizer_s']:.3f} | "
                    f"{a['tokens_per_s']:.1f} | {a['gflops']:.1f} | {a['of_gemm_bound']:.0%} |")
    return "\n".join([*rows, "", ratio_line(c)])


def run(args: argparse.Namespace) -> int:
    out = args.out or artifacts_dir() / "bench" / "learner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    report: dict[str, Any] = {"shape": args.shape}
    if args.tp:
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
        lines = [f"# ssp bench learner ({args.shape}, {rows[0]['device']}, {rows[0]['dtype']}, {threads} thread(s) "
                 "per rank)", "",
                 "| TP | params | tokens/step | s/step | tokens/s | model TFLOP/s | vs first |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['tp']} | {r['params'] / 1e6:.1f} M | {r['tokens_per_step']} | {r['step_s']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.4f} | {r['tokens_per_s'] / base:.2f}x |"
                         + (f" MFU {r['mfu']:.1%}" if "mfu" in r else ""))
        sections.append("\n".join(lines))
        report["rows"] = rows
    if args.vs_transformers:
        print(f"learner bench: learner vs transformers ({args.threads} thread(s)) ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="ssp-bench-learner-") as work_dir:
            comparison = compare_with_transformers(args, Path(work_dir))
        sections.append(comparison_markdown(comparison))
        report["vs_transformers"] = comparison
    if not sections:
        print("learner bench: nothing to run (no --tp sizes and --no-vs-transformers)", file=sys.stderr)
        return 2
    if not args.tp:
        sections.insert(0, f"# ssp bench learner ({args.model_dir.name if args.model_dir else args.shape})")
    text = "\n\n".join(sections)
    print(text)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"learner bench: wrote {out}", file=sys.stderr)
    return 0
