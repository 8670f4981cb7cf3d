"""Worker for test_zero_optimizer.py, run by torchrun with 2 ranks (TP=1 x DP=2, gloo): the sharded optimizer
against one unsharded optimizer fed the summed gradients, then the trainer run straight, and the killed run resumed."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")

SHAPES = [(32, 16), (16,), (24, 8), (8, 8), (40,), (16, 16), (12, 4)]


def _state_elements(opt: object) -> int:
    """fp32 optimizer elements held: masters plus both AdamW moments."""
    state = opt.state_dict()  # type: ignore[attr-defined]
    moments = sum(s[k].numel() for s in state["adamw"]["state"].values() for k in ("exp_avg", "exp_avg_sq"))
    return moments + sum(m.numel() for m in state["master_weights"].values())


def _optimizer_parity(dtype: torch.dtype, dp_group: object, tp_group: object) -> dict[str, object]:
    """4 clipped steps: every rank's params and norms must equal one process stepping on g0 + g1 (fp32 sum)."""
    from ssp.learner.config import LearnerConfig
    from ssp.learner.optimizer import MasterWeightAdamW, clip_grad_norm

    rank = dist.get_rank()
    cfg = LearnerConfig(lr=1e-2, warmup_steps=0, grad_clip=20.0)
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    names = [f"p{i}" for i in range(len(SHAPES))]
    ours = [(n, torch.nn.Parameter(s.to(dtype).clone())) for n, s in zip(names, starts)]
    ref = [(n, torch.nn.Parameter(s.to(dtype).clone())) for n, s in zip(names, starts)]
    opt = MasterWeightAdamW(ours, cfg, dp_group=dp_group)
    ref_opt = MasterWeightAdamW(ref, cfg)
    norms, ref_norms = [], []
    for step in range(4):
        grads = [[torch.randn(s, generator=torch.Generator().manual_seed(1000 * step + 100 * r + i)).to(dtype)
                  for i, s in enumerate(SHAPES)] for r in range(2)]
        for (_, p), g in zip(ours, grads[rank]):
            p.grad = g.clone()
        opt.collect_grads()
        held = {id(t.grad): t.grad.numel() for t in [p for _, p in ours] + [m for _, m in opt.named_main()]
                if t.grad is not None}  # every gradient tensor alive on this rank, model's and optimizer's
        grad_elements = sum(held.values())
        norms.append(clip_grad_norm(opt, names, lambda _: True, cfg.grad_clip, dp_group=dp_group,
                                    tp_group=tp_group))
        opt.step()
        for _, p in ref:
            p.grad = None
        ref_opt.collect_grads()
        for i, (_, main) in enumerate(ref_opt.named_main()):
            main.grad = grads[0][i].float() + grads[1][i].float()  # what the DP all-reduce sums
        ref_norms.append(clip_grad_norm(ref_opt, names, lambda _: True, cfg.grad_clip, dp_group=None,
                                        tp_group=tp_group))
        ref_opt.step()
    refused = ""
    try:
        opt.load_state_dict(ref_opt.state_dict(), source="tp0.pt")
    except ValueError as e:
        refused = str(e)
    opt.load_state_dict(opt.state_dict(), source="own")  # its own partition loads
    return {
        "params_equal": all(torch.equal(p.detach(), q.detach()) for (_, p), (_, q) in zip(ours, ref)),
        "moved": all(not torch.equal(p.detach(), s.to(dtype)) for (_, p), s in zip(ours, starts)),
        "norms": norms, "ref_norms": ref_norms, "clipped": max(ref_norms) > cfg.grad_clip,
        "owned": [n for n, _ in opt.named_main()], "elements": _state_elements(opt),
        "ref_elements": _state_elements(ref_opt), "grad_elements": grad_elements,
        "owned_elements": sum(m.numel() for _, m in opt.named_main()),
        "refused_unsharded_state": refused,
    }


def main() -> None:
    from megatron.core import parallel_state

    from ssp.config import build
    from ssp.learner.config import LearnerConfig
    from ssp.learner.model import destroy_parallel, init_parallel
    from ssp.learner.trainer import run

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    case = json.loads(args.case.read_text())
    init_parallel(tp=1)
    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    mine = {name: _optimizer_parity(dtype, dp_group, tp_group)
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    gathered: list[object] = [None, None]
    dist.all_gather_object(gathered, mine)

    cfg = build(LearnerConfig, case["cfg"])
    run(replace(cfg, out_dir=Path(case["straight"])), case["frames"], [])
    run(replace(cfg, out_dir=Path(case["killed"])), case["frames"], [])  # resumes from its last checkpoint
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps({"ranks": gathered}))
    destroy_parallel()


if __name__ == "__main__":
    main()
