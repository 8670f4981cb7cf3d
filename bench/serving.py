"""`ssp bench serving`: does continuous batching pay, and as much as transformers' own batched `generate`?

For each N in --requests (default 8 and 16), side by side in one run:
  server (`ssp model serve` in its own process, the prepared SmolLM2-135M-Instruct unless --model, --threads torch
  threads), N requests of --new-tokens tokens each (greedy, ignore_eos, so every request decodes exactly that many):
    (a) sequential: each sent after the previous one finished;
    (b) concurrent: all N sent at once; the server decodes them in one batch;
  transformers in this process (same model, same threads, the server idle meanwhile), the same prompts:
    (c) `model.generate` on one prompt at a time;
    (d) `model.generate` on all N, left-padded, in one call.
The speedups (a)/(b) and (c)/(d) answer "how much does batching pay" for each; (b)/(d) says how close the server's
batched time comes to transformers'. Rounds interleave (a)-(d) so all see the same machine load; the best round of
each counts (the machine is shared). Writes artifacts/bench/serving.json and .md. Exit 1 if (a)/(b) < 3 at any N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir

GOAL = 3.0
ARMS = ("server_sequential", "server_concurrent", "generate_one_by_one", "generate_batched")
QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "Name three primary colours.",
    "How many legs does a spider have?", "Who wrote Hamlet?", "What is photosynthesis?",
    "How far is the Moon from Earth?", "What does a bee make?", "What is the boiling point of water?",
    "Which planet is the largest?", "What language is spoken in Brazil?", "What is 12 times 12?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, nargs="+", default=[8, 16],
                   help="batch sizes: requests per measurement (default: 8 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of (a)-(d); best counts (default: 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the server and for transformers (default: 1, the server's default)")
    p.add_argument("--model", type=Path, help="HF model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/serving.json)")


def _start_server(args: argparse.Namespace, model: Path) -> tuple[subprocess.Popen[str], str]:
    from ssp.serving.server import READY_LINE

    cmd = [sys.executable, "-m", "ssp.cli", "model", "serve", "--port", "0", "--model", str(model),
           "--set", f"serving.max_running_requests={max(args.requests)}", "--set", f"serving.threads={args.threads}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(READY_LINE):
            return proc, line[len(READY_LINE):].strip()
    raise RuntimeError(f"the reference server exited with {proc.wait()} before listening: {' '.join(cmd)}")


async def _one(session: Any, url: str, text: str, new_tokens: int) -> int:
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    async with session.post(url + "/generate", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"/generate answered {r.status}: {await r.text()}")
        out = await r.json()
    return len(out["output_ids"])


async def _flush(session: Any, url: str) -> None:
    async with session.post(url + "/flush_cache") as r:
        if r.status != 200:
            raise RuntimeError(f"/flush_cache answered {r.status}: {await r.text()}")


class Generate:
    """transformers' own `generate` on the server's model: the batching reference."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()

    def tokens(self, prompts: list[str], new_tokens: int) -> int:
        """Generate exactly `new_tokens` per prompt (greedy, EOS ignored) in one call; returns the tokens made."""
        batch = self.tok(prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=self.tok.pad_token_id or 0)
        return int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])


async def _measure(url: str, hf: Generate, args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    import aiohttp
    from tqdm import tqdm

    times: dict[int, dict[str, list[float]]] = {n: {arm: [] for arm in ARMS} for n in args.requests}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _one(session, url, "Hello", 2)  # warm-up: first-call allocations
        hf.tokens(["Hello"], 2)
        for _ in tqdm(range(args.rounds), desc="rounds", disable=args.rounds < 2):
            for n in args.requests:
                prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
                expected = n * args.new_tokens
                made: dict[str, int] = {}
                await _flush(session, url)  # no arm may reuse another's prompt KV
                start = time.perf_counter()
                made["server_sequential"] = sum([await _one(session, url, p, args.new_tokens) for p in prompts])
                times[n]["server_sequential"].append(time.perf_counter() - start)
                await _flush(session, url)
                start = time.perf_counter()
                made["server_concurrent"] = sum(await asyncio.gather(
                    *(_one(session, url, p, args.new_tokens) for p in prompts)))
                times[n]["server_concurrent"].append(time.perf_counter() - start)
                start = time.perf_counter()
                made["generate_one_by_one"] = sum(hf.tokens([p], args.new_tokens) for p in prompts)
                times[n]["generate_one_by_one"].append(time.perf_counter() - start)
                start = time.perf_counter()
                made["generate_batched"] = hf.tokens(prompts, args.new_tokens)
                times[n]["generate_batched"].append(time.perf_counter() - start)
                if any(count != expected for count in made.values()):
                    raise RuntimeError(f"token counts differ from {expected}: {made}")
    return times


def run(args: argparse.Namespace) -> int:
    from ssp.serving.model_prep import prepare_default_model

    model = args.model or prepare_default_model()
    hf = Generate(model, args.threads)
    proc, url = _start_server(args, model)
    try:
        times = asyncio.run(_measure(url, hf, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows = []
    for n in args.requests:
        best = {arm: min(ts) for arm, ts in times[n].items()}
        tokens = n * args.new_tokens
        rows.append({"requests": n, **{f"{arm}_s": round(t, 3) for arm, t in best.items()},
                     **{f"{arm}_tok_per_s": round(tokens / t, 2) for arm, t in best.items()},
                     "server_speedup": round(best["server_sequential"] / best["server_concurrent"], 2),
                     "generate_speedup": round(best["generate_one_by_one"] / best["generate_batched"], 2),
                     "server_vs_generate_batched_time": round(best["server_concurrent"] / best["generate_batched"],
                                                              2),
                     "rounds_s": {arm: [round(t, 3) for t in ts] for arm, ts in times[n].items()}})
    result = {"new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads, "goal": GOAL,
              "batches": rows}
    out = args.out or artifacts_dir() / "bench" / "serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    out.with_suffix(".md").write_text(report)
    print(report)
    for r in rows:
        print(f"N={r['requests']}: server batched vs sequential {r['server_speedup']}x, transformers generate "
              f"batched vs one by one {r['generate_speedup']}x (server batched time / generate batched time "
              f"{r['server_vs_generate_batched_time']})")
    ok = all(r["server_speedup"] >= GOAL for r in rows)
    print("PASS" if ok else "FAIL", f": server sequential / concurrent time >= {GOAL:.0f}x at every N")
    print(f"report: {out}")
    return 0 if ok else 1


def markdown(r: dict[str, Any]) -> str:
    lines = ["# serving (`ssp bench serving`)", "",
             f"N requests x {r['new_tokens']} new tokens (greedy, ignore_eos), {r['threads']} torch thread(s); "
             f"best of {r['rounds']} interleaved round(s). Server: `ssp model serve` over HTTP; generate: "
             "transformers' `model.generate` on the same model in-process.", "",
             "| N | server one by one tok/s | server concurrent tok/s | **server speedup** | generate one by one "
             "tok/s | generate batched tok/s | **generate speedup** | server / generate batched time |",
             "|---|---|---|---|---|---|---|---|"]
    for b in r["batches"]:
        lines.append(f"| {b['requests']} | {b['server_sequential_tok_per_s']} | {b['server_concurrent_tok_per_s']} "
                     f"| **{b['server_speedup']}x** | {b['generate_one_by_one_tok_per_s']} | "
                     f"{b['generate_batched_tok_per_s']} | **{b['generate_speedup']}x** | "
                     f"{b['server_vs_generate_batched_time']} |")
    return "\n".join([*lines, "", f"Goal: server speedup >= {r['goal']:.0f}x.", ""])
