"""Config sections of the rollout engine: [rollout], [search], [game] (+ [game.checks], [game.judge]), [scheduler],
[stream]. Each component receives only its own section; `engine/inference_config.py` holds [inference].
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ssp.engine.eval_config import EvalConfig
from ssp.engine.inference_config import InferenceConfig
from ssp.engine.prompts import PROPOSER_PREFILLS, SEARCH_OPEN, SOLVER_PREFILLS, VERIFIER_PREFILLS
from ssp.paths import DATA_DIR
from ssp.retriever.config import RetrieverConfig

INVALID_STAGES = ("no_question", "failed_checks", "failed_verification")
"""Where an invalid proposal failed, earliest first (game.invalid_reward_by_stage)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutConfig:
    tokenizer_dir: Path | None = None
    """Hugging Face directory whose tokenizer and chat template render prompts and tool results; it must be the
    served model's. Unset means the prepared default model, artifacts/models/SmolLM2-135M-Instruct."""
    max_turns: int = 10
    """Assistant turns per rollout (a turn ends at a tag closer, EOS or the budget). SSP uses 10, so at most 9
    searches run; a search asked for in the last turn is not executed and the rollout ends ("turn_limit")."""
    max_response_tokens: int = 8192
    """Response budget per rollout: generated plus tool tokens. Reaching it ends the rollout ("response_budget")."""
    max_context_tokens: int = 12288
    """Prompt plus response must fit the model context; reaching it ends the rollout ("context_budget")."""
    max_new_tokens_per_turn: int = 8192
    """Cap on tokens generated in one turn (each turn asks for min(this, what the two budgets leave))."""
    max_resumes: int = 8
    """How often one turn may be re-sent after the server aborted it (weight-update pause in abort mode) before
    the rollout fails; each resume sends the prompt plus the partial output and keeps the recorded versions."""

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_response_tokens", "max_context_tokens", "max_new_tokens_per_turn"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.max_resumes < 0:
            raise ValueError(f"max_resumes = {self.max_resumes}: must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchBatcherConfig:
    max_batch: int = 64
    """Most queries coalesced into one Retriever.search call; a full batch is sent at once."""
    window_ms: float = 5.0
    """How long the first query of a batch waits for others before the batch is sent (latency vs batch size)."""
    timeout_s: float = 30.0
    """A batch not answered within this fails its searches (SearchError), so no rollout waits forever."""
    max_concurrent_batches: int = 4
    """Batches in flight at once; further batches wait, so a slow retriever is not flooded."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch = {self.max_batch}: must be >= 1")
        if self.window_ms < 0:
            raise ValueError(f"window_ms = {self.window_ms}: must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s = {self.timeout_s}: must be > 0 seconds")
        if self.max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches = {self.max_concurrent_batches}: must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChecksConfig:
    min_chars: int = 10
    """A question shorter than this many characters is invalid ("too_short")."""
    max_chars: int = 1000
    """A question longer than this many characters is invalid ("too_long")."""
    min_words: int = 10
    """A question with fewer whitespace-separated words is invalid ("too_few_words")."""
    min_searches: int = 2
    """The proposer must have made at least this many distinct searches that returned documents
    ("too_few_searches"). Distinct = different after lower-casing and collapsing whitespace."""
    leak_in_search_queries: bool = True
    """Also count an answer alias inside a proposer search query as leakage ("answer_in_search")."""

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ValueError(f"min_chars = {self.min_chars}, max_chars = {self.max_chars}: need 0 <= min <= max")
        if self.min_words < 0 or self.min_searches < 0:
            raise ValueError(f"min_words = {self.min_words}, min_searches = {self.min_searches}: must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class JudgeConfig:
    f1_threshold: float | None = None
    """When set, a prediction whose token F1 against some alias reaches this counts as correct after EM fails.
    Unset means EM (and the LLM judge, if configured) only."""
    llm_url: str | None = None
    """Base URL of an OpenAI-compatible server (POST {llm_url}/v1/chat/completions) asked when EM and F1 fail.
    Unset means no LLM judge."""
    llm_model: str = "judge"
    """The `model` field sent to the LLM judge."""
    llm_api_key_env: str | None = None
    """Name of the environment variable holding the judge's API key (sent as a Bearer token); unset sends none."""
    llm_timeout_s: float = 30.0
    """Per-request timeout of the LLM judge; a timeout counts as an error and the answer as wrong (fail closed)."""
    llm_max_retries: int = 2
    """Retries after a connection error, timeout or 5xx before the verdict fails closed."""
    plugin: str | None = None
    """Your own judge, asked when EM and F1 fail (in place of the LLM judge): an entry point of group "ssp.judges"
    or "package.module:ClassName", built with `plugin_options`; engine/judge.py gives the contract. Unset means
    none."""
    plugin_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the plugin judge's constructor."""

    def __post_init__(self) -> None:
        if self.plugin is not None and self.llm_url is not None:
            raise ValueError(f"judge.plugin = {self.plugin!r} and judge.llm_url = {self.llm_url!r}: both would be "
                             "asked when EM fails; set one of them")
        if self.plugin_options and self.plugin is None:
            raise ValueError(f"judge.plugin_options {sorted(self.plugin_options)} without judge.plugin; set the "
                             "plugin the options are for, or remove them")
        if self.f1_threshold is not None and not 0.0 < self.f1_threshold <= 1.0:
            raise ValueError(f"f1_threshold = {self.f1_threshold}: must be in (0, 1], or unset to disable")
        if self.llm_timeout_s <= 0 or self.llm_max_retries < 0:
            raise ValueError(f"llm_timeout_s = {self.llm_timeout_s}, llm_max_retries = {self.llm_max_retries}: "
                             "need a positive timeout and >= 0 retries")


@dataclass(frozen=True, kw_only=True, slots=True)
class GameConfig:
    solver_group_size: int = 5
    """Solver rollouts per valid question (the GRPO group). SSP uses 5."""
    verify_samples: int = 4
    """Policy samples answering the question from the documents (no search) in RAG verification, sent together
    on one shared prompt."""
    verify_threshold: float = 0.5
    """A question is valid when at least this fraction of the verification samples is judged correct."""
    verify_max_new_tokens: int = 70
    """Token budget of one verification answer."""
    distractors: int = 4
    """Document sets of other episodes mixed into the verification documents (fewer while too few exist)."""
    distractor_pool_size: int = 64
    """How many recent episodes' document sets are kept to draw distractors from."""
    invalid_reward: float = 0.0
    """Proposer reward of an invalid question (no <question>, a failed check, or failed verification)."""
    invalid_reward_by_stage: dict[str, float] = field(default_factory=dict)
    """Graded invalid rewards, by the stage where the proposal failed: "no_question" (none written),
    "failed_checks" (a rule check failed), "failed_verification" (RAG verification failed); a stage not listed
    earns invalid_reward. A curriculum for a policy that fails at every stage, so that getting further pays; SSP's
    configs leave it empty (one invalid reward)."""
    proposer_temperature: float = 1.0
    """Sampling temperature of proposer turns (sent in every request; SSP's reference code never passed it on)."""
    solver_temperature: float = 1.0
    """Sampling temperature of solver turns."""
    verifier_temperature: float = 1.0
    """Sampling temperature of the verification samples."""
    top_p: float = 1.0
    """Nucleus sampling for every role (1.0 = off)."""
    proposer_scaffold: bool = False
    """Tiny-model curriculum, not SSP: every proposer turn opens with the tag it is to write, "<search>" for each of
    the searches the seed asks for (its hop count), then "<question>", so the model writes only the queries and the
    question (the openers are never trained). proposer_prefill must then be "" or "<search>". SSP's configs leave
    it off."""
    proposer_prefill: str = ""
    """Opening tag that starts the proposer's turn as part of its prompt (loss mask 0, never sampled): "" (SSP),
    "<think>", "<search>" or "<question>". A small model that never writes a tag on its own (SmolLM2-135M) writes
    a query after a prefilled "<search>"; a capable model that would have opened with it is unaffected."""
    solver_prefill: str = ""
    """Opening tag of the solver's turn, likewise: "", "<think>", "<search>" or "<answer>"."""
    verifier_prefill: str = ""
    """Opening tag of each verification answer, likewise: "", "<think>" or "<answer>"."""
    answer_tag_limit: int = 10
    """A solver response with more <answer> (or </answer>) tags than this is tag spam ..."""
    answer_tag_penalty_reward: float = 0.25
    """... and a correct answer then earns this instead of 1.0 (SSP's rule)."""
    solver_reward: str = "ssp"
    """The solver's GRPO reward: "ssp" (1 correct, 0 wrong, the tag-spam rule above), "token_f1" (partial credit:
    the answer's best token F1 against the aliases), or a plug-in: an entry point of group "ssp.solver_rewards" or
    "package.module:ClassName" (engine/solver_rewards.py gives the contract). Correctness, and with it the solver
    accuracy that pays the proposer, is the judge's verdict whatever the reward."""
    solver_reward_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a plug-in solver reward's constructor (none for the built-in ones)."""
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    """Rule checks on an extracted question."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """How answers are judged (solver rewards and verification)."""

    def __post_init__(self) -> None:
        if self.solver_group_size < 1:
            raise ValueError(f"solver_group_size = {self.solver_group_size}: must be >= 1")
        if self.verify_samples < 1:
            raise ValueError(f"verify_samples = {self.verify_samples}: must be >= 1")
        if not 0.0 <= self.verify_threshold <= 1.0:
            raise ValueError(f"verify_threshold = {self.verify_threshold}: must be in [0, 1]")
        if self.verify_max_new_tokens < 1:
            raise ValueError(f"verify_max_new_tokens = {self.verify_max_new_tokens}: must be >= 1")
        if self.distractors < 0 or self.distractor_pool_size < self.distractors:
            raise ValueError(f"distractors = {self.distractors}, distractor_pool_size = {self.distractor_pool_size}: "
                             "need 0 <= distractors <= distractor_pool_size")
        for name in ("proposer_temperature", "solver_temperature", "verifier_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
        if self.answer_tag_limit < 1:
            raise ValueError(f"answer_tag_limit = {self.answer_tag_limit}: must be >= 1")
        for name, allowed in (("proposer_prefill", PROPOSER_PREFILLS), ("solver_prefill", SOLVER_PREFILLS),
                              ("verifier_prefill", VERIFIER_PREFILLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be one of {allowed} (an opening tag of "
                                 "that role's protocol, or \"\" for none)")
        if self.proposer_scaffold and self.proposer_prefill not in ("", SEARCH_OPEN):
            raise ValueError(f"proposer_prefill = {self.proposer_prefill!r} with proposer_scaffold = true: the "
                             "scaffold opens the first turn with \"<search>\"; set proposer_prefill to \"\" or "
                             "\"<search>\", or turn the scaffold off")
        unknown = sorted(set(self.invalid_reward_by_stage) - set(INVALID_STAGES))
        if unknown:
            raise ValueError(f"invalid_reward_by_stage has unknown stages {unknown}; the stages are "
                             f"{', '.join(INVALID_STAGES)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
    mode: Literal["async", "sync"] = "async"
    """"async": episodes launch continuously as slots free up. "sync": the reference's phase-by-phase schedule
    (all proposers of a step, then all verifications, then all solvers), kept for comparison."""
    max_inflight: int = 0
    """Episodes in flight at once. 0 = derived: twice the pool's total request capacity divided by
    solver_group_size (at least 1), enough to keep every server slot busy without flooding its queue."""
    eta: int | None = 1
    """Staleness bound, guaranteed: no token is trained more than eta policy versions after the version of the
    weights that sampled it, also when slow episodes are overtaken by faster ones (0 = on-policy lock-step). The
    gate starts an episode only while delivered + unsent episodes stay below (version + eta + 1) *
    episodes_per_step, and holds a finished group back while sending it would take a slot that an older, still
    running episode needs to be trained within eta versions (engine/scheduler.py says why that suffices); `ssp
    train` also has the learner drop any group beyond it (learner.max_staleness). Unset = unbounded (no learner,
    e.g. `ssp rollout`)."""
    episodes_per_step: int = 8
    """Episodes the learner consumes per policy version (its batch, in groups; every batch is a version). With eta
    it bounds how far the engine runs ahead of the learner. In "sync" mode it is the number of seeds per step."""
    seeds_file: Path = DATA_DIR / "seeds" / "seed_answers.jsonl"
    """JSONL of seed answers {answer, type, aliases?}: the ground truths the proposer writes questions for."""
    hops_min: int = 2
    """Fewest searches a proposal is asked to need (drawn uniformly per seed from [hops_min, hops_max])."""
    hops_max: int = 4
    """Most searches a proposal is asked to need."""
    seed: int = 1
    """Shuffle seed of the seed answers and of the hop counts and distractor draws."""
    metrics_interval_s: float = 5.0
    """How often a metrics line (rates, occupancy, queue depths, validity) is written."""
    version_poll_s: float = 1.0
    """When streaming to a learner: how often the servers' weight version is read; the lowest one is the policy
    version the staleness gate counts from (the learner labels each weight push str(policy_version))."""
    max_consecutive_failures: int = 64
    """Stop the run (with the last failure's message) after this many episodes in a row failed and none finished:
    a retriever that stays down or servers that are all gone fail every episode, and retrying them forever would
    hang the run silently. 0 = never stop for failures."""
    gc_full_every_s: float = 300.0
    """Seconds between full garbage collections during a run (0 = none until the run ends). CPython would start
    them by itself every few seconds at thousands of rollouts, each a ~250 ms stop of every rollout; the engine
    runs them on this clock instead and reports the pause (gc_full_max_ms). See engine/gc_pacing.py."""

    def __post_init__(self) -> None:
        if self.max_inflight < 0:
            raise ValueError(f"max_inflight = {self.max_inflight}: must be >= 0 (0 = derived from the pool)")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"eta = {self.eta}: must be >= 0 (0 = on-policy), or unset for no bound")
        if self.episodes_per_step < 1:
            raise ValueError(f"episodes_per_step = {self.episodes_per_step}: must be >= 1")
        if not 1 <= self.hops_min <= self.hops_max:
            raise ValueError(f"hops_min = {self.hops_min}, hops_max = {self.hops_max}: need 1 <= min <= max")
        if self.metrics_interval_s <= 0:
            raise ValueError(f"metrics_interval_s = {self.metrics_interval_s}: must be > 0")
        if self.version_poll_s <= 0:
            raise ValueError(f"version_poll_s = {self.version_poll_s}: must be > 0")
        if self.max_consecutive_failures < 0:
            raise ValueError(f"max_consecutive_failures = {self.max_consecutive_failures}: must be >= 0 (0 = never "
                             "stop for failed episodes)")
        if self.gc_full_every_s < 0:
            raise ValueError(f"gc_full_every_s = {self.gc_full_every_s}: must be >= 0 (0 = no full collection "
                             "during the run)")


MAX_FRAME_BYTES = 64 * 1024 * 1024
"""The default frame limit (stream.max_frame_bytes): far above any episode's group, far below a corrupt header's."""
MAX_RUN_ID_CHARS = 200
"""Longest stream.run_id (it is sent in the handshake, whose size is bounded)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamConfig:
    """The trajectory stream between the engine and the learner (engine/stream.py sends, learner/trajectory_source.py
    receives, engine/wire.py is the format and handshake). Both ends read this one section."""

    host: str = "127.0.0.1"
    """Address of the learner's trajectory listener."""
    port: int = 0
    """Port of the learner's trajectory listener (0 = not streaming over TCP)."""
    max_frame_bytes: int = MAX_FRAME_BYTES
    """Largest frame, the same on both ends (the handshake refuses a mismatch): the engine writes a bigger group to
    the spill file instead (never dropped), the learner stops at a bigger frame."""
    queue_groups: int = 64
    """Finished groups buffered for the learner; when full, episodes wait (back-pressure on the scheduler)."""
    spill_path: Path | None = None
    """Where frames go when the learner connection breaks; unset = artifacts/runs/spill-<time>.frames."""
    connect_timeout_s: float = 30.0
    """How long to keep trying to connect to the learner at start-up."""
    run_id: str = ""
    """The run's name in the handshake: the learner refuses an engine of another run. `ssp train` and `ssp launch`
    set it to the run folder's name."""
    key_file: Path | None = None
    """File holding the run key both ends must have (ssp/run_key.py); unset = the environment variable
    SSP_RUN_KEY. `ssp train` and `ssp launch` write a fresh one per run (<run>/stream.key) and set this."""
    handshake_timeout_s: float = 10.0
    """A peer that has not completed the handshake this long after connecting is refused (the learner keeps
    waiting for the engine); the engine gives up on a learner that does not answer within it."""
    read_timeout_s: float = 1800.0
    """The learner stops when the connected engine sends nothing for this long (a hung or vanished engine); raise it
    if one episode can take longer."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port = {self.port}: must be in 0..65535")
        if not 1024 <= self.max_frame_bytes < 1 << 32:
            raise ValueError(f"max_frame_bytes = {self.max_frame_bytes}: must be in 1024..2**32-1 (the frame "
                             "header is a 32-bit length)")
        if self.queue_groups < 1:
            raise ValueError(f"queue_groups = {self.queue_groups}: must be >= 1")
        for name in ("connect_timeout_s", "handshake_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0 seconds")
        if len(self.run_id) > MAX_RUN_ID_CHARS:
            raise ValueError(f"run_id has {len(self.run_id)} characters: at most {MAX_RUN_ID_CHARS} (it is sent in "
                             "the handshake)")


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    """The sections the engine reads, and only those: what plays episodes, searches, streams and evaluates.

    The root config (ssp/run_config.py) also holds the learner, the servers, the run and the cluster; the engine is
    handed this view of it (`SSPConfig.engine()`), so nothing in the engine can come to depend on those sections.
    """

    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    search: SearchBatcherConfig = field(default_factory=SearchBatcherConfig)
    game: GameConfig = field(default_factory=GameConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
