"""Tiny random HF checkpoints (Llama: untied, GQA, vocab needing padding; Qwen2: tied, qkv bias) and trajectory
files for the learner tests: real architectures at a size that runs in well under a second on CPU."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import torch

from ssp.engine.stream import TcpSink
from ssp.engine.trajectory import Trajectory, pack_group
from ssp.engine.wire import Terms, encode_frame


def make_tiny_model(out: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a random 2-layer model of `family` ("llama" or "qwen2") as HF safetensors under `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=5000.0, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=20000.0, tie_word_embeddings=True))
    with torch.no_grad():  # HF initialises biases and norms to constants; make every tensor distinct
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(out)
    return out


def make_groups(n_groups: int, *, seed: int = 0, vocab: int = 250, solvers: int = 3) -> list[list[Trajectory]]:
    """Episode-shaped groups: one proposer + `solvers` solver trajectories with 0/1 rewards and a tool span."""
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        group = []
        for role, n in (("proposer", 1), ("solver", solvers)):
            for _ in range(n):
                prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 8))]
                resp_len = rng.randint(4, 12)
                mask = [1] * resp_len
                tool = rng.randint(1, resp_len - 2)  # a 2-token tool span with loss mask 0
                mask[tool] = mask[tool + 1] = 0
                group.append(Trajectory(
                    role=role, group_id=f"g{seed}-{g}", prompt_ids=prompt,
                    response_ids=[rng.randrange(vocab) for _ in range(resp_len)], loss_mask=mask,
                    rollout_logprobs=[-rng.uniform(0.5, 6.0) if m else 0.0 for m in mask],
                    policy_versions=[0 if m else -1 for m in mask],
                    reward=float(rng.random() < 0.5) if role == "solver" else rng.random()))
        groups.append(group)
    return groups


def write_frames(path: Path, groups: list[list[Trajectory]]) -> Path:
    with path.open("wb") as f:
        for group in groups:
            f.write(encode_frame(pack_group(group)))
    return path


def wait_for_metric_lines(metrics: Path, proc: subprocess.Popen[bytes], lines: int, timeout_s: float = 120.0) -> None:
    """Return once the learner run `proc` has written `lines` lines to `metrics` (it is mid-run: a kill now lands
    between steps), or has exited, or `timeout_s` passed; the caller asserts what it needs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            return
        time.sleep(0.01)


class EngineStream:
    """The real engine's end of the trajectory stream (ssp.engine.stream.TcpSink: handshake, then frames) for a test's
    synchronous engine thread, on an event loop of its own."""

    def __init__(self, port: int, terms: Terms, timeout_s: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._sink = self._loop.run_until_complete(TcpSink.connect("127.0.0.1", port, timeout_s, terms))

    def send(self, group: list[Trajectory]) -> None:
        self._loop.run_until_complete(self._sink.write(encode_frame(pack_group(group))))

    def close(self) -> None:
        """Half-close and wait for the learner to close its side (TcpSink.close), then drop the loop."""
        try:
            self._loop.run_until_complete(self._sink.close())
        finally:
            self._loop.close()
