"""Weight push to the real reference server (SmolLM2, fp32 CPU): rollouts from the server train the learner with a
logprob mismatch of ~0, and after one step and a push the server scores a fixed continuation exactly as the learner
recomputes it. The server's original weights and version are restored at the end (it is shared by the session)."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.trajectory import Trajectory
from learner.config import LearnerConfig


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())


def _rollout(url: str, prompt: list[int], seed: int) -> tuple[list[int], list[float]]:
    out = _post(url, "/generate", {"input_ids": prompt, "return_logprob": True, "sampling_params": {
        "temperature": 1.0, "max_new_tokens": 10, "sampling_seed": seed, "ignore_eos": True}})
    return out["output_ids"], [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


def _score(url: str, prompt: list[int], continuation: list[int]) -> list[float]:
    """The server's logprobs of `continuation` after `prompt` (prompt logprobs from position len(prompt) - 1)."""
    out = _post(url, "/generate", {"input_ids": prompt + continuation, "return_logprob": True,
                                   "logprob_start_len": len(prompt) - 1,
                                   "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}})
    entries = out["meta_info"]["input_token_logprobs"]
    assert entries[0][0] is None and [e[1] for e in entries[1:]] == continuation
    return [e[0] for e in entries[1:]]


@pytest.mark.slow
def test_push_makes_server_logprobs_equal_learners(model_dir: Path, ref_server: str, par1: Any) -> None:
    from transformers import AutoTokenizer

    from learner.convert import HfTensors, load_hf_into_model
    from learner.gather import iter_hf_weights
    from learner.logprobs import mask_padded_vocab, token_logprobs
    from learner.model import ModelShape, attention_mask, build_model
    from learner.push import PushState, WeightPusher
    from learner.trainer import Trainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    continuation = tok(" a city on the Seine river", add_special_tokens=False)["input_ids"]
    original_version = _get(ref_server, "/model_info")["weight_version"]
    before = _score(ref_server, prompt, continuation)

    # A solver group of two real rollouts with different rewards (GRPO advantages +-0.71).
    group = []
    for i, reward in enumerate((1.0, 0.0)):
        ids, lps = _rollout(ref_server, prompt, seed=11 + i)
        group.append(Trajectory(role="solver", group_id="push-test", prompt_ids=prompt, response_ids=ids,
                                loss_mask=[1] * len(ids), rollout_logprobs=lps, policy_versions=[0] * len(ids),
                                reward=reward))

    shape = ModelShape.from_dir(model_dir)
    model = build_model(shape, par1)
    load_hf_into_model(model, model_dir, shape, tp=1, tp_rank=0, vocab_divisor=128)
    cfg = replace(LearnerConfig(), lr=3e-4, warmup_steps=0)
    step = Trainer(cfg, par1, shape, model, None).train_step([group], policy_version=0)
    assert step.metrics["logprob_mismatch_max"] < 1e-4  # the learner recomputes exactly what the server sampled with

    pusher = WeightPusher([ref_server], backend="gloo", bytes_per_bucket=64 << 20, timeout_s=120)
    try:
        pusher.connect()
        stats = pusher.push(iter_hf_weights(model, shape, tp_group=None, keep=True), version="1")
        assert stats.buckets > 1 and stats.bytes > 500e6 and stats.gb_per_s > 0
        assert _get(ref_server, "/model_info")["weight_version"] == "1"
        after = _score(ref_server, prompt, continuation)
        with torch.no_grad():
            ids = torch.tensor([prompt + continuation])
            logits = mask_padded_vocab(model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None],
                                             attention_mask(ids.shape[1] - 1, torch.device("cpu"))), shape.vocab_size)
            ours = token_logprobs(logits, ids[:, 1:])[0, len(prompt) - 1:].tolist()
        assert max(abs(a - b) for a, b in zip(after, ours)) < 1e-4
        assert max(abs(a - b) for a, b in zip(after, before)) > 1e-3  # the step really changed the server's model
    finally:
        if pusher.state is PushState.CONNECTED:  # restore the session-shared server
            with HfTensors(model_dir) as hf:
                pusher.push(((n, hf.get(n)) for n in hf.names()), version=original_version)
        pusher.close()
    assert max(abs(a - b) for a, b in zip(_score(ref_server, prompt, continuation), before)) < 1e-5
