"""Config section [eval]: how `ssp eval` (and `engine.evaluation.evaluate`) scores a model on QA benchmarks.

The protocol is Search-R1's (ssp-spec.md §4.2): the solver prompt, greedy decoding, top-k documents per search, a
bound on assistant turns. The inference servers come from [inference] (or `--model`), the retriever from
[retriever], the tokenizer and the token budgets of a whole rollout from [rollout].
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    concurrency: int = 32
    """Questions in flight at once. They all go to the servers together, so the servers batch them; the pool still
    caps what each server holds (inference.capacity_per_server), the rest wait in the pool's queue."""
    max_turns: int = 10
    """Assistant turns per question (SSP trains the solver with 10, so at most 9 searches run). A search asked for
    in the last turn is not executed, and the question ends without an answer."""
    max_new_tokens_per_turn: int = 500
    """Tokens one turn may generate (Search-R1 uses 500). The whole response is also bounded by
    rollout.max_response_tokens and rollout.max_context_tokens."""
    topk: int = 3
    """Documents shown per search (Search-R1 and SSP evaluate with 3)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy, the protocol of the paper's tables (one sample per question)."""
    limit: int = 0
    """Questions per dataset file: a seeded random subset of this size (`--limit` overrides it). 0 = every
    question of every file."""
    seed: int = 0
    """Seed of the subset drawn when `limit` is set; the same seed gives the same questions, so a before/after
    comparison scores both models on identical questions."""
    out_dir: Path | None = None
    """Where summary.json, records.jsonl (one line per question, with the full response), the resolved config and
    the server log are written. Unset = artifacts/eval/<date-time>."""
    server_start_timeout_s: float = 300.0
    """With `--model DIR`: how long the reference server started for the evaluation may take to answer /health
    (model load included) before the evaluation fails, naming its log."""

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_turns", "max_new_tokens_per_turn", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0 (0 = greedy)")
        if self.limit < 0:
            raise ValueError(f"limit = {self.limit}: must be >= 0 (0 = every question)")
        if self.server_start_timeout_s <= 0:
            raise ValueError(f"server_start_timeout_s = {self.server_start_timeout_s}: must be > 0 seconds")
