"""The learner's training loop, one process per rank under torchrun (TP x DP; gloo on CPU, NCCL on GPU).

    ssp learner train --trajectories FILE|tcp://HOST:PORT [--server URL ...]   (launches torchrun itself)

Each step: rank 0 reads `groups_per_step` frames from the trajectory stream and broadcasts them -> every rank plans
the batch (advantages per role, drops) and takes its data-parallel share -> micro-batches by token budget ->
forward (logprobs recomputed with the current weights), PPO loss, backward -> gradients summed over DP, clipped
over all TP shards -> one AdamW step (on fp32 master weights when the parameters are bf16, sharded over the DP
ranks, see ssp.learner.optimizer) -> checkpoint -> weights pushed to the servers -> one metrics line.

The step counter is the policy version: weights after step k are version k, pushed as weight_version "k". Every
batch is a step, also one with nothing to train (all groups dropped): its version carries the previous weights and
only the servers' label moves, so the engine's staleness gate (groups_per_step groups per version) stays exact.
Entry points: `run(cfg, source, server_urls)` (per rank, what torchrun runs via `python -m ssp.learner.trainer`)
and `Trainer.train_step(groups)` (one optimizer step on already-decoded trajectory groups).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ssp.engine.config import StreamConfig
from ssp.engine.trajectory import SchemaError, Trajectory, unpack_group
from ssp.engine.wire import HEADER
from ssp.learner import checkpoint
from ssp.learner.batching import collate, pack, plan_batch, shard
from ssp.learner.config import LearnerConfig
from ssp.learner.convert import canonical_params, is_tp_sharded
from ssp.learner.dedup import RecentGroups
from ssp.learner.loss import aggregation_weights, policy_loss
from ssp.learner.model import ModelShape, Parallel, build_model, init_parallel, logits_only_at
from ssp.learner.optimizer import build_optimizer, clip_grad_norm
from ssp.learner.trajectory_source import FrameSource, StreamError, open_source

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    """What one step did, for the metrics line."""

    trained: bool
    metrics: dict[str, float]


class StepSums:
    """Per-rank sums over a step's micro-batches, by name, reduced over the DP ranks in one all_reduce.

    The loss parts are already batch-normalised (see learner.loss.aggregation_weights), so their sums over
    micro-batches and ranks are the step's values. One tensor on the training device because NCCL reduces only GPU
    tensors, and one collective instead of one per metric; the names keep the packing and the unpacking in step.
    """

    NAMES = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "dual_clip_frac", "mismatch_sum", "mismatch_count",
             "tokens")
    """mismatch_sum / mismatch_count: |learner - rollout| logprob summed over trained tokens, and their number."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def add(self, **parts: torch.Tensor | float) -> None:
        """Add one micro-batch's value of every name (all of them, no other)."""
        if set(parts) != set(self.NAMES):
            raise ValueError(f"StepSums.add got {sorted(parts)}; it needs exactly {sorted(self.NAMES)}")
        self.values += torch.stack([torch.as_tensor(parts[name], dtype=torch.float64, device=self.values.device)
                                    for name in self.NAMES])

    def reduced(self, group: Any) -> dict[str, float]:
        """The sums over every DP rank of `group`, by name."""
        dist.all_reduce(self.values, group=group)
        return dict(zip(self.NAMES, self.values.tolist(), strict=True))


