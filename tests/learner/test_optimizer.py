"""fp32 master weights for bf16 parameters: small updates accumulate, fp32 runs are untouched, checkpoints keep them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from learner_tiny import make_groups, write_frames

from ssp.learner.config import LearnerConfig
from ssp.learner.optimizer import MasterWeightAdamW

STEPS = 200
LR = 1e-6


def _weights(seed: int) -> torch.Tensor:
    """Magnitudes in [2^-5, 2^-4): bf16 spacing there is 2^-12 = 2.4e-4, so one lr-1e-6 step is far below half."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 2.0 ** -5 * (1 + torch.rand(1024, generator=g))
    sign = torch.where(torch.rand(1024, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).to(torch.bfloat16)


def _train(opt_step, param: torch.nn.Parameter, steps: int) -> None:
    grad = torch.sign(param.detach().float()).to(param.dtype)  # a steady push towards zero: Adam steps ~lr each
    for _ in range(steps):
        param.grad = grad.clone()
        opt_step()


def test_bf16_updates_below_half_a_bf16_step_accumulate_in_the_fp32_master() -> None:
    cfg = LearnerConfig(lr=LR, weight_decay=0.0)
    start = _weights(0)

    plain = torch.nn.Parameter(start.clone())  # what the learner did before: AdamW directly on bf16 weights
    adamw = torch.optim.AdamW([plain], lr=LR, weight_decay=0.0, foreach=False)
    _train(adamw.step, plain, STEPS)
    assert torch.equal(plain.detach(), start)  # every one of the 200 updates rounded away

    param = torch.nn.Parameter(start.clone())
    opt = MasterWeightAdamW([("w", param)], cfg)
    ((_, master),) = opt.named_main()
    assert opt.has_masters and master.dtype == torch.float32 and master is not param

    def step() -> None:
        opt.collect_grads()
        assert master.grad is not None and master.grad.dtype == torch.float32 and param.grad is None
        opt.step()

    _train(step, param, 1)
    assert torch.equal(param.detach(), start)  # one step is still invisible in bf16 ...
    assert (master - start.float()).abs().min() > 0.5 * LR  # ... but the master moved by ~lr everywhere
    _train(step, param, STEPS - 1)
    moved = (master - start.float()).abs()
    assert moved.min() > 0.95 * STEPS * LR and moved.max() < 1.05 * STEPS * LR
    assert torch.equal(param.detach(), master.to(torch.bfloat16))  # the model holds the master, cast
    assert (param.detach() != start).all()  # 2e-4 accumulated > half a bf16 step: every weight changed


def test_fp32_parameters_are_their_own_masters_and_step_exactly_as_adamw() -> None:
    cfg = LearnerConfig(lr=1e-3)
    torch.manual_seed(1)
    start = torch.randn(64, 8)
    ours = torch.nn.Parameter(start.clone())
    opt = MasterWeightAdamW([("w", ours)], cfg)
    assert not opt.has_masters and opt.named_main()[0][1] is ours and opt.state_dict()["master_weights"] == {}
    assert opt.state_dict().keys() == {"adamw", "master_weights"}  # DP = 1: the unsharded format, no DP keys
    ref = torch.nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([ref], lr=1e-3, weight_decay=cfg.weight_decay, betas=cfg.adam_betas,
                              eps=cfg.adam_eps, foreach=False)
    for i in range(5):
        grad = torch.randn(64, 8, generator=torch.Generator().manual_seed(i))
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.collect_grads()
        opt.step()
        adamw.step()
    assert torch.equal(ours.detach(), ref.detach())


def test_a_checkpoint_of_another_dtype_is_refused() -> None:
    cfg = LearnerConfig()
    half = MasterWeightAdamW([("w", torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16)))], cfg)
    full = MasterWeightAdamW([("w", torch.nn.Parameter(torch.ones(4, 4)))], cfg)
    with pytest.raises(ValueError, match="another learner.dtype: resume with the dtype it was saved with"):
        full.load_state_dict(half.state_dict(), source="tp0.pt")
    with pytest.raises(ValueError, match="another learner.dtype"):
        half.load_state_dict(full.state_dict(), source="tp0.pt")
    with pytest.raises(KeyError, match="tp0.pt: .* expected adamw and master_weights"):
        half.load_state_dict({"state": {}, "param_groups": []}, source="tp0.pt")


def _checkpoint(out_dir: Path) -> dict:
    root = out_dir / "checkpoints"
    return torch.load(root / (root / "latest").read_text() / "tp0.pt", weights_only=True)


def test_bf16_learner_keeps_master_weights_through_a_resume(tiny_llama: Path, tmp_path: Path, par1: object) -> None:
    """The real megatron model in bf16 on CPU: masters hold what bf16 cannot, and a resumed run is bit-identical."""
    from ssp.learner.trainer import run

    frames = write_frames(tmp_path / "t.frames", make_groups(6, seed=11))
    base = LearnerConfig(model_dir=tiny_llama, dtype="bfloat16", groups_per_step=2, lr=LR, warmup_steps=0,
                         vocab_divisor=8, micro_batch_tokens=48, drop_zero_variance_groups=False)
    straight = replace(base, out_dir=tmp_path / "straight")
    assert run(straight, str(frames), []) == 0
    resumed = replace(base, out_dir=tmp_path / "resumed", max_steps=1)
    assert run(resumed, str(frames), []) == 0
    assert run(replace(resumed, max_steps=0), str(frames), []) == 0

    ours, ref = _checkpoint(resumed.out_dir), _checkpoint(straight.out_dir)
    masters = ref["optimizer"]["master_weights"]
    half = ref["model"]
    assert all(p.dtype == torch.bfloat16 for p in half.values()) and set(masters) == set(half)  # norms too
    total = sum(p.numel() for p in half.values())
    carried = sum((masters[n] != p.float()).sum().item() for n, p in half.items())
    for name, p in half.items():
        assert masters[name].dtype == torch.float32 and torch.equal(masters[name].to(torch.bfloat16), p), name
    assert carried > 0.5 * total  # most weights hold sub-bf16 progress only the master remembers
    for name in ref["model"]:
        assert torch.equal(ours["model"][name], ref["model"][name]), name
        if name in masters:
            assert torch.equal(ours["optimizer"]["master_weights"][name], masters[name]), name
    for key, state in ref["optimizer"]["adamw"]["state"].items():
        assert state["exp_avg"].dtype == torch.float32
        assert torch.equal(ours["optimizer"]["adamw"]["state"][key]["exp_avg_sq"], state["exp_avg_sq"])
    steps = json.loads((resumed.out_dir / "checkpoints" / "step-000003" / "state.json").read_text())["step"]
    assert steps == 3
