"""Atomic training checkpoints: model shard and LR schedule per TP rank, optimizer partition per (TP, DP) rank, plus
the stream position.

Layout under `root`:

    step-000007/            one complete checkpoint (only ever appears complete: built as step-000007.tmp/,
      tp0.pt, tp1.pt ...    every file fsynced, then renamed; a second save of step 7 becomes step-000007-1/, so no
                            good checkpoint is deleted before its replacement is in place); written by DP rank 0 of
                            each TP rank: the model
                            shard as the model's dtype, DP rank 0's optimizer partition (AdamW state + fp32 master
                            weights) and the LR schedule
      tp0-dp1.pt ...        with data_parallel > 1: the optimizer partition of each further DP rank (ssp.learner.optimizer
                            shards masters and moments over the DP ranks, ZeRO-1); the model is not repeated
      state.json            step, stream offset, ids of the recently consumed groups
    latest                  the name of the newest complete checkpoint (replaced by an atomic rename)

With data_parallel = 1 only tpN.pt files exist, as before sharding. A partition resumes only at the data_parallel it
was written with (checked on every rank before anything is restored, so every rank refuses alike). A run killed at
any moment leaves either the previous checkpoint or the new one as `latest`; a leftover *.tmp is ignored and removed.
Resuming restores weights, the fp32 master weights of bf16 parameters (ssp.learner.optimizer), AdamW moments, the LR
schedule and the stream position, so no trajectory is trained twice and a resumed run reaches the same bits.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ssp.learner.convert import canonical_params
from ssp.learner.optimizer import MasterWeightAdamW


@dataclass(kw_only=True, slots=True)
class StreamState:
    """Where training stands: optimizer steps done and how much of the trajectory stream they consumed."""

    step: int = 0
    """Completed optimizer steps (= the policy version of the current weights)."""
    offset: int = 0
    """Byte offset in the trajectory file after the last consumed frame."""
    groups_consumed: int = 0
    """Trajectory groups consumed over the whole run (trained or dropped by the batch plan; repeats not counted)."""
    consumed_group_ids: list[str] = field(default_factory=list)
    """Ids of the most recently consumed groups, oldest first: those within the last learner.dedup_window_bytes of
    the stream (ssp.learner.dedup says why that is all a resume needs to skip repeats)."""
    consumed_group_bytes: list[int] = field(default_factory=list)
    """The frame size of each of consumed_group_ids (the window is measured in stream bytes)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, write: Any) -> None:
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save(root: Path, state: StreamState, model: torch.nn.Module, optimizer: MasterWeightAdamW,
         lr_schedule: Any, *, tp_rank: int, dp_rank: int, keep: int) -> None:
    """Collective: every rank calls it and writes its files (see the module docstring); rank 0 publishes."""
    root = Path(root)
    name = f"step-{state.step:06d}"
    tmp = root / f"{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if dp_rank == 0:
        shard = {
            "model": {n: p.detach().clone() for n, p in canonical_params(model)},
            "optimizer": optimizer.state_dict(),
            "scheduler": lr_schedule.state_dict(),
        }
        _write_durable(tmp / f"tp{tp_rank}.pt", lambda f: torch.save(shard, f))
    else:
        partition = {"optimizer": optimizer.state_dict()}
        _write_durable(tmp / f"tp{tp_rank}-dp{dp_rank}.pt", lambda f: torch.save(partition, f))
    dist.barrier()
    if rank == 0:
        _write_durable(tmp / "state.json", lambda f: f.write(json.dumps(asdict(state)).encode()))
        _fsync_dir(tmp)
        final = _free_name(root, name)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / "latest.tmp"
        _write_durable(pointer, lambda f: f.write(final.name.encode()))
        os.rename(pointer, root / "latest")
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()


def _free_name(root: Path, name: str) -> Path:
    """`root / name`, or `name-1`, `name-2` ... when a checkpoint of that step is already there.

    Why: saving the same step twice (a resumed run that saves before training again) must not delete the one
    `latest` may name before its replacement is in place; a crash in between would leave no checkpoint at all. The
    old one goes only when `_prune` runs, after `latest` names the new one. Names still sort by step, then by save."""
    final, again = root / name, 0
    while final.exists():
        again += 1
        final = root / f"{name}-{again}"
    return final


def _save_order(path: Path) -> tuple[int, ...]:
    """(step, repeat) of a checkpoint folder: step-000007-10 is saved after step-000007-9."""
    return tuple(int(part) for part in path.name.split("-")[1:] if part.isdigit())


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (never the one `latest` names) and leftover *.tmp."""
    named = (root / "latest").read_text().strip()
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), key=_save_order)
    for old in done[:-keep]:
        if old.name != named:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory, or None for a fresh run."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing; "
                                f"delete {pointer} to start fresh or restore the directory")
    return path


@torch.no_grad()
def load(path: Path, model: torch.nn.Module, optimizer: MasterWeightAdamW, lr_schedule: Any, *,
         tp_rank: int, dp_rank: int) -> StreamState:
    """Restore this rank's model shard and LR schedule (saved by DP rank 0 of the same TP rank), its optimizer
    partition and the stream position. Files are memory-mapped: a DP rank > 0 reads no one else's partition."""
    file = Path(path) / f"tp{tp_rank}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the checkpoint was written with a smaller tensor_parallel; "
                                "resume with the tensor_parallel it was saved with")
    shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    optimizer.check_data_parallel(shard["optimizer"], source=str(file))
    opt_file = file
    if dp_rank > 0:
        opt_file = Path(path) / f"tp{tp_rank}-dp{dp_rank}.pt"
        if not opt_file.is_file():
            raise FileNotFoundError(f"{opt_file} is missing: this checkpoint is incomplete (its optimizer partition "
                                    "for this DP rank was deleted); restore it or start fresh in a new out_dir")
        shard["optimizer"] = torch.load(opt_file, map_location="cpu", weights_only=True, mmap=True)["optimizer"]
    params = dict(canonical_params(model))
    if set(params) != set(shard["model"]):
        raise KeyError(f"{file}: parameter names differ from the model's (a different architecture?)")
    for name, p in params.items():
        if p.shape != shard["model"][name].shape:
            raise ValueError(f"{file}: {name} has shape {tuple(shard['model'][name].shape)}, the model "
                             f"{tuple(p.shape)}; resume with the tensor_parallel it was saved with")
        p.copy_(shard["model"][name])
    optimizer.load_state_dict(shard["optimizer"], source=str(opt_file))
    lr_schedule.load_state_dict(shard["scheduler"])
    return StreamState(**json.loads((Path(path) / "state.json").read_text()))