class Trainer:
    """Model, optional frozen reference, optimizer; `train_step` is one optimizer step on one batch."""

    def __init__(self, cfg: LearnerConfig, par: Parallel, shape: ModelShape, model: torch.nn.Module,
                 ref_model: torch.nn.Module | None) -> None:
        from megatron.core import parallel_state

        self.cfg = cfg
        self.par = par
        self.shape = shape
        self.model = model
        self.ref_model = ref_model
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        # ZeRO-1: fp32 masters and moments sharded over the DP ranks (ssp.learner.optimizer); none at DP = 1.
        self.optimizer, self.lr_schedule = build_optimizer(
            canonical_params(model), cfg, dp_group=self.dp_group if par.dp > 1 else None)
        self._grad_names = [n for n, p in canonical_params(model) if p.requires_grad]

    def _logits(self, model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                at: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits (1, K, V/tp) at the K positions `at` = (rows, columns) of the micro-batch (ssp.learner.model)."""
        from ssp.learner.logprobs import mask_padded_vocab

        with logits_only_at(model, *at):
            # No mask: the core attention masks causally by itself (megatron's on GPU, the SDPA stand-in of
            # ssp.learner.megatron_cpu on CPU), and rows are right-padded, so no real token ever sees padding.
            logits = model(input_ids, position_ids, None)
        if self.cfg.logprob_temperature != 1.0:
            logits = logits / self.cfg.logprob_temperature
        return mask_padded_vocab(logits, self.shape.vocab_size)

    def train_step(self, groups: list[list[Trajectory]], policy_version: int) -> StepResult:
        from ssp.learner.logprobs import entropy, token_logprobs

        cfg, par = self.cfg, self.par
        plan = plan_batch(groups, cfg, policy_version=policy_version)
        known = [s.min_policy_version for s in plan.samples if s.min_policy_version is not None]
        counts = {"samples": float(plan.total_seqs), "loss_tokens": float(plan.total_loss_tokens),
                  "dropped_zero_variance_groups": float(plan.dropped_zero_variance_groups),
                  "dropped_empty": float(plan.dropped_empty), "dropped_stale_groups": float(plan.dropped_stale_groups),
                  **{f"samples_{role}": float(sum(s.role == role for s in plan.samples))
                     for role in ("proposer", "solver")},
                  "unknown_version_tokens": float(sum(s.unknown_version_tokens for s in plan.samples)),
                  **({"staleness_max": float(policy_version - min(known))} if known else {}),
                  **{f"skipped_{role}": float(n) for role, n in plan.skipped_roles.items()}}
        if not plan.samples:
            return StepResult(trained=False, metrics=counts)
        mine = shard(plan.samples, par.dp, par.dp_rank)
        micro_batches = pack(mine, cfg.micro_batch_tokens)
        self.model.train()
        self.optimizer.zero_grad()
        sums = StepSums(par.device)
        mismatch_max = torch.zeros(1, dtype=torch.float64, device=par.device)
        for samples in micro_batches:
            mb = collate(samples, cfg.role_loss_weights, par.device)
            weights_bl = aggregation_weights(mb.loss_mask, cfg.loss.aggregation, total_tokens=plan.total_loss_tokens,
                                             total_seqs=plan.total_seqs) * mb.role_weights
            # Everything below lives on the K trained positions only, as (1, K) tensors: a masked position adds
            # nothing to the loss, so its logits are never computed.
            at = mb.loss_mask.nonzero(as_tuple=True)

            def trained(t: torch.Tensor) -> torch.Tensor:
                return t[at].unsqueeze(0)

            logits = self._logits(self.model, mb.input_ids, mb.position_ids, at)  # (1, K, V/tp)
            if cfg.loss.entropy_coef:
                ent = entropy(logits)
            else:
                with torch.no_grad():
                    ent = entropy(logits.detach())
            targets, old_logprobs, weights = trained(mb.targets), trained(mb.old_logprobs), trained(weights_bl)
            logprobs = token_logprobs(logits, targets)  # (1, K)
            ref_logprobs = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logprobs = token_logprobs(self._logits(self.ref_model, mb.input_ids, mb.position_ids, at),
                                                  targets)
            parts = policy_loss(logprobs, old_logprobs, trained(mb.advantages), weights, cfg.loss,
                                ref_logprobs=ref_logprobs, entropy=ent)
            parts.loss.backward()
            with torch.no_grad():
                diff = (logprobs.detach() - old_logprobs).abs()
                mismatch_max = torch.maximum(mismatch_max, diff.max().double().reshape(1))
                sums.add(loss=parts.loss.detach(), pg_loss=parts.pg_loss, kl=parts.kl, entropy=parts.entropy,
                         clip_frac=parts.clip_frac, dual_clip_frac=parts.dual_clip_frac, mismatch_sum=diff.sum(),
                         mismatch_count=diff.numel(), tokens=mb.n_tokens)
        self.optimizer.collect_grads()
        grad_norm = self._reduce_and_clip_grads()
        self.optimizer.step()
        self.lr_schedule.step()
        total = sums.reduced(self.dp_group)
        dist.all_reduce(mismatch_max, op=dist.ReduceOp.MAX, group=self.dp_group)
        return StepResult(trained=True, metrics={
            **counts, **{name: total[name] for name in ("loss", "pg_loss", "kl", "entropy", "clip_frac",
                                                        "dual_clip_frac", "tokens")},
            "grad_norm": grad_norm, "lr": self.lr_schedule.get_last_lr()[0],
            "logprob_mismatch_mean": total["mismatch_sum"] / max(total["mismatch_count"], 1.0),
            "logprob_mismatch_max": mismatch_max.item(), "micro_batches": float(len(micro_batches)),
        })

    def _reduce_and_clip_grads(self) -> float:
        """Clip the DP-summed fp32 main gradients (collect_grads summed them) by their global L2 norm over all TP
        shards, replicated params counted once; the same norm on every DP rank, sharded or not."""
        return clip_grad_norm(self.optimizer, self._grad_names,
                              lambda name: is_tp_sharded(name) or self.par.tp_rank == 0, self.cfg.grad_clip,
                              dp_group=self.dp_group if self.par.dp > 1 else None, tp_group=self.tp_group)


def read_batch(source: FrameSource, n_groups: int, recent: RecentGroups,
               vocab_size: int) -> tuple[list[bytes], list[str], list[int]]:
    """Up to n_groups new frames, their group ids and frame sizes (groups already trained are skipped); fewer only
    at the end of the stream. A frame that is not a valid group for this model (ssp.engine.trajectory validation: token
    ids outside the vocabulary, non-finite rewards or logprobs, bad masks) raises StreamError naming the frame, so
    the learner stops before training any of this batch."""
    payloads: list[bytes] = []
    ids: list[str] = []
    sizes: list[int] = []
    while len(payloads) < n_groups:
        start = source.offset
        payload = source.next_frame()
        if payload is None:
            break
        try:
            group = unpack_group(payload, vocab_size)
        except SchemaError as e:
            raise StreamError(f"{source.name}: the frame at byte {start} ({len(payload)} bytes, frame "
                              f"{len(payloads) + 1} of this batch) is not a valid trajectory group: {e}. The learner "
                              "stops without training this batch; fix the engine that wrote it") from None
        gid = group[0].group_id if group else ""
        if gid in recent or gid in ids:
            log.warning("group %s was already trained; skipping the repeat", gid)
            continue
        payloads.append(payload)
        ids.append(gid)
        sizes.append(HEADER.size + len(payload))
    return payloads, ids, sizes


def run(cfg: LearnerConfig, source_spec: str, server_urls: list[str], stream: StreamConfig | None = None) -> int:
    """One rank's whole run: build, resume, loop over batches, checkpoint, push, log. Returns an exit code.
    `stream` is the run's [stream] section (frame limit; over TCP also run id, key and timeouts), defaults if None."""
    par = init_parallel(tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, device=cfg.device, dtype=cfg.dtype,
                        seed=cfg.seed)
    if par.dp != cfg.data_parallel:
        raise ValueError(f"launched {par.world_size} ranks = tp {par.tp} x dp {par.dp}, but learner.data_parallel "
                         f"= {cfg.data_parallel}; launch tensor_parallel * data_parallel ranks")
    from ssp.learner.convert import load_hf_into_model
    from ssp.paths import default_model_dir

    model_dir = cfg.model_dir or default_model_dir()
    shape = ModelShape.from_dir(model_dir)
    model = build_model(shape, par, vocab_divisor=cfg.vocab_divisor)
    load_hf_into_model(model, model_dir, shape, tp=par.tp, tp_rank=par.tp_rank, vocab_divisor=cfg.vocab_divisor)
    ref_model = None
    if cfg.loss.kl_coef > 0:
        ref_model = build_model(shape, par, vocab_divisor=cfg.vocab_divisor)
        load_hf_into_model(ref_model, model_dir, shape, tp=par.tp, tp_rank=par.tp_rank,
                           vocab_divisor=cfg.vocab_divisor)
        ref_model.eval().requires_grad_(False)
    trainer = Trainer(cfg, par, shape, model, ref_model)
    ckpt_root = cfg.out_dir / "checkpoints"
    state = checkpoint.StreamState()
    resume_from = checkpoint.latest(ckpt_root)
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, trainer.optimizer, trainer.lr_schedule, tp_rank=par.tp_rank,
                                dp_rank=par.dp_rank)
        log.info("resumed from %s: step %d, stream offset %d", resume_from, state.step, state.offset)
    is_root = par.rank == 0
    source = open_source(source_spec, state.offset, stream) if is_root else None
    pusher = _connect_pusher(cfg, server_urls, par) if server_urls else None
    metrics = _open_metrics(cfg) if is_root else None
    recent = RecentGroups(cfg.dedup_window_bytes, state.consumed_group_ids, state.consumed_group_bytes)
    try:
        if server_urls:  # the servers start from the learner's weights (also after a resume)
            initial = _push(trainer, pusher, par, str(state.step))
            if metrics is not None:
                metrics.write({"step": state.step, "initial_push": True, **initial})
        saved_step = state.step if resume_from is not None else -1  # the step the newest checkpoint holds
        while not cfg.max_steps or state.step < cfg.max_steps:
            payloads, ids, sizes = (read_batch(source, cfg.groups_per_step, recent, shape.vocab_size)
                                    if source is not None else ([], [], []))
            box: list[Any] = [(payloads, ids, sizes, source.offset if source is not None else 0)]
            dist.broadcast_object_list(box, src=0)
            payloads, ids, sizes, offset = box[0]
            if not payloads:
                break
            started = time.perf_counter()
            result = trainer.train_step([unpack_group(p) for p in payloads], policy_version=state.step)
            state.offset = offset
            for gid, size in zip(ids, sizes):
                recent.add(gid, size)
            state.groups_consumed += len(ids)
            state.consumed_group_ids, state.consumed_group_bytes = recent.ids(), recent.sizes()
            # Every batch is a version, trained or not: the engine's gate counts groups_per_step groups per version.
            state.step += 1
            record: dict[str, Any] = {"step": state.step, "groups": len(ids), "trained": result.trained,
                                      "step_s": time.perf_counter() - started, **result.metrics}
            record["tokens_per_s"] = record.get("tokens", 0.0) / record["step_s"]
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                checkpoint.save(ckpt_root, state, model, trainer.optimizer, trainer.lr_schedule,
                                tp_rank=par.tp_rank, dp_rank=par.dp_rank, keep=cfg.keep_checkpoints)
                saved_step = state.step
            if server_urls and result.trained:
                record.update(_push(trainer, pusher, par, str(state.step)))
            elif pusher is not None:  # same weights, new version: only the label moves
                pusher.relabel(str(state.step))
            if metrics is not None:
                metrics.write(record)
                log.info("step %d: loss %.4g, mismatch %.2e, grad norm %.3g, %.0f tok/s", state.step,
                         record.get("loss", float("nan")), record.get("logprob_mismatch_mean", float("nan")),
                         record.get("grad_norm", float("nan")), record["tokens_per_s"])
        if state.step != saved_step:
            checkpoint.save(ckpt_root, state, model, trainer.optimizer, trainer.lr_schedule, tp_rank=par.tp_rank,
                            dp_rank=par.dp_rank, keep=cfg.keep_checkpoints)
    finally:
        if pusher is not None:
            pusher.close()
        if source is not None:
            source.close()
        if metrics is not None:
            metrics.close()
    return 0


