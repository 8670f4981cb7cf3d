"""ZeRO-1 (ssp.learner.optimizer): at DP=2 each rank holds half the fp32 optimizer state, yet steps exactly as one
unsharded process; sharded checkpoints resume bit-identically and refuse another data_parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from learner_tiny import make_groups, wait_for_metric_lines, write_frames

from ssp.config import to_dict
from ssp.learner.config import LearnerConfig
from ssp.learner.optimizer import partition
from ssp.paths import PROJECT_ROOT
from ssp.processes import free_port


def test_partition_is_deterministic_balanced_and_complete() -> None:
    numels = [4096, 64, 64, 4096, 12288, 64, 4096, 4096, 12288, 64, 16000]
    owner = partition(numels, 2)
    assert owner == partition(numels, 2) and set(owner) == {0, 1}
    loads = [sum(n for n, o in zip(numels, owner) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= max(numels)  # greedy largest-first: off by at most one parameter
    assert partition(numels, 1) == [0] * len(numels)
    assert sorted(set(partition(numels[:3], 8))) == [0, 1, 2]  # more ranks than parameters: some own none


def _files(out_dir: Path) -> dict[str, dict]:
    root = out_dir / "checkpoints"
    step = root / (root / "latest").read_text()
    return {f.name: torch.load(f, weights_only=True) for f in sorted(step.glob("*.pt"))}


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _torchrun(args: list[str]) -> list[str]:
    """A 2-rank torchrun command line."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *args]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _env() -> dict[str, str]:
    """The environment for it: no inherited rank variables, one thread per rank (same reductions, same bits)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_dp2_sharded_optimizer_matches_one_process_and_resumes_bit_identically(
        tiny_llama: Path, tmp_path: Path, par1: object) -> None:
    from ssp.learner.trainer import run

    frames = write_frames(tmp_path / "t.frames", make_groups(16, seed=13))
    cfg = LearnerConfig(model_dir=tiny_llama, dtype="bfloat16", data_parallel=2, groups_per_step=2, lr=1e-3,
                        warmup_steps=2, vocab_divisor=8, micro_batch_tokens=48, checkpoint_every=1,
                        keep_checkpoints=2, drop_zero_variance_groups=False)
    # the trainer at DP=2 in bf16, SIGKILLed mid-run (torchrun and every rank); the worker resumes it
    killed = replace(cfg, out_dir=tmp_path / "killed")
    killed.out_dir.mkdir()
    cfg_json = killed.out_dir / "learner_config.json"
    cfg_json.write_text(json.dumps(to_dict(killed)))
    train = _torchrun(["-m", "ssp.learner.trainer", "--config-json", str(cfg_json), "--trajectories", str(frames)])
    victim = subprocess.Popen(train, cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics = killed.out_dir / "metrics.jsonl"
    wait_for_metric_lines(metrics, victim, 2)
    ranks = _children(victim.pid)  # torchrun starts each rank in a session of its own: kill them by pid
    for pid in [*ranks, victim.pid]:
        os.kill(pid, signal.SIGKILL)
    victim.wait()
    assert len(ranks) == 2
    saved = (killed.out_dir / "checkpoints" / "latest").read_text()
    assert "step-000002" <= saved < "step-000008", f"the kill must land mid-run (latest checkpoint {saved})"
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"cfg": to_dict(cfg), "frames": str(frames), "straight": str(tmp_path / "straight"),
                                "killed": str(killed.out_dir)}))
    out = tmp_path / "out.json"
    proc = subprocess.run(_torchrun([str(Path(__file__).parent / "zero_worker.py"), "--case", str(case), "--out",
                                     str(out)]), cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(out.read_text())["ranks"]

    # (1) + (2): optimizer level, bf16 and fp32, 4 clipped steps on different gradients per rank
    for dtype in ("bf16", "fp32"):
        r0, r1 = ranks[0][dtype], ranks[1][dtype]
        for r in (r0, r1):
            assert r["params_equal"] and r["moved"], dtype  # bit-identical to one process on g0 + g1
            assert r["clipped"] and r["norms"] == r["ref_norms"], dtype  # same global norm, bit for bit
            assert "written with learner.data_parallel = 1, this run has 2" in r["refused_unsharded_state"]
            assert "set learner.data_parallel = 1" in r["refused_unsharded_state"]
        assert sorted(r0["owned"] + r1["owned"]) == sorted(f"p{i}" for i in range(7))  # a disjoint cover
        assert not set(r0["owned"]) & set(r1["owned"])
        total = r0["ref_elements"]
        assert r0["elements"] + r1["elements"] == total
        assert 0.4 * total < r0["elements"] < 0.6 * total, (dtype, r0["elements"], total)
        for r in (r0, r1):  # after collect_grads only the owned fp32 gradients are alive: no half or foreign ones
            assert r["grad_elements"] == r["owned_elements"] == r["elements"] // (3 if dtype == "bf16" else 2)
    assert ranks[0]["bf16"]["ref_elements"] == 3 * ranks[0]["fp32"]["ref_elements"] // 2  # masters + 2 moments

    # (3): the killed run, resumed, ends on the straight run's bits
    ours, ref = _files(killed.out_dir), _files(tmp_path / "straight")
    assert sorted(ref) == ["tp0-dp1.pt", "tp0.pt"] and sorted(ours) == sorted(ref)
    assert set(ref["tp0-dp1.pt"]) == {"optimizer"}  # the model is written once per TP rank
    for name in ref:
        assert _equal(ours[name], ref[name]), name
    state = json.loads((killed.out_dir / "checkpoints" / "step-000008" / "state.json").read_text())
    assert state["groups_consumed"] == len(set(state["consumed_group_ids"])) == 16  # each group trained once
    model = ref["tp0.pt"]["model"]
    n_params = sum(p.numel() for p in model.values())
    parts = [ref["tp0.pt"]["optimizer"], ref["tp0-dp1.pt"]["optimizer"]]
    assert [p["dp_rank"] for p in parts] == [0, 1] and {p["data_parallel"] for p in parts} == {2}
    masters = [sum(m.numel() for m in p["master_weights"].values()) for p in parts]
    assert sum(masters) == n_params and set(parts[0]["master_weights"]).isdisjoint(parts[1]["master_weights"])
    assert all(0.4 * n_params < m < 0.6 * n_params for m in masters), (masters, n_params)
    for p in parts:  # each master is the model's bf16 weight, held in fp32
        for name, m in p["master_weights"].items():
            assert torch.equal(m.to(torch.bfloat16), model[name]), name

    # (4): the DP=2 checkpoint is refused at DP=1 before anything is restored
    with pytest.raises(ValueError, match=r"tp0.pt: the optimizer state was written with learner.data_parallel = 2, "
                                         r"this run has 1; .* set learner.data_parallel = 2"):
        run(replace(cfg, out_dir=killed.out_dir, data_parallel=1), str(frames), [])
