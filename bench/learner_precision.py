"""How far bf16 weights move at the learner's lr with fp32 master weights (ssp.learner.optimizer) and without.

    python -m ssp.bench.learner_precision [--steps 4] [--lr 1e-6] [--model-dir DIR]

One process, CPU (gloo): the prepared SmolLM2-135M-Instruct in bf16, the same synthetic trajectory groups for both
runs, `--steps` optimizer steps each. "master" is the learner as it is (AdamW on fp32 masters, cast back);
"plain bf16" is torch AdamW directly on the bf16 parameters (what the learner did before). Printed side by side:
the share of weights whose bf16 value changed, the mean |change| of the model weights, the mean |change| the fp32
masters hold, and seconds per step. Writes artifacts/bench/learner_precision.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from ssp.paths import artifacts_dir


class PlainBf16AdamW:
    """The baseline: torch AdamW stepping the bf16 parameters themselves, behind the trainer's optimizer calls."""

    def __init__(self, named_params: Any, cfg: Any) -> None:
        import torch

        self._named = [(n, p) for n, p in named_params if p.requires_grad]
        self.inner = torch.optim.AdamW(
            [{"params": [p for _, p in self._named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for _, p in self._named if p.dim() < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, foreach=False)

    def named_main(self) -> list[Any]:
        return self._named

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=False)

    def collect_grads(self) -> None:
        import torch

        for _, p in self._named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def step(self) -> None:
        self.inner.step()


def _measure(variant: str, args: argparse.Namespace, par: Any, groups: list[Any]) -> dict[str, float]:
    import torch
    from tqdm import tqdm

    from ssp.learner.config import LearnerConfig
    from ssp.learner.convert import canonical_params, load_hf_into_model
    from ssp.learner.model import ModelShape, build_model
    from ssp.learner.trainer import Trainer

    shape = ModelShape.from_dir(args.model_dir)
    model = build_model(shape, par)
    load_hf_into_model(model, args.model_dir, shape, tp=1, tp_rank=0, vocab_divisor=128)
    cfg = LearnerConfig(model_dir=args.model_dir, dtype="bfloat16", lr=args.lr, warmup_steps=0,
                        drop_zero_variance_groups=False, micro_batch_tokens=4096)
    trainer = Trainer(cfg, par, shape, model, None)
    if variant == "plain bf16":
        trainer.optimizer = PlainBf16AdamW(canonical_params(model), cfg)  # type: ignore[assignment]
        trainer.lr_schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer.inner, lambda _: 1.0)
    start = {n: p.detach().clone() for n, p in canonical_params(model)}
    times = []
    for step in tqdm(range(args.steps), desc=variant, unit="step"):
        t0 = time.perf_counter()
        trainer.train_step(groups[step:step + 1], policy_version=step)
        times.append(time.perf_counter() - t0)
    total = sum(p.numel() for p in start.values())
    changed = sum((p.detach() != start[n]).sum().item() for n, p in canonical_params(model))
    moved = sum((p.detach().float() - start[n].float()).abs().sum().item() for n, p in canonical_params(model))
    held = moved
    if variant == "master":
        held = sum((m - start[n].float()).abs().sum().item() for n, m in trainer.optimizer.named_main())
    return {"changed_share": changed / total, "model_mean_abs_change": moved / total,
            "master_mean_abs_change": held / total, "step_s": sum(times) / len(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (default 4)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW lr, constant (default 1e-6, the learner's)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per trajectory; 5 per step (default 32)")
    p.add_argument("--model-dir", type=Path, default=None, help="HF model (default: the prepared SmolLM2)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")
    from ssp.bench.learner_worker import _groups
    from ssp.learner.model import destroy_parallel, init_parallel
    from ssp.paths import default_model_dir

    args.model_dir = args.model_dir or default_model_dir()
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model_dir} holds no model; run `ssp model prepare` or pass --model-dir")
    par = init_parallel(tp=1, device="cpu", dtype="bfloat16")
    try:
        vocab = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
        groups = _groups(args.steps, args.seq_len, vocab, seed=0)
        results = {v: _measure(v, args, par, groups) for v in ("master", "plain bf16")}
    finally:
        destroy_parallel()
    print(f"{args.model_dir.name} bf16, {args.steps} steps at lr {args.lr:g} (CPU):")
    print(f"{'variant':<12} {'bf16 weights changed':>21} {'mean |dw| model':>16} {'mean |dw| master':>17} "
          f"{'s/step':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['changed_share']:>20.4%} {r['model_mean_abs_change']:>16.3e} "
              f"{r['master_mean_abs_change']:>17.3e} {r['step_s']:>7.2f}")
    m, b = results["master"], results["plain bf16"]
    print(f"ratio master / plain: weights changed x{m['changed_share'] / max(b['changed_share'], 1e-12):.1f}, "
          f"progress held x{m['master_mean_abs_change'] / max(b['model_mean_abs_change'], 1e-30):.1f}")
    out = artifacts_dir() / "bench" / "learner_precision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
