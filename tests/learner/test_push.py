"""Weight push to the real reference server (SmolLM2, fp32 CPU): rollouts from the server train the learner with a
logprob mismatch of ~0, and after one step and a push the server scores a fixed continuation exactly as the learner
recomputes it. The server's original weights and version are restored at the end (it is shared by the session)."""
# NOTE: the WeightPusher itself is used through ssp.learner.trainer.run, as a training run uses it.

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from ssp.engine.trajectory import Trajectory
from ssp.learner.config import LearnerConfig


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
def test_push_makes_server_logprobs_equal_learners(model_dir: Path, ref_server: str, par1: Any,
                                                   tmp_path: Path) -> None:
    """The whole trainer path: run() pushes the initial weights, trains one step on the server's own rollouts
    (mismatch ~0), checkpoints, and pushes version "1"; the server then scores like the checkpointed weights."""
    from learner_tiny import write_frames
    from transformers import AutoTokenizer

    from ssp.learner.logprobs import mask_padded_vocab, token_logprobs
    from ssp.learner.model import ModelShape, build_model
    from ssp.learner.trainer import run
    from ssp.metrics import read_metrics

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
    # Then a group with nothing to train (equal rewards: dropped): its step moves only the servers' version label.
    flat = [replace(t, group_id="push-test-flat", reward=1.0) for t in group]
    frames = write_frames(tmp_path / "t.frames", [group, flat])
    cfg = replace(LearnerConfig(), model_dir=model_dir, out_dir=tmp_path / "run", groups_per_step=1, lr=3e-4,
                  warmup_steps=0, keep_checkpoints=2, push_bytes_per_bucket=64 << 20, push_timeout_s=120)
    try:
        assert run(cfg, str(frames), [ref_server]) == 0
        initial, step, untrained = read_metrics(cfg.out_dir / "metrics.jsonl")
        assert initial["initial_push"] and initial["push_bytes"] > 500e6
        assert step["step"] == 1 and step["push_gb_per_s"] > 0
        assert step["logprob_mismatch_max"] < 1e-4  # the learner recomputes exactly what the server sampled with
        assert untrained["step"] == 2 and not untrained["trained"] and "push_s" not in untrained
        assert _get(ref_server, "/model_info")["weight_version"] == "2"
        after = _score(ref_server, prompt, continuation)
    finally:  # restore the session-shared server's weights and version
        restored = _post(ref_server, "/update_weights_from_disk", {"model_path": str(model_dir),
                                                                   "weight_version": original_version})
        assert restored["success"], restored

    shape = ModelShape.from_dir(model_dir)
    model = build_model(shape, par1)
    trained = torch.load(cfg.out_dir / "checkpoints" / "step-000001" / "tp0.pt", weights_only=True)["model"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(trained[name])
        ids = torch.tensor([prompt + continuation])
        logits = mask_padded_vocab(model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None],
                                         None), shape.vocab_size)
        ours = token_logprobs(logits, ids[:, 1:])[0, len(prompt) - 1:].tolist()
    assert max(abs(a - b) for a, b in zip(after, ours)) < 1e-4
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-3  # the step really changed the server's model
    assert max(abs(a - b) for a, b in zip(_score(ref_server, prompt, continuation), before)) < 1e-5


def test_buckets_ramp_up_split_unaligned_tensors_and_pack_to_sglangs_flattened_layout() -> None:
    """Pure logic: bucket limits ramp from 1/RAMP of the size up by 1.5x; a tensor whose offset is not a multiple of its
    element size starts a new bucket (the format has no padding); a packed bucket is the tensors' raw bytes in order
    (non-contiguous views included), in a buffer reused from bucket to bucket, or a lone contiguous tensor itself."""
    from ssp.learner.push import RAMP, Staging, plan_buckets

    ones = [(f"t{i}", torch.ones(1)) for i in range(16)]  # 4 bytes each
    sizes = [len(b) for b in plan_buckets(ones, bytes_per_bucket=RAMP * 8)]  # limits 8, 12, 18, 27, 40, 60, 64 bytes
    assert sizes == [2, 3, 4, 6, 1] and sum(sizes) == 16
    with pytest.raises(ValueError, match="must be > 0"):
        list(plan_buckets(ones, 0))

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # a non-contiguous view
    b = torch.tensor([1, 2, 3], dtype=torch.bfloat16)           # 6 bytes: the next float32 would be unaligned
    c = torch.tensor([7.0], dtype=torch.float32)
    parts = list(plan_buckets([("a", a), ("b", b), ("c", c)], bytes_per_bucket=1 << 20))
    assert [[n for n, _ in p] for p in parts] == [["a", "b"], ["c"]]
    staging = Staging(8, torch.device("cpu"))
    flat = staging.pack(0, parts[0])
    expected = torch.cat([a.contiguous().view(-1).view(torch.uint8), b.view(torch.uint8)])
    assert torch.equal(flat, expected)
    again = staging.pack(0, [("c", c), ("c2", c * 2)])
    assert again.data_ptr() == flat.data_ptr()  # the buffer is reused, not reallocated
    assert torch.equal(again.view(torch.float32), torch.tensor([7.0, 14.0]))
    assert staging.pack(1, parts[1]).data_ptr() == c.data_ptr()  # one contiguous tensor: its own bytes, no copy


def test_a_new_pusher_resets_every_group_a_server_lists_and_its_own_name() -> None:
    """Pure logic: the groups destroyed on a server before joining are those its /server_info lists (the reference
    server's extension) plus our own name; a server without the field (a real SGLang server) gets our own name only."""
    from ssp.learner.push import leftover_groups

    assert leftover_groups({"weight_update_groups": ["g-2", "g"]}, "g") == ["g", "g-2"]
    assert leftover_groups({"weight_update_groups": []}, "g") == ["g"]
    assert leftover_groups({"tp_size": 1}, "g") == ["g"]
