"""The root config: one table per component. Each component is handed its own section, never this root."""

from dataclasses import dataclass, field, fields

from ssp.engine.config import (
    EngineConfig,
    GameConfig,
    RolloutConfig,
    SchedulerConfig,
    SearchBatcherConfig,
    StreamConfig,
)
from ssp.engine.eval_config import EvalConfig
from ssp.engine.inference_config import InferenceConfig
from ssp.launcher.config import ClusterConfig
from ssp.launcher.train_config import TrainConfig
from ssp.learner.config import LearnerConfig
from ssp.retriever.config import RetrievalServerConfig, RetrieverConfig
from ssp.serving.config import ServingConfig
from ssp.trackers import MetricsConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class SSPConfig:
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """Search: which retriever, its index or URL, and top-k."""
    retrieval_server: RetrievalServerConfig = field(default_factory=RetrievalServerConfig)
    """`ssp retriever serve`: the Search-R1 /retrieve server, its index and request limits."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """Generation: the inference servers (or router) the engine calls, slots per server, timeouts, health checks."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Inference server (`ssp model serve`): model, device, batch capacity, keys."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Multi-turn rollouts: tokenizer, turn and token budgets, resumes after aborts."""
    search: SearchBatcherConfig = field(default_factory=SearchBatcherConfig)
    """Search batching: how concurrent <search> calls are coalesced into retriever batches."""
    game: GameConfig = field(default_factory=GameConfig)
    """The SSP game: group sizes, verification, per-role temperatures, checks, judge, rewards."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Episode scheduling: async or sync, episodes in flight, staleness bound eta, seeds."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """The trajectory stream to the learner: address, frame limit, buffer size, spill file."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`ssp eval`: the Search-R1 evaluation protocol (turns, tokens per turn, top-k, greedy), concurrency, subset."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The Megatron learner: model, TP x DP, batching, losses, optimizer, checkpoints, weight push."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """`ssp train`: the run folder and length, and which pieces it starts or attaches to (servers, learner)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """`ssp launch` / `just train-32b`: nodes, GPUs, model shape and how SGLang and Megatron are split across them."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Experiment trackers (TensorBoard, W&B) beside the JSONL metrics that every run writes."""

    def engine(self) -> EngineConfig:
        """The engine's sections of this config (what `open_engine`, `run_engine` and `evaluate` take)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})


def check_sampling_matches_learner(cfg: SSPConfig) -> None:
    """Refuse a training config whose rollouts are sampled from another distribution than the one the learner
    scores: the learner recomputes each trained token's logprob at learner.logprob_temperature over the full
    vocabulary, and the PPO ratio compares it with the rollout logprob. A role sampled at another temperature, or
    with nucleus truncation (top_p < 1; the engine never sets top_k), would bias every ratio without a word.
    Only the roles in learner.train_roles are bound (verification samples are never trained)."""
    from ssp.config import ConfigError

    learner_t = cfg.learner.logprob_temperature
    problems = [f"game.{role}_temperature = {t:g}" for role, t in
                (("proposer", cfg.game.proposer_temperature), ("solver", cfg.game.solver_temperature))
                if role in cfg.learner.train_roles and t != learner_t]
    if problems:
        raise ConfigError(f"{' and '.join(problems)}, but learner.logprob_temperature = {learner_t:g}: the learner "
                          "scores sampled tokens at its own temperature, so the importance ratios of those roles "
                          "would be biased; set the trained roles' temperatures and learner.logprob_temperature to "
                          "one value")
    if cfg.game.top_p != 1.0:
        raise ConfigError(f"game.top_p = {cfg.game.top_p:g}: the learner scores tokens over the full vocabulary and "
                          "cannot reproduce nucleus sampling's truncated distribution, so every importance ratio "
                          "would be biased; set game.top_p = 1.0 for training (greedy or nucleus evaluation is set "
                          "in [eval])")


def learner_staleness_bound(cfg: SSPConfig) -> int | None:
    """The learner.max_staleness a training run gives its learner: the configured one, else scheduler.eta, the bound
    the engine's gate already keeps (so the learner's check is a backstop that drops nothing)."""
    return cfg.scheduler.eta if cfg.learner.max_staleness is None else cfg.learner.max_staleness
