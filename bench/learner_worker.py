"""One rank of `ssp bench learner` (run by torchrun): time optimizer steps of a random-weight GPTModel."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")


def _groups(n: int, seq_len: int, vocab: int, seed: int) -> list:  # type: ignore[type-arg]
    from ssp.engine.trajectory import Trajectory

    rng = random.Random(seed)
    out = []
    for g in range(n):
        group = []
        for role, k in (("proposer", 1), ("solver", 4)):
            for _ in range(k):
                prompt_len = seq_len // 4
                resp = seq_len - prompt_len
                group.append(Trajectory(
                    role=role, group_id=f"b{g}", prompt_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
                    response_ids=[rng.randrange(vocab) for _ in range(resp)], loss_mask=[1] * resp,
                    rollout_logprobs=[-rng.uniform(1, 8) for _ in range(resp)], policy_versions=[0] * resp,
                    reward=float(rng.random() < 0.5)))
        out.append(group)
    return out


def main() -> None:
    import torch
    import torch.distributed as dist

    from ssp.learner.config import LearnerConfig
    from ssp.learner.model import ModelShape, build_model, destroy_parallel, init_parallel
    from ssp.learner.trainer import Trainer

    p = argparse.ArgumentParser()
    p.add_argument("--shape-json", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--groups", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--micro-batch-tokens", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shape = ModelShape.from_hf_dict(json.loads(args.shape_json), "--shape-json")
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    par = init_parallel(tp=world)
    model = build_model(shape, par, init_weights=True)
    cfg = replace(LearnerConfig(), tensor_parallel=world, micro_batch_tokens=args.micro_batch_tokens,
                  drop_zero_variance_groups=False, lr=1e-6, warmup_steps=0)
    trainer = Trainer(cfg, par, shape, model, None)
    params = sum(p.numel() for p in model.parameters())
    total = torch.tensor([params], dtype=torch.float64)
    dist.all_reduce(total)  # norms are replicated: subtract their extra copies
    replicated = sum(p.numel() for n, p in model.named_parameters() if n.endswith("layernorm.weight"))
    params_total = int(total.item()) - replicated * (world - 1)
    times, tokens = [], 0.0
    for step in range(args.steps + 1):
        groups = _groups(args.groups, args.seq_len, shape.vocab_size, seed=step)
        if par.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        result = trainer.train_step(groups, policy_version=step)
        if par.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
            tokens = result.metrics["tokens"]
    step_s = statistics.median(times)
    if par.rank == 0:
        args.out.write_text(json.dumps({
            "tp": world, "device": par.device.type, "dtype": str(par.dtype).removeprefix("torch."),
            "params": params_total, "tokens_per_step": int(tokens), "step_s": step_s, "tokens_per_s": tokens / step_s,
            "steps": args.steps}))
    destroy_parallel()


if __name__ == "__main__":
    main()
