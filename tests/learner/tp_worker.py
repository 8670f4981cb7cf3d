"""Worker for test_tensor_parallel.py, run by torchrun with 2 ranks: TP=2 parity, round trip and a training step,
then the same step at TP=1 x DP=2, each compared with values the test computed in one process."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    from megatron.core import parallel_state

    from ssp.config import build
    from ssp.engine.trajectory import unpack_group
    from ssp.learner.config import LearnerConfig
    from ssp.learner.convert import HfTensors, load_hf_into_model
    from ssp.learner.gather import iter_hf_weights
    from ssp.learner.model import ModelShape, build_model, destroy_parallel, init_parallel
    from ssp.learner.trainer import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    case = torch.load(args.case, weights_only=False)
    cfg = build(LearnerConfig, case["cfg"])
    groups = [unpack_group(p) for p in case["payloads"]]
    results: dict[str, object] = {}

    par = init_parallel(tp=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for family, model_dir in case["models"].items():
        shape = ModelShape.from_dir(Path(model_dir))
        model = build_model(shape, par, vocab_divisor=8)
        load_hf_into_model(model, Path(model_dir), shape, tp=2, tp_rank=par.tp_rank, vocab_divisor=8)
        ids = case["ids"]
        with torch.no_grad():
            local = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
            parts = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
        logits = torch.cat(parts, dim=-1)[..., : shape.vocab_size]
        results[f"{family}_logits_max_diff"] = (logits - case["hf_logits"][family]).abs().max().item()
        back = dict(iter_hf_weights(model, shape, tp_group=tp_group, keep=par.rank == 0))
        if par.rank == 0:
            with HfTensors(Path(model_dir)) as hf:
                expected = {n: hf.get(n) for n in hf.names() if not (shape.tie_word_embeddings and n == "lm_head.weight")}
            results[f"{family}_round_trip_exact"] = back.keys() == expected.keys() and all(
                torch.equal(back[n], expected[n]) for n in expected)

    model_dir = Path(case["models"]["llama"])
    shape = ModelShape.from_dir(model_dir)
    for layout in ("tp2", "dp2"):
        if layout == "dp2":  # same two processes, regrouped as TP=1 x DP=2
            parallel_state.destroy_model_parallel()
            par = init_parallel(tp=1)
            tp_group = parallel_state.get_tensor_model_parallel_group()
        model = build_model(shape, par, vocab_divisor=cfg.vocab_divisor)
        load_hf_into_model(model, model_dir, shape, tp=par.tp, tp_rank=par.tp_rank, vocab_divisor=cfg.vocab_divisor)
        step = Trainer(cfg, par, shape, model, None).train_step(groups, policy_version=0)
        after = dict(iter_hf_weights(model, shape, tp_group=tp_group, keep=True))
        results[f"{layout}_loss"] = step.metrics["loss"]
        results[f"{layout}_grad_norm"] = step.metrics["grad_norm"]
        results[f"{layout}_weights_max_diff"] = _max_diff(after, case["after_step"])
    if par.rank == 0:
        args.out.write_text(json.dumps(results))
    destroy_parallel()


if __name__ == "__main__":
    main()
