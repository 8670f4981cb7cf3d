"""`ssp bench serving`: does continuous batching pay? N concurrent requests vs the same N one after another.

Against one reference server (`ssp model serve`, its own process, the prepared SmolLM2-135M-Instruct unless --model):
  (a) sequential: N requests of --new-tokens tokens each (greedy, ignore_eos, so every request decodes exactly that
      many tokens), each sent after the previous one finished;
  (b) concurrent: the same N requests sent at once; the server decodes them in one batch.
Rounds alternate (a) and (b) so both see the same machine load; the best round of each counts (the machine is
shared). Prints both totals, tokens/s and the ratio (a)/(b) (goal >= 3). Writes artifacts/bench/serving.json.
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
QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "Name three primary colours.",
    "How many legs does a spider have?", "Who wrote Hamlet?", "What is photosynthesis?",
    "How far is the Moon from Earth?", "What does a bee make?", "What is the boiling point of water?",
    "Which planet is the largest?", "What language is spoken in Brazil?", "What is 12 times 12?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=8, help="requests per measurement (default: 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of (a) and (b); best counts (default: 1)")
    p.add_argument("--model", type=Path, help="HF model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, help="JSON report (default: artifacts/bench/serving.json)")


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    from serving.server import READY_LINE

    cmd = [sys.executable, "-m", "ssp.cli", "model", "serve", "--port", "0",
           "--set", f"serving.max_running_requests={max(1, args.requests)}"]
    if args.model is not None:
        cmd += ["--model", str(args.model)]
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


async def _measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    import aiohttp
    from tqdm import tqdm

    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _one(session, url, "Hello", 2)  # warm-up: first-call allocations
        for _ in tqdm(range(args.rounds), desc="rounds", disable=args.rounds < 2):
            await _flush(session, url)  # no phase may reuse the other's prompt KV
            start = time.perf_counter()
            tokens = 0
            for p in prompts:
                tokens += await _one(session, url, p, args.new_tokens)
            times["sequential"].append(time.perf_counter() - start)
            await _flush(session, url)
            start = time.perf_counter()
            counts = await asyncio.gather(*(_one(session, url, p, args.new_tokens) for p in prompts))
            times["concurrent"].append(time.perf_counter() - start)
            if tokens != sum(counts) or tokens != args.requests * args.new_tokens:
                raise RuntimeError(f"token counts differ: sequential {tokens}, concurrent {sum(counts)}")
    return times


def run(args: argparse.Namespace) -> int:
    proc, url = _start_server(args)
    try:
        times = asyncio.run(_measure(url, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    seq, con = min(times["sequential"]), min(times["concurrent"])
    tokens = args.requests * args.new_tokens
    result = {"requests": args.requests, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "sequential_s": round(seq, 3), "concurrent_s": round(con, 3),
              "sequential_tok_per_s": round(tokens / seq, 2), "concurrent_tok_per_s": round(tokens / con, 2),
              "ratio": round(seq / con, 2), "goal": GOAL,
              "sequential_rounds_s": [round(x, 3) for x in times["sequential"]],
              "concurrent_rounds_s": [round(x, 3) for x in times["concurrent"]]}
    out = args.out or artifacts_dir() / "bench" / "serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    out.with_suffix(".md").write_text(report)
    print(report)
    ok = result["ratio"] >= GOAL
    print("PASS" if ok else "FAIL", f": sequential / concurrent time {result['ratio']}x (goal >= {GOAL:.0f}x)")
    print(f"report: {out}")
    return 0 if ok else 1


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        "# serving (`ssp bench serving`)", "",
        f"{r['requests']} requests x {r['new_tokens']} new tokens (greedy, ignore_eos) on the reference server; "
        f"best of {r['rounds']} round(s).", "",
        "| mode | total s | tokens/s |", "|---|---|---|",
        f"| (a) one after another | {r['sequential_s']} | {r['sequential_tok_per_s']} |",
        f"| (b) all at once (continuous batching) | {r['concurrent_s']} | {r['concurrent_tok_per_s']} |", "",
        f"Ratio (a)/(b): **{r['ratio']}x** (goal >= {r['goal']:.0f}x).", "",
    ])
