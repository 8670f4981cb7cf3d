"""Worker for test_export.py, run by torchrun with 2 ranks: for each tiny family, build the learner's model at TP=2,
move its weights off the HF checkpoint, record its logits and save a learner checkpoint (one tpN.pt per rank)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ssp.learner.model import Parallel

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")

TOKEN_IDS = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(5))
"""The token ids whose logits the learner and the exported model must agree on (tiny vocab: 250)."""


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, tp_rank: int) -> None:
    """Add noise to every parameter, so an export that merely copied the base model (or one TP rank's shard into
    another's place) fails. Replicated parameters (norms) get the same noise on every rank, as a real step gives
    them; sharded ones get noise of their own rank."""
    from ssp.learner.convert import canonical_params, is_tp_sharded

    for index, (name, param) in enumerate(canonical_params(model)):
        seed = 1000 * index + (tp_rank if is_tp_sharded(name) else 0)
        noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
        param.add_(0.05 * noise.to(param.dtype))


def learner_logits(model: torch.nn.Module, vocab_size: int, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The model's logits on TOKEN_IDS over the real vocab, all TP ranks' vocab slices joined."""

    ids = TOKEN_IDS
    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    if tp_group is not None:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        local = torch.cat(parts, dim=-1)
    return local[..., :vocab_size]


def train_and_save(model_dir: Path, checkpoints: Path, par: Parallel,
                   tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Build from `model_dir`, perturb, save a checkpoint at step 3 under `checkpoints`; returns the logits."""
    from ssp.learner import checkpoint
    from ssp.learner.config import LearnerConfig
    from ssp.learner.convert import canonical_params, load_hf_into_model
    from ssp.learner.model import ModelShape, build_model
    from ssp.learner.optimizer import build_optimizer

    shape = ModelShape.from_dir(model_dir)
    model = build_model(shape, par, vocab_divisor=8)
    load_hf_into_model(model, model_dir, shape, tp=par.tp, tp_rank=par.tp_rank, vocab_divisor=8)
    perturb_weights(model, par.tp_rank)
    logits = learner_logits(model, shape.vocab_size, tp_group)
    optimizer, scheduler = build_optimizer(canonical_params(model), LearnerConfig())
    checkpoint.save(checkpoints, checkpoint.StreamState(step=3), model, optimizer, scheduler,
                    tp_rank=par.tp_rank, dp_rank=0, keep=2)
    return logits


def main() -> None:
    from megatron.core import parallel_state

    from ssp.learner.model import destroy_parallel, init_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs=2, action="append", required=True, metavar=("MODEL_DIR", "CHECKPOINTS"))
    parser.add_argument("--logits", type=Path, required=True)
    args = parser.parse_args()
    par = init_parallel(tp=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    logits = [train_and_save(Path(model_dir), Path(root), par, tp_group) for model_dir, root in args.model]
    if par.rank == 0:
        torch.save(logits, args.logits)
    destroy_parallel()


if __name__ == "__main__":
    main()
