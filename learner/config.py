"""Config section [learner] (with [learner.loss]): the Megatron learner, its optimizer, losses and weight push."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    """The PPO-style policy loss shared by both roles (clipped surrogate with dual clip, as SSP's reference script)."""

    clip_low: float = 0.2
    """Ratio clip below: the surrogate uses clamp(ratio, 1 - clip_low, 1 + clip_high)."""
    clip_high: float = 0.28
    """Ratio clip above (asymmetric "clip-higher"; the reference script ran 0.285)."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c > 1 for negative advantages: the loss is at most -c * A. Unset disables it."""
    log_ratio_clamp: float = 20.0
    """Per-token clamp of log(pi / pi_rollout) before exp, so one wild token cannot overflow the ratio."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the frozen initial model (the reference used 0.01). 0 skips the reference model
    entirely (no extra forward, no extra memory), which is the CPU default."""
    kl_clamp: float = 10.0
    """Each token's k3 KL is clamped to [-kl_clamp, kl_clamp] (as verl's low_var_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (the reference used 0: entropy is only logged)."""
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    """How token losses become the batch loss: "token_mean" averages over every loss token of the batch;
    "seq_mean" averages within each sequence, then over sequences (what the reference effectively ran)."""

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError(f"clip_low = {self.clip_low}, clip_high = {self.clip_high}: need 0 <= clip_low < 1 "
                             "and clip_high >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip = {self.dual_clip}: must be > 1 (or unset to disable)")
        if self.log_ratio_clamp <= 0 or self.kl_clamp <= 0:
            raise ValueError(f"log_ratio_clamp = {self.log_ratio_clamp}, kl_clamp = {self.kl_clamp}: must be > 0")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef = {self.kl_coef}: must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class LearnerConfig:
    """The Megatron learner: model, parallelism, batching, optimizer, checkpoints and weight push."""

    model_dir: Path | None = None
    """HF checkpoint (safetensors) to start from; unset means the prepared SmolLM2, artifacts/models/..."""
    out_dir: Path = Path("artifacts/runs/learner")
    """Run folder: checkpoints/, metrics.jsonl, the resolved config and push timings."""
    tensor_parallel: int = 1
    """Tensor-parallel size. torchrun is launched with tensor_parallel * data_parallel ranks."""
    data_parallel: int = 1
    """Data-parallel size (replicas; each trains on its share of every batch, gradients are summed)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size; only 1 is implemented (an error names the fix otherwise)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA + NCCL + transformer-engine layers when a GPU is visible, else CPU + gloo + local layers."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter dtype; auto is bfloat16 on GPU, float32 on CPU (where logprobs must match the server's)."""
    vocab_divisor: int = 128
    """The vocab is padded to a multiple of tensor_parallel * vocab_divisor (padded logits are masked)."""
    seed: int = 1234
    """Seed of the torch and megatron RNGs (dropout is 0, so this only matters for random-init models)."""
    groups_per_step: int = 8
    """Trajectory groups (engine episodes, one stream frame each) consumed by one optimizer step."""
    micro_batch_tokens: int = 4096
    """Token budget per micro-batch on each rank: sequences are packed while rows x longest row fits."""
    train_roles: tuple[str, ...] = ("proposer", "solver")
    """Roles whose trajectories are trained; others (e.g. "verifier") are skipped and counted."""
    solver_std_normalize: bool = True
    """GRPO for the solver divides by the group's (unbiased) reward std; false keeps only the mean baseline."""
    advantage_eps: float = 1e-6
    """Added to the group std in GRPO."""
    proposer_baseline: Literal["batch_mean", "none"] = "batch_mean"
    """REINFORCE baseline for the proposer: the batch mean of proposer rewards, or none (the reference code)."""
    max_staleness: int | None = None
    """Drop (and count as dropped_stale_groups) every group with a trained token sampled more than this many policy
    versions before the version being trained. `ssp train` sets it to scheduler.eta when unset: the engine's gate
    already keeps every group within eta (engine/scheduler.py), so a drop there means a foreign or misconfigured
    engine. Unset: no check (offline training on a frames file written earlier). Tokens whose version the server
    did not report cannot be checked; they are counted as unknown_version_tokens."""
    drop_zero_variance_groups: bool = True
    """Drop solver groups whose rewards are all equal (their advantage is 0); counted in the metrics."""
    role_loss_weights: dict[str, float] = field(default_factory=lambda: {"proposer": 1.0, "solver": 1.0})
    """Per-role multiplier of the token losses (explicit, unlike the reference's accidental 0.4)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The policy loss (clipping, KL, entropy, aggregation)."""
    lr: float = 1e-6
    """Peak AdamW learning rate. 0 runs the whole loop with weights that never move (weight decay scales with it):
    the control arm of a learning experiment (`ssp bench learning`)."""
    warmup_steps: int = 5
    """Linear warm-up from lr / warmup_steps to lr over this many optimizer steps, then constant."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (norm weights and biases are not decayed)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over all TP shards) to this value; 0 disables clipping."""
    max_steps: int = 0
    """Stop after this many steps in total (counting resumed ones); 0 means until the stream ends. Every batch of
    groups_per_step groups is a step and a policy version, also one with nothing to train (its weights are the
    previous version's), so the engine's staleness gate, which counts groups per version, stays exact."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep (older ones are deleted after a new one is complete)."""
    dedup_window_bytes: int = 64 * 1024 * 1024
    """Repeats of trained groups are recognised within this many bytes of the most recently consumed stream; the
    checkpoint keeps only those groups' ids. Must be at least the engine's resend window (64 MiB: the frames it
    sends again after a broken connection); see learner/dedup.py."""
    push_bytes_per_bucket: int = 512 * 1024 * 1024
    """Weight push: tensors per update_weights_from_distributed call are grouped up to this many bytes."""
    push_timeout_s: float = 600.0
    """Weight push: timeout of each HTTP call and of the weight-update process group."""
    push_kv_refresh_every: int = 4
    """Weight push: every this many pushes the servers retract their requests and flush the prefix cache, so every
    context is prefilled again on the new weights; the other pushes pause in place (requests keep their KV and decode
    on with the new weights, the cache stays). So no KV in use is more than this many versions old. 1 = fresh KV
    after every push, which costs the servers a re-prefill of everything in flight each time (learner/push.py)."""
    push_master_address: str = "127.0.0.1"
    """Weight push: the address of learner rank 0 as the inference servers reach it (they join its weight-update
    group there). Local runs use loopback; on a cluster it is the first training node (`ssp launch` sets it)."""
    push_master_port: int = 0
    """Weight push: the port of that group's rendezvous on rank 0; 0 picks a free one (fine on one machine). A fixed
    port serves every group the learner forms, re-formed ones too (they share one rendezvous store in the learner,
    also while a group abandoned after a server died still holds it), so it needs only to be free of other
    processes."""
    push_api_key_file: Path | None = None
    """Weight push: file holding the servers' admin key (every push call is an admin route); ssp train and ssp
    launch point it at the run key. Unset: no Authorization header, which a keyed server refuses."""
    logprob_temperature: float = 1.0
    """Logits are divided by this before log-softmax, to match the rollout's sampling temperature."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "data_parallel", "pipeline_parallel", "vocab_divisor", "groups_per_step",
                     "micro_batch_tokens", "keep_checkpoints", "dedup_window_bytes", "push_kv_refresh_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.lr < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(f"lr = {self.lr}, warmup_steps = {self.warmup_steps}, grad_clip = {self.grad_clip}: "
                             "need lr >= 0, warmup_steps >= 0, grad_clip >= 0")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness = {self.max_staleness}: must be >= 0 (or unset for no check)")
        if self.logprob_temperature <= 0:
            raise ValueError(f"logprob_temperature = {self.logprob_temperature}: must be > 0")
        bad_roles = sorted(set(self.train_roles) - {"proposer", "solver"})
        if bad_roles or not self.train_roles:
            raise ValueError(f"train_roles = {list(self.train_roles)}: must be a non-empty subset of "
                             "proposer, solver (those are the roles with an advantage estimator)")
        unknown = sorted(set(self.role_loss_weights) - {"proposer", "solver", "verifier"})
        if unknown:
            raise ValueError(f"role_loss_weights has unknown roles {unknown}; roles are proposer, solver, verifier")
        if self.pipeline_parallel != 1:
            raise ValueError(f"pipeline_parallel = {self.pipeline_parallel}: this learner runs PP = 1 only (TP x DP); "
                             "set pipeline_parallel = 1 and raise tensor_parallel (or add data-parallel replicas)")
        if not 0 <= self.push_master_port < 65536:
            raise ValueError(f"push_master_port = {self.push_master_port}: must be a TCP port, or 0 for a free one")
        if self.push_bytes_per_bucket < 1:
            raise ValueError(f"push_bytes_per_bucket = {self.push_bytes_per_bucket}: must be >= 1")