def _connect_pusher(cfg: LearnerConfig, server_urls: list[str], par: Parallel) -> Any:
    """Rank 0 owns the update group (over the servers that answer: ssp.learner.push_recovery); the other ranks only help
    gather."""
    if par.rank != 0:
        return None
    from ssp.learner.push import WeightPusher
    from ssp.learner.push_recovery import RecoveringPusher
    from ssp.run_key import load_api_key

    api_key = load_api_key(cfg.push_api_key_file, "learner.push_api_key_file")

    def make_pusher(urls: list[str]) -> WeightPusher:
        return WeightPusher(urls, backend="nccl" if par.device.type == "cuda" else "gloo",
                            master_address=cfg.push_master_address, master_port=cfg.push_master_port,
                            bytes_per_bucket=cfg.push_bytes_per_bucket, timeout_s=cfg.push_timeout_s,
                            kv_refresh_every=cfg.push_kv_refresh_every, api_key=api_key)

    pusher = RecoveringPusher(server_urls, make_pusher=make_pusher, api_key=api_key, wait_s=cfg.push_timeout_s)
    pusher.connect()
    return pusher


PUSH_ATTEMPTS = 3
"""Tries of one weight push: a server that dies mid-push interrupts it, and the next try goes to the servers left."""


def _push(trainer: Trainer, pusher: Any, par: Parallel, version: str) -> dict[str, float]:
    """Gather TP shards (replica 0's TP ranks together) and, on rank 0, stream them to the servers; push again
    (all ranks gathering again) when rank 0's push was interrupted."""
    from ssp.learner.gather import iter_hf_weights
    from ssp.learner.push import PushError
    from ssp.learner.push_recovery import PushInterrupted

    interrupted = ""
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        out: dict[str, float] = {}
        interrupted = ""
        if par.dp_rank == 0:
            named = iter_hf_weights(trainer.model, trainer.shape, tp_group=trainer.tp_group,
                                    keep=pusher is not None)
            if pusher is not None:
                try:
                    stats = pusher.push(named, version)
                    out = {"push_s": stats.seconds, "push_gb_per_s": stats.gb_per_s,
                           "push_bytes": float(stats.bytes), "push_kv_refresh": float(stats.pause_mode == "retract"),
                           "push_attempts": float(attempt)}
                except PushInterrupted as e:
                    interrupted = str(e)
            for _ in named:  # participate in every all-gather (the rest of them, after an interrupted push)
                pass
        verdict = [interrupted]
        dist.broadcast_object_list(verdict, src=0)  # every rank learns whether rank 0 pushes again
        interrupted = verdict[0]
        if not interrupted:
            dist.barrier()
            return out
        log.warning("weight push v%s interrupted (try %d of %d): %s", version, attempt, PUSH_ATTEMPTS, interrupted)
    raise PushError(f"weight push v{version} failed {PUSH_ATTEMPTS} times; the last: {interrupted}")


