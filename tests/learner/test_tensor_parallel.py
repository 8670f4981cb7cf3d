"""Two gloo processes: TP=2 logits equal transformers' (1e-4), the gathered round trip is bit-exact, and one training
step at TP=2 and at TP=1 x DP=2 reaches the weights a single process reaches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from learner_tiny import make_groups

from ssp.config import to_dict
from ssp.engine.trajectory import pack_group
from ssp.learner.config import LearnerConfig
from ssp.paths import PROJECT_ROOT
from ssp.processes import free_port


@pytest.mark.slow
def test_tp2_and_dp2_match_one_process(tiny_llama: Path, tiny_qwen: Path, tmp_path: Path, par1: object) -> None:
    from transformers import AutoModelForCausalLM

    from ssp.learner.convert import load_hf_into_model
    from ssp.learner.gather import iter_hf_weights
    from ssp.learner.model import ModelShape, build_model
    from ssp.learner.trainer import Trainer

    ids = torch.randint(0, 250, (2, 21), generator=torch.Generator().manual_seed(3))
    hf_logits = {}
    for family, d in (("llama", tiny_llama), ("qwen", tiny_qwen)):
        with torch.no_grad():
            hf_logits[family] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits
    # adam_eps well above gradient noise: the step is a smooth function of the gradient, so TP/DP reduction order
    # cannot flip an element's update the way sign(g) at eps=1e-8 could.
    cfg = replace(LearnerConfig(), lr=1e-3, warmup_steps=0, adam_eps=1e-4, vocab_divisor=8, micro_batch_tokens=40,
                  drop_zero_variance_groups=False, grad_clip=0.5)
    groups = make_groups(4, seed=8)
    shape = ModelShape.from_dir(tiny_llama)
    model = build_model(shape, par1, vocab_divisor=8)  # type: ignore[arg-type]
    load_hf_into_model(model, tiny_llama, shape, tp=1, tp_rank=0, vocab_divisor=8)
    step = Trainer(cfg, par1, shape, model, None).train_step(groups, policy_version=0)  # type: ignore[arg-type]
    after = dict(iter_hf_weights(model, shape, tp_group=None, keep=True))

    case = tmp_path / "case.pt"
    torch.save({"cfg": to_dict(cfg), "payloads": [pack_group(g) for g in groups], "ids": ids, "hf_logits": hf_logits,
                "models": {"llama": str(tiny_llama), "qwen": str(tiny_qwen)}, "after_step": after}, case)
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", str(Path(__file__).parent / "tp_worker.py"), "--case", str(case), "--out", str(out)],
        cwd=PROJECT_ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["llama_logits_max_diff"] < 1e-4 and r["qwen_logits_max_diff"] < 1e-4
    assert r["llama_round_trip_exact"] and r["qwen_round_trip_exact"]
    for layout in ("tp2", "dp2"):
        assert r[f"{layout}_loss"] == pytest.approx(step.metrics["loss"], rel=1e-5, abs=1e-7)
        assert r[f"{layout}_grad_norm"] == pytest.approx(step.metrics["grad_norm"], rel=1e-5)
        assert r[f"{layout}_weights_max_diff"] < 1e-6
