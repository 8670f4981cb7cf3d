"""AdamW over fp32 master weights, sharded over the data-parallel ranks (ZeRO-1): the learner's one optimizer.

Why master weights: a bf16 weight has 8 significant bits, so an update smaller than half its spacing rounds away.
At the learner's lr of 1e-6 an AdamW step moves a weight by about 1e-6, while a bf16 weight of magnitude 0.05 has
spacing 2.4e-4: a pure-bf16 AdamW leaves it unchanged step after step. Here every half-precision parameter gets an
fp32 copy (the master); gradients are upcast onto the masters, reduced and clipped there, AdamW (fp32 moments)
steps the masters, and the masters are cast back into the model's parameters. Small updates then accumulate in
fp32 until they cross a bf16 step. Parameters that are already fp32 (all of them on CPU; megatron's norm weights
everywhere) are their own masters: no copy, so an fp32 run behaves exactly as a plain AdamW.

Why sharded (ZeRO-1, as Megatron's distributed optimizer): masters and moments cost 12 bytes per parameter next to
the 2-byte bf16 weight, and every data-parallel replica would hold the same 12. Instead the parameters of a TP
rank are split among its DP ranks (`partition`: whole parameters, largest first onto the least-loaded rank, so
the split is deterministic and balanced by element count). Each DP rank keeps masters, moments and fp32 gradients
only for the parameters it owns:

    zero_grad() -> backward -> collect_grads()  each gradient upcast to fp32 and summed over DP (one all-reduce per
                                                parameter); kept only by its owner, released everywhere else
                -> clip_grad_norm()             per-parameter squared norms, summed over DP and TP in model order:
                                                the same norm, bit for bit, as one unsharded process
                -> step()                       AdamW on the owned parameters; each parameter is then broadcast
                                                over DP from its owner, so every replica's model is identical

Memory per parameter on each GPU with DP = d (bf16 model): 2 (weight) + 12/d (fp32 master + two fp32 moments)
at rest; during a step also the bf16 gradient (2, released parameter by parameter as it is upcast) and the owned
fp32 gradients (4/d): at most 2 + 12/d + max(2, 4/d) + one parameter's fp32 gradient. d = 1: 18; d = 2: 10;
d = 8: 5.5 (fp32 models: 4 + 8/d at rest, + 4/d for gradients). With d = 1 nothing is sharded and no collective
runs: exactly the unsharded optimizer. Checkpoints (ssp.learner.checkpoint) save each DP rank's partition; a
partition resumes only at the data_parallel it was written with.

Why not megatron-core's Float16OptimizerWithFloat16Params / DistributedOptimizer (0.16.1): they accept only
`torch.cuda.*Tensor` parameters (a TypeError on CPU), allocate scale tensors on 'cuda', and expect DDP-wrapped
models with `main_grad` buffers; using them on CPU would mean patching them, which the project rules out.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ssp.learner.config import LearnerConfig

HALF_DTYPES = (torch.bfloat16, torch.float16)


def partition(numels: list[int], parts: int) -> list[int]:
    """The owning part of each parameter: largest first onto the part with the fewest elements (ties: the earlier
    parameter, the lower part). Deterministic, so every rank computes the same split without talking."""
    order = sorted(range(len(numels)), key=lambda i: (-numels[i], i))
    loads = [(0, part) for part in range(parts)]
    owner = [0] * len(numels)
    for i in order:
        load, part = heapq.heappop(loads)
        owner[i] = part
        heapq.heappush(loads, (load + numels[i], part))
    return owner


class MasterWeightAdamW:
    """AdamW (torch's, fp32 state) stepping fp32 masters of this DP rank's share of the model's parameters; see the
    module docstring.

    `inner` is the torch optimizer over the owned main tensors (an LR scheduler wraps it). `named_main()` lists
    (canonical name, fp32 tensor whose .grad is this step's DP-summed gradient) for the owned parameters in model
    order: the master for a half parameter, the parameter itself for an fp32 one. `dp_group` None means DP = 1.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: LearnerConfig, *,
                 dp_group: Any = None) -> None:
        self._params: list[tuple[str, torch.nn.Parameter]] = [(n, p) for n, p in named_params if p.requires_grad]
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self._dp_ranks = dist.get_process_group_ranks(dp_group) if self.dp_size > 1 else [0]
        """Global rank of each DP rank (broadcast sources)."""
        self.owner = partition([p.numel() for _, p in self._params], self.dp_size)
        """Owning DP rank of each parameter, in model order."""
        self._has_half = any(p.dtype in HALF_DTYPES for _, p in self._params)
        self._mains: list[torch.Tensor | None] = []
        """Per parameter: its fp32 main tensor if this rank owns it, else None."""
        self._masters: dict[str, torch.Tensor] = {}
        """Name -> fp32 master, for owned half parameters only."""
        for (name, p), owner in zip(self._params, self.owner):
            if owner != self.dp_rank:
                self._mains.append(None)
            elif p.dtype in HALF_DTYPES:
                master = p.detach().float().clone()
                self._masters[name] = master
                self._mains.append(master)
            else:
                self._mains.append(p)
        self._main = [(name, m) for (name, _), m in zip(self._params, self._mains) if m is not None]
        decay = [t for _, t in self._main if t.dim() >= 2]
        no_decay = [t for _, t in self._main if t.dim() < 2]
        self.inner = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, foreach=False)

    @property
    def has_masters(self) -> bool:
        """True when some parameter of the model is half precision (and so has an fp32 master on its owner)."""
        return self._has_half

    def named_main(self) -> list[tuple[str, torch.Tensor]]:
        return self._main

    def zero_grad(self) -> None:
        """Zero the model's gradients in place (half and non-owned ones were already released by `collect_grads`)."""
        for _, p in self._params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Put this step's DP-summed fp32 gradient on every owned main tensor; a parameter that got none counts as
        zeros. The model's half gradients and every non-owned gradient are released here (the next backward
        re-creates them), so the fp32 gradients held are this rank's share only."""
        for (_, p), main in zip(self._params, self._mains):
            if p.grad is None:
                grad = torch.zeros(p.shape, dtype=torch.float32 if p.dtype in HALF_DTYPES else p.dtype,
                                   device=p.device)
            else:
                grad = p.grad.float() if p.dtype in HALF_DTYPES else p.grad
            if self.dp_size > 1:
                dist.all_reduce(grad, group=self.dp_group)
            if main is not p:
                p.grad = None
            if main is not None:
                main.grad = grad

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on the owned main tensors, masters cast back into the model, then each parameter
        broadcast over DP from its owner."""
        self.inner.step()
        for (_, p), main in zip(self._params, self._mains):
            if main is not None and main is not p:
                p.copy_(main)
                main.grad = None
        if self.dp_size > 1:
            for (_, p), owner in zip(self._params, self.owner):
                dist.broadcast(p.data, src=self._dp_ranks[owner], group=self.dp_group)

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state (fp32 moments, step counts) and the fp32 masters by canonical name, this rank's partition;
        with DP > 1 also the DP size and rank it belongs to (absent: an unsharded DP = 1 state)."""
        state: dict[str, Any] = {"adamw": self.inner.state_dict(), "master_weights": dict(self._masters)}
        if self.dp_size > 1:
            state |= {"data_parallel": self.dp_size, "dp_rank": self.dp_rank}
        return state

    def check_data_parallel(self, state: dict[str, Any], *, source: str) -> None:
        """Refuse a state sharded over another number of DP ranks (its partitions would not match ours)."""
        saved = state.get("data_parallel", 1)
        if saved != self.dp_size:
            raise ValueError(f"{source}: the optimizer state was written with learner.data_parallel = {saved}, this "
                             f"run has {self.dp_size}; fp32 masters and AdamW moments are sharded over the "
                             "data-parallel ranks, so a checkpoint resumes only at the data_parallel it was saved "
                             f"with: set learner.data_parallel = {saved}, or start fresh in a new out_dir")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore AdamW and the masters; the state must be this DP rank's partition, with masters for exactly
        our owned half parameters."""
        if "adamw" not in state or "master_weights" not in state:
            raise KeyError(f"{source}: the optimizer state has keys {sorted(state)}, expected adamw and "
                           "master_weights (written by an older learner); start the run fresh in a new out_dir")
        self.check_data_parallel(state, source=source)
        if state.get("dp_rank", 0) != self.dp_rank:
            raise ValueError(f"{source}: holds the optimizer partition of DP rank {state.get('dp_rank', 0)}, this "
                             f"is DP rank {self.dp_rank}; the checkpoint's files were renamed or mixed: restore "
                             "them as written")
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


@torch.no_grad()
def clip_grad_norm(optimizer: Any, names: list[str], counted: Callable[[str], bool], max_norm: float, *,
                   dp_group: Any, tp_group: Any) -> float:
    """Global L2 norm of the main gradients, then clip them to `max_norm` (0: no clipping); returns the norm.

    `names` are every trainable parameter's names in model order; `optimizer.named_main()` has gradients for this
    rank's share. Each counted parameter's squared norm goes into its slot of a vector, the vector is summed over
    DP (exact: one non-zero per slot) and added up in model order, then summed over TP: so a sharded run computes
    the norm of one unsharded process bit for bit. `counted` excludes TP-replicated copies on all but one TP rank.
    """
    slot = {name: i for i, name in enumerate(names)}
    named = optimizer.named_main()
    device = named[0][1].device if named else _group_device(tp_group)
    squares = torch.zeros(len(names), dtype=torch.float64, device=device)
    for name, main in named:
        if counted(name):
            squares[slot[name]] = sum_of_squares(main.grad)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(squares, group=dp_group)
    total = 0.0
    for value in squares.tolist():
        total += value
    sq = torch.tensor([total], dtype=torch.float64, device=device)
    dist.all_reduce(sq, group=tp_group)
    norm = math.sqrt(sq.item())
    if max_norm and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for _, main in named:
            main.grad.mul_(scale)
    return norm


SQUARES_CHUNK = 1 << 22
"""Elements per float64 partial sum in `sum_of_squares`: a 32 MB temporary, where the whole of SmolLM2's
embedding gradient would need 226 MB."""


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """sum(t^2) accumulated in float64, chunk by chunk, as a float64 scalar tensor.

    Why chunks: `t.double()` of a large gradient is a fresh float64 copy twice its size; on CPU a 226 MB block
    costs more in page faults than the sum itself (measured: 1 s of a SmolLM2 step for the embedding alone). Chunks
    of `SQUARES_CHUNK` keep the temporary small; a tensor of at most one chunk is summed exactly as before."""
    flat = t.reshape(-1)
    if flat.numel() <= SQUARES_CHUNK:
        return flat.double().pow(2).sum()
    return torch.stack([chunk.double().pow(2).sum() for chunk in flat.split(SQUARES_CHUNK)]).sum()


def _group_device(group: Any) -> torch.device:
    """Where a collective on `group` needs its tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: LearnerConfig, *,
                    dp_group: Any = None) -> tuple[MasterWeightAdamW, Any]:
    """The optimizer (no decay on norms and biases; sharded over `dp_group`) and a linear warm-up to the peak lr,
    then constant."""
    optimizer = MasterWeightAdamW(named_params, cfg, dp_group=dp_group)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.inner, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler
