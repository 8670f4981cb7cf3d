"""AdamW over fp32 master weights: the learner's one optimizer, for fp32 and for bf16/fp16 parameters alike.

Why master weights: a bf16 weight has 8 significant bits, so an update smaller than half its spacing rounds away.
At the learner's lr of 1e-6 an AdamW step moves a weight by about 1e-6, while a bf16 weight of magnitude 0.05 has
spacing 2.4e-4: a pure-bf16 AdamW leaves it unchanged step after step. Here every half-precision parameter gets an
fp32 copy (the master); gradients are upcast onto the masters, reduced and clipped there by the trainer, AdamW
(fp32 moments) steps the masters, and the masters are cast back into the model's parameters. Small updates then
accumulate in fp32 until they cross a bf16 step. Parameters that are already fp32 (all of them on CPU; megatron's
norm weights everywhere) are their own masters: no copy, so an fp32 run behaves exactly as a plain AdamW.

Why not megatron-core's Float16OptimizerWithFloat16Params (0.16.1): it accepts only `torch.cuda.*Tensor`
parameters (a TypeError on CPU), allocates its scale tensors on 'cuda', and expects DDP-wrapped models with
`main_grad` buffers; using it on CPU would mean patching it, which the project rules out.

    step:  zero_grad() -> backward -> collect_grads() -> (trainer: DP-reduce + clip over named_main()) -> step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from learner.config import LearnerConfig

HALF_DTYPES = (torch.bfloat16, torch.float16)


class MasterWeightAdamW:
    """AdamW (torch's, fp32 state) stepping fp32 masters of the model's parameters; see the module docstring.

    `inner` is the torch optimizer (an LR scheduler wraps it). `named_main()` lists (canonical name, fp32 tensor
    whose .grad is this step's gradient) in model order: the master for a half parameter, the parameter itself
    for an fp32 one.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: LearnerConfig) -> None:
        self._params: list[tuple[str, torch.nn.Parameter]] = [(n, p) for n, p in named_params if p.requires_grad]
        self._main: list[tuple[str, torch.Tensor]] = []
        self._masters: dict[str, torch.Tensor] = {}
        """Name -> fp32 master, for half parameters only."""
        for name, p in self._params:
            if p.dtype in HALF_DTYPES:
                master = p.detach().float().clone()
                self._masters[name] = master
                self._main.append((name, master))
            else:
                self._main.append((name, p))
        decay = [t for _, t in self._main if t.dim() >= 2]
        no_decay = [t for _, t in self._main if t.dim() < 2]
        self.inner = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, foreach=False)

    @property
    def has_masters(self) -> bool:
        """True when some parameter is half precision (and so has an fp32 master)."""
        return bool(self._masters)

    def named_main(self) -> list[tuple[str, torch.Tensor]]:
        return self._main

    def zero_grad(self) -> None:
        """Zero the model's gradients in place (half ones were already released by `collect_grads`)."""
        for _, p in self._params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Put this step's gradient on every main tensor as fp32; a parameter that got none gets zeros.

        Half gradients are upcast onto the masters and released from the model (they are re-created by the next
        backward), so the model holds no stale half gradient next to the fp32 one.
        """
        for (name, p), (_, main) in zip(self._params, self._main):
            if main is p:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                continue
            main.grad = p.grad.float() if p.grad is not None else torch.zeros_like(main)
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on the main tensors, then the masters cast back into the model's half parameters."""
        self.inner.step()
        for (_, p), (_, main) in zip(self._params, self._main):
            if main is not p:
                p.copy_(main)
                main.grad = None

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state (fp32 moments, step counts) and the fp32 masters by canonical name."""
        return {"adamw": self.inner.state_dict(), "master_weights": dict(self._masters)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore AdamW and the masters; the checkpoint must hold masters for exactly our half parameters."""
        if "adamw" not in state or "master_weights" not in state:
            raise KeyError(f"{source}: the optimizer state has keys {sorted(state)}, expected adamw and "
                           "master_weights (written by an older learner); start the run fresh in a new out_dir")
        saved = state["master_weights"]
        if set(saved) != set(self._masters):
            raise ValueError(f"{source}: holds fp32 master weights for {len(saved)} parameters, this model needs "
                             f"them for {len(self._masters)} (its half-precision ones); the checkpoint was written "
                             "with another learner.dtype: resume with the dtype it was saved with")
        for name, master in self._masters.items():
            if saved[name].shape != master.shape or saved[name].dtype != torch.float32:
                raise ValueError(f"{source}: master weight {name} is {saved[name].dtype} "
                                 f"{tuple(saved[name].shape)}, expected float32 {tuple(master.shape)}; resume "
                                 "with the tensor_parallel and model it was saved with")
            master.copy_(saved[name])
        self.inner.load_state_dict(state["adamw"])


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    cfg: LearnerConfig) -> tuple[MasterWeightAdamW, Any]:
    """The optimizer (no decay on norms and biases) and a linear warm-up to the peak lr, then constant."""
    optimizer = MasterWeightAdamW(named_params, cfg)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.inner, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler
