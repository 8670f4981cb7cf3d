"""Simulator profiles: the GPU server model and rollout shapes that `ssp model serve --sim` follows.

A profile is a TOML file (serving/sim_profiles/*.toml: SGLang defaults, published measurements, estimates),
read through the same typed loader as run configs, so a typo or wrong type is an error naming the key and file.
Times in the file are in the units their key names say (ms or s); `SimProfile` keeps them as written.

Formulas it feeds:
    decode step     t_ms = a_ms + b_ms_per_request*B + c_ms_per_kv_token*K (+ eager_penalty_ms if B > cuda_graph_max_bs)
    prefill         t_s  = sum over new tokens of (1 + ctx/attn_ctx_half_tokens) / tokens_per_s, <= chunk per step
    weight update   t_s  = tp_gather_s + bytes/bandwidth + buckets*per_bucket_overhead_ms (+ pause_ms, resume_ms)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ssp.config import load_config

PROFILES_DIR = Path(__file__).resolve().parent / "sim_profiles"
DEFAULT_PROFILE = PROFILES_DIR / "qwen2.5-7b-h100-tp1.toml"


@dataclass(frozen=True, kw_only=True, slots=True)
class ProfileInfo:
    name: str = "unnamed"
    """Profile name, reported by the sim's /server_info."""
    gpus_per_server: int = 1
    """GPUs behind one simulated server (its tensor-parallel size, reported as tp_size)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    weight_bytes: float = 15.23e9
    """Weight bytes of the whole model (bf16)."""
    kv_bytes_per_token_per_gpu: int = 57344
    """KV-cache bytes one token occupies on one GPU."""
    flops_per_token: float = 14.1e9
    """Matmul FLOPs per token (2 x non-embedding parameters), for the learner-time estimate."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefillSpec:
    tokens_per_s: float = 45000.0
    """Prefill throughput of one server on short contexts."""
    attn_ctx_half_tokens: float = 35000.0
    """Context at which attention doubles the per-token prefill cost: cost x (1 + ctx/attn_ctx_half_tokens)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefixCacheSpec:
    enabled: bool = True
    """Reuse cached prompt prefixes (radix cache): cached tokens cost no prefill."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LearnerSpec:
    gpus: int = 8
    """Learner GPUs (not used by the server; benches read it to model the training step)."""
    peak_flops_per_gpu: float = 989e12
    """Dense bf16 peak FLOP/s of one learner GPU."""
    mfu: float = 0.35
    """Model FLOPs utilisation of the learner."""
    passes: int = 5
    """Forward-equivalent passes per token: fwd+bwd (3), log-prob recompute (1), frozen reference (1)."""
    attn_overhead: float = 1.03
    """Multiplier for causal attention FLOPs at typical lengths."""
    fixed_s: float = 1.9
    """Per-step fixed time on the learner: optimizer step, gradient all-reduce latency, bookkeeping. Not the weight
    push: benches add that once from [weight_update]."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerSpec:
    kv_capacity_tokens: int = 1_020_000
    """Tokens of KV memory; running requests beyond it are retracted and recomputed later."""
    max_running_requests: int = 4096
    """Most requests decoded together; more wait in the server's queue."""
    cuda_graph_max_bs: int = 160
    """Largest batch run with CUDA graphs; above it each decode step pays eager_penalty_ms."""
    chunked_prefill_tokens: int = 8192
    """Most new prompt tokens prefilled in one step (chunked prefill shares the step with decode)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodeSpec:
    a_ms: float = 6.2
    """Fixed cost of a step: reading the weights once plus per-layer overhead."""
    b_ms_per_request: float = 0.047
    """Cost per running request (matmul work grows with the batch)."""
    c_ms_per_kv_token: float = 2.2e-5
    """Cost per KV token read by decode attention, summed over the running requests' contexts."""
    eager_penalty_ms: float = 1.0
    """Extra cost of a step whose batch exceeds cuda_graph_max_bs."""


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightUpdateSpec:
    bytes: float = 15.23e9
    """Bytes pushed per full update (the bf16 weights)."""
    bandwidth_bytes_per_s: float = 20e9
    """Broadcast bandwidth from the learner to the server."""
    bucket_bytes: int = 536_870_912
    """Bucket size of the push; each bucket is one update call."""
    per_bucket_overhead_ms: float = 10.0
    """Fixed cost per bucket (HTTP call, load_weights)."""
    tp_gather_s: float = 0.0
    """Learner-side gather of tensor-parallel shards before the push."""
    pause_ms: float = 50.0
    """Latency of /pause_generation."""
    resume_ms: float = 50.0
    """Latency of /continue_generation."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MeanSd:
    mean: float
    """Mean."""
    sd: float
    """Standard deviation (normal distribution, clipped at 1)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LogNormal:
    median: float
    """Median of the lognormal (exp of mu)."""
    sigma: float
    """Sigma of the underlying normal; larger means a heavier tail."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoleShape:
    prompt_tokens: MeanSd
    """Prompt length (benches that synthesise prompts use it; the sim server sees the real prompt)."""
    search_weights: tuple[float, ...]
    """Probability of a rollout making 0, 1, 2, ... searches before its final turn."""
    turn_cap_no_answer_p: float
    """Probability that a rollout searches in every turn up to the turn cap and never answers."""
    gen_turn: LogNormal
    """Generated tokens in a turn that ends with a search."""
    gen_final: LogNormal
    """Generated tokens in the final (answer or question) turn."""
    runaway_p_per_turn: float
    """Probability that a turn never closes its tags and runs to max_new_tokens."""

    def __post_init__(self) -> None:
        if not self.search_weights or any(w < 0 for w in self.search_weights) or sum(self.search_weights) <= 0:
            raise ValueError(f"search_weights = {list(self.search_weights)}: need non-negative weights with a "
                             f"positive sum")
        for name, p in (("turn_cap_no_answer_p", self.turn_cap_no_answer_p),
                        ("runaway_p_per_turn", self.runaway_p_per_turn)):
            if not 0 <= p < 1:
                raise ValueError(f"{name} = {p}: must be a probability in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyShape:
    samples: int = 4
    """RAG-verification samples per proposal."""
    max_new_tokens: int = 70
    """Token budget of a verification answer (benches use it; the sim recognises verifiers by their prompt)."""
    gen: LogNormal = field(default_factory=lambda: LogNormal(median=15, sigma=0.5))
    """Generated tokens of a verification answer."""


def _default_solver() -> RoleShape:
    return RoleShape(prompt_tokens=MeanSd(mean=230, sd=25),
                     search_weights=(0.08, 0.27, 0.27, 0.17, 0.09, 0.05, 0.03, 0.02, 0.01, 0.01),
                     turn_cap_no_answer_p=0.02, gen_turn=LogNormal(median=90, sigma=0.6),
                     gen_final=LogNormal(median=45, sigma=0.5), runaway_p_per_turn=0.002)


def _default_proposer() -> RoleShape:
    return RoleShape(prompt_tokens=MeanSd(mean=1150, sd=60),
                     search_weights=(0.02, 0.08, 0.16, 0.20, 0.18, 0.13, 0.09, 0.06, 0.04, 0.04),
                     turn_cap_no_answer_p=0.06, gen_turn=LogNormal(median=130, sigma=0.6),
                     gen_final=LogNormal(median=110, sigma=0.5), runaway_p_per_turn=0.003)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShapesSpec:
    max_assistant_turns: int = 10
    """Assistant turns per rollout (SSP's limit); the last allowed turn searches again in no-answer rollouts."""
    max_response_tokens: int = 8192
    """Response budget per rollout (the engine enforces it through max_new_tokens)."""
    max_context_tokens: int = 12288
    """Prompt + response limit per rollout; also the sim server's context length."""
    tool_tokens_per_search: MeanSd = field(default_factory=lambda: MeanSd(mean=470, sd=35))
    """Tokens of one search result block (benches that synthesise tool results use it)."""
    solver: RoleShape = field(default_factory=_default_solver)
    """Solver rollouts: end with <answer>."""
    proposer: RoleShape = field(default_factory=_default_proposer)
    """Proposer rollouts: end with <question>."""
    rag_verify: VerifyShape = field(default_factory=VerifyShape)
    """RAG-verification answers: one turn, no search."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SimSpec:
    proposer_marker: str = "The answer I provided is:"
    """Text in a prompt that makes the sim play the proposer (a phrase of SSP's proposer user prompt)."""
    verifier_marker: str = "using only the documents"
    """Text in a prompt (matched case-insensitively) that makes the sim play a RAG verifier: one short answer turn,
    no search (engine/prompts.py's verifier prompt)."""
    answer_pattern: str = r"The answer I provided is:\s*(.+?)\.?\s*(?:\n|You need|$)"
    """Regex whose group 1 is the proposer's given answer; the sim remembers it with the question it writes."""
    question_pattern: str = r"Question:\s*(.+?)\s*(?:<\||\n|$)"
    """Regex whose group 1 is the question in a solver or verifier prompt (its last match is looked up in the sim's
    memory)."""
    correct_answer_p: float = 0.5
    """Probability that a solver or verifier answers a remembered question correctly."""
    seed: int = 0
    """Seed of the sim's random draws (lengths, turns, words)."""
    time_scale: float = 1.0
    """Simulated seconds per wall-clock second: 10 runs the modeled GPU ten times faster than real time (for
    benches); `ssp model serve --sim-time-scale` overrides it."""
    prefix_block_tokens: int = 64
    """Granularity of the simulated prefix cache: prompts share cached KV in whole blocks of this many tokens."""
    shared_memory_file: Path | None = None
    """A file several sim servers share: each appends the question -> answer pairs it writes and reads the others'
    when a question is not its own, so the solvers and verifiers of an episode are answered like on one server
    whichever server they land on (benches with many sim servers). Unset: each server remembers only its own."""

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError(f"time_scale = {self.time_scale}: must be > 0 (1 = real time)")
        if not 0 <= self.correct_answer_p <= 1:
            raise ValueError(f"correct_answer_p = {self.correct_answer_p}: must be a probability in [0, 1]")
        if self.prefix_block_tokens < 1:
            raise ValueError(f"prefix_block_tokens = {self.prefix_block_tokens}: must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class SimProfile:
    profile: ProfileInfo = field(default_factory=ProfileInfo)
    """Name and GPUs per server."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Model sizes."""
    prefill: PrefillSpec = field(default_factory=PrefillSpec)
    """Prefill rate."""
    prefix_cache: PrefixCacheSpec = field(default_factory=PrefixCacheSpec)
    """Prefix-cache behaviour."""
    learner: LearnerSpec = field(default_factory=LearnerSpec)
    """Learner-step model (for benches)."""
    server: ServerSpec = field(default_factory=ServerSpec)
    """Capacity limits of one server."""
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    """Decode step-time formula."""
    weight_update: WeightUpdateSpec = field(default_factory=WeightUpdateSpec)
    """Weight-update and pause costs."""
    shapes: ShapesSpec = field(default_factory=ShapesSpec)
    """Rollout shapes the sim's output follows."""
    sim: SimSpec = field(default_factory=SimSpec)
    """How the sim recognises roles and answers (optional table)."""


def load_profile(path: Path | None = None) -> SimProfile:
    """Read a profile TOML (default: the Qwen2.5-7B on one H100 profile) with typed checks."""
    return load_config(SimProfile, path if path is not None else DEFAULT_PROFILE)