def _open_metrics(cfg: LearnerConfig) -> Any:
    from ssp.metrics import MetricsLog

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    return MetricsLog(cfg.out_dir / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point under torchrun: `python -m ssp.learner.trainer --config-json FILE [--stream-json FILE]
    --trajectories SRC`."""
    parser = argparse.ArgumentParser(description="one learner rank (launched by `ssp learner train`)")
    parser.add_argument("--config-json", type=Path, required=True, help="resolved [learner] section as JSON")
    parser.add_argument("--stream-json", type=Path, help="resolved [stream] section as JSON: the frame limit, and "
                        "for tcp:// the run id, the run key's file and the timeouts (default: [stream] defaults, "
                        "the key from $SSP_RUN_KEY)")
    parser.add_argument("--trajectories", required=True, help="trajectory file or tcp://HOST:PORT")
    parser.add_argument("--server", action="append", default=[], help="inference server URL (repeatable)")
    args = parser.parse_args(argv)
    # megatron-core announces at import that it falls back from apex / transformer-engine: expected on CPU.
    warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '0')} "
                        "%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from ssp.config import build

    cfg = build(LearnerConfig, json.loads(args.config_json.read_text()), source=str(args.config_json))
    stream = (build(StreamConfig, json.loads(args.stream_json.read_text()), source=str(args.stream_json))
              if args.stream_json is not None else None)
    # Same thread count on every run of a config: CPU reductions, hence resumed weights, depend on it.
    default_threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", default_threads)))
    try:
        return run(cfg, args.trajectories, args.server, stream)
    finally:
        from ssp.learner.model import destroy_parallel

        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
