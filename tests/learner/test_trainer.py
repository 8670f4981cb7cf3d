"""The training loop: batch planning, one step's effect, and resume after SIGKILL reaching the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from learner_tiny import make_groups, wait_for_metric_lines, write_frames

from ssp.config import to_dict
from ssp.engine.trajectory import UNKNOWN_VERSION, unpack_group
from ssp.learner.batching import collate, pack, plan_batch, shard
from ssp.learner.config import LearnerConfig
from ssp.learner.trajectory_source import StreamError, open_source
from ssp.paths import PROJECT_ROOT


def test_plan_drops_zero_variance_groups_and_skips_roles() -> None:
    groups = make_groups(4, seed=3)
    for t in groups[0]:
        if t.role == "solver":
            t.reward = 1.0  # an all-correct group
    groups[1][0].role = "verifier"
    cfg = LearnerConfig()
    plan = plan_batch(groups, cfg, policy_version=0)
    assert plan.dropped_zero_variance_groups >= 1
    assert plan.skipped_roles["verifier"] == 1
    assert all(s.group_id != groups[0][1].group_id or s.role == "proposer" for s in plan.samples)
    proposer_adv = [s.advantage for s in plan.samples if s.role == "proposer"]
    assert sum(proposer_adv) == pytest.approx(0.0, abs=1e-6)  # batch-mean baseline
    kept = plan_batch(groups, replace(cfg, drop_zero_variance_groups=False), policy_version=0)
    assert kept.dropped_zero_variance_groups == 0 and kept.total_seqs > plan.total_seqs


def test_plan_drops_groups_beyond_max_staleness_and_counts_unknown_versions() -> None:
    groups = make_groups(3, seed=12)  # every trained token sampled at version 0
    for t in groups[1]:
        t.policy_versions = [2 if m else -1 for m in t.loss_mask]
    for t in groups[2]:
        t.policy_versions = [UNKNOWN_VERSION if m else -1 for m in t.loss_mask]
    cfg = LearnerConfig(drop_zero_variance_groups=False, max_staleness=1)
    plan = plan_batch(groups, cfg, policy_version=2)  # version 0 is 2 > 1 behind; 2 is current; unknown is kept
    assert plan.dropped_stale_groups == 1
    assert {s.group_id for s in plan.samples} == {groups[1][0].group_id, groups[2][0].group_id}
    assert sum(s.unknown_version_tokens for s in plan.samples) == sum(sum(t.loss_mask) for t in groups[2])
    assert plan_batch(groups, cfg, policy_version=1).dropped_stale_groups == 0  # exactly max_staleness behind
    assert plan_batch(groups, replace(cfg, max_staleness=None), policy_version=50).dropped_stale_groups == 0


def test_sharding_and_packing_cover_every_sample_once() -> None:
    plan = plan_batch(make_groups(6, seed=4), LearnerConfig(drop_zero_variance_groups=False), policy_version=0)
    shards = [shard(plan.samples, 3, r) for r in range(3)]
    assert sorted(id(s) for sh in shards for s in sh) == sorted(id(s) for s in plan.samples)
    for micro in pack(shards[0], token_budget=40):
        rows = max(len(s.tokens) - 1 for s in micro)
        assert len(micro) == 1 or len(micro) * rows <= 40
    s = plan.samples[0]
    mb = collate([s], {"proposer": 2.0, "solver": 1.0}, torch.device("cpu"))
    start = s.prompt_len - 1  # response token j is predicted at position P - 1 + j
    assert mb.targets[0, start: start + len(s.loss_mask)].tolist() == s.tokens[s.prompt_len:]
    assert mb.loss_mask[0].tolist()[start:start + len(s.loss_mask)] == s.loss_mask
    assert mb.loss_mask[0, :start].sum() == 0


def test_frame_source_reads_resumes_and_rejects_torn_tails(tmp_path: Path) -> None:
    groups = make_groups(3, seed=5)
    path = write_frames(tmp_path / "t.frames", groups)
    src = open_source(str(path))
    first = src.next_frame()
    assert first is not None and unpack_group(first)[0].group_id == groups[0][0].group_id
    offset = src.offset
    src.close()
    src = open_source(str(path), offset)
    rest = [src.next_frame(), src.next_frame(), src.next_frame()]
    assert rest[2] is None and unpack_group(rest[1])[0].group_id == groups[2][0].group_id  # type: ignore[arg-type]
    src.close()
    path.write_bytes(path.read_bytes()[:-3])
    src = open_source(str(path), offset)
    src.next_frame()
    with pytest.raises(StreamError, match="ends inside a frame payload"):
        src.next_frame()
    src.close()
    with pytest.raises(StreamError, match="past the end"):
        open_source(str(path), 10**9)


def _cfg(model_dir: Path, out_dir: Path) -> LearnerConfig:
    return LearnerConfig(model_dir=model_dir, out_dir=out_dir, groups_per_step=2, lr=1e-3, warmup_steps=2,
                         vocab_divisor=8, micro_batch_tokens=48, checkpoint_every=1, keep_checkpoints=2,
                         drop_zero_variance_groups=False)


def _final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    latest = out_dir / "checkpoints" / (out_dir / "checkpoints" / "latest").read_text()
    return torch.load(latest / "tp0.pt", weights_only=True)["model"]


def test_training_changes_weights_and_logs(tiny_llama: Path, tmp_path: Path, par1: object) -> None:
    from ssp.learner.trainer import run

    frames = write_frames(tmp_path / "t.frames", make_groups(4, seed=6))
    cfg = _cfg(tiny_llama, tmp_path / "run")
    assert run(cfg, str(frames), []) == 0
    lines = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert r["trained"] and r["grad_norm"] > 0 and 0 <= r["clip_frac"] <= 1 and r["micro_batches"] >= 2
        assert r["logprob_mismatch_mean"] > 0  # the fake rollout logprobs are not the model's
    assert lines[0]["lr"] == pytest.approx(1e-3)  # warm-up: step 0 ran at 1/2 lr, the logged lr is the next one
    state = json.loads((cfg.out_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["groups_consumed"] == len(state["consumed_group_ids"]) == 4
    # a second run on the same stream resumes at its end: nothing is trained twice
    assert run(cfg, str(frames), []) == 0
    assert len((cfg.out_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_batch_with_nothing_to_train_still_advances_the_version(tiny_llama: Path, tmp_path: Path,
                                                                  par1: object) -> None:
    """All solver groups all-correct (zero variance, dropped) and proposers not trained: no sample is left, yet
    each batch is a step, so the version keeps pace with the groups the engine's gate counts."""
    from ssp.learner.trainer import run

    groups = make_groups(4, seed=13)
    for t in (t for g in groups for t in g if t.role == "solver"):
        t.reward = 1.0
    frames = write_frames(tmp_path / "t.frames", groups)
    cfg = replace(_cfg(tiny_llama, tmp_path / "run"), train_roles=("solver",), drop_zero_variance_groups=True)
    assert run(cfg, str(frames), []) == 0
    lines = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["trained"], r["dropped_zero_variance_groups"]) for r in lines] == [(1, False, 2),
                                                                                              (2, False, 2)]
    state = json.loads((cfg.out_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["groups_consumed"] == 4


def test_lr_zero_trains_every_step_and_moves_no_weight(tiny_llama: Path, tmp_path: Path, par1: object) -> None:
    """The control arm of a learning experiment: the whole loop runs (losses, gradients), the weights stay bit-equal."""
    from ssp.learner.convert import load_hf_into_model
    from ssp.learner.model import ModelShape, build_model
    from ssp.learner.trainer import run

    frames = write_frames(tmp_path / "t.frames", make_groups(4, seed=14))
    cfg = replace(_cfg(tiny_llama, tmp_path / "run"), lr=0.0)
    assert run(cfg, str(frames), []) == 0
    lines = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["trained"] and r["grad_norm"] > 0 and r["lr"] == 0 for r in lines)
    shape = ModelShape.from_dir(tiny_llama)
    initial = build_model(shape, par1, vocab_divisor=cfg.vocab_divisor)  # type: ignore[arg-type]
    load_hf_into_model(initial, tiny_llama, shape, tp=1, tp_rank=0, vocab_divisor=cfg.vocab_divisor)
    final = _final_weights(cfg.out_dir)
    params = dict(initial.named_parameters())
    assert params.keys() <= final.keys()
    for name, tensor in params.items():
        assert torch.equal(final[name], tensor), name


def test_sigkill_mid_run_resumes_to_the_same_weights(tiny_llama: Path, tmp_path: Path, par1: object) -> None:
    from ssp.learner.trainer import run

    torch.set_num_threads(1)  # the killed subprocess runs with OMP_NUM_THREADS=1: same reductions, same bits
    frames = write_frames(tmp_path / "t.frames", make_groups(40, seed=7))
    reference = _cfg(tiny_llama, tmp_path / "reference")
    assert run(reference, str(frames), []) == 0

    killed = _cfg(tiny_llama, tmp_path / "killed")
    killed.out_dir.mkdir()
    cfg_json = killed.out_dir / "learner_config.json"
    cfg_json.write_text(json.dumps(to_dict(killed)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "ssp.learner.trainer", "--config-json", str(cfg_json),
                             "--trajectories", str(frames)], cwd=PROJECT_ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed.out_dir / "metrics.jsonl"
    wait_for_metric_lines(metrics, proc, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = len(metrics.read_text().splitlines())
    assert 3 <= steps_done < 20, f"the kill must land mid-run (got {steps_done} of 20 steps)"

    assert run(killed, str(frames), []) == 0
    state = json.loads((killed.out_dir / "checkpoints" / "step-000020" / "state.json").read_text())
    ids = state["consumed_group_ids"]  # all 40 fit in the default dedup window
    assert len(ids) == len(set(ids)) == state["groups_consumed"] == 40  # every group trained exactly once
    ours, ref = _final_weights(killed.out_dir), _final_weights(reference.out_dir)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


def test_tcp_source_listens_for_the_engine(tmp_path: Path) -> None:
    """Over TCP the learner listens and the engine connects (engine/stream.py); after the handshake, frames arrive
    whole and in order, also when a frame is split across writes."""
    import asyncio
    import socket
    import threading

    from ssp.engine.config import StreamConfig
    from ssp.engine.trajectory import pack_group
    from ssp.engine.wire import encode_frame, offer, terms_of
    from ssp.run_key import write_run_key

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stream = StreamConfig(key_file=write_run_key(tmp_path / "stream.key"), run_id="t")
    groups = make_groups(3, seed=9)

    async def engine() -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await offer(reader, writer, terms_of(stream))
        for g in groups:
            frame = encode_frame(pack_group(g))
            for part in (frame[:3], frame[3:]):  # a frame split across writes still arrives whole
                writer.write(part)
                await writer.drain()
        writer.close()

    sender = threading.Thread(target=asyncio.run, args=(engine(),))
    sender.start()
    src = open_source(f"tcp://127.0.0.1:{port}", stream=stream)
    got = []
    while (payload := src.next_frame()) is not None:
        got.append(unpack_group(payload)[0].group_id)
    src.close()
    sender.join()
    assert got == [g[0].group_id for g in groups]
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        open_source("tcp://nohost")
