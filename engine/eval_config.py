"""Config section [eval]: how `ssp eval` (and `ssp.engine.evaluation.evaluate`) scores a model: the solver on QA
benchmarks, and the proposer on held-out seed answers.

Solver (QA files and the questions the proposer writes): Search-R1's evaluation protocol (as in SSP), the solver prompt
without prefill, `temperature` (greedy), `topk` documents per search, at most `max_turns` turns of
`max_new_tokens_per_turn` tokens, one rollout per question.

Proposer (`--seeds`, engine/proposer_eval.py): the game's own episode on each seed answer, as training plays it (the
[game] prompts, prefills, rule checks, judge and RAG verification; the [rollout] budgets and retriever.topk
documents per search, so a proposer is not cut short by the solver's shorter turns), except for sampling:
`proposer_temperature` and `verifier_temperature`, both greedy by default, so every seed gets one deterministic
question and one deterministic verification, and a before/after comparison differs only by the weights. Greedy
verification asks one answer (the game.verify_samples greedy samples would all be the same) and passes when it is
judged correct (game.verify_threshold in (0, 1]); with a temperature > 0 it asks game.verify_samples answers, as
training does. The valid questions then go to the solver above (one greedy rollout each, so its accuracy is over
questions: how hard the proposer's questions are on the same footing as the QA scores). The hop count asked for
each seed is drawn from [scheduler.hops_min, hops_max] by a generator seeded with `seed` and the seed's position in
its file, and the verification's distractors are the documents of the proposals before it in the evaluated list:
reruns give the same prompts. How many seeds: all of the file by default (`seeds_limit` = 0; the held-out file's
502 answers put a 95% interval of about ±4 points around a 50% rate), or a seeded subset for quick runs (16 seeds:
about ±22 points).

The inference servers come from [inference] (or `--model`), the retriever from [retriever], the tokenizer and the
token budgets of a whole rollout from [rollout].
"""

from dataclasses import dataclass
from pathlib import Path

from ssp.paths import DATA_DIR

HELDOUT_SEEDS = DATA_DIR / "seeds" / "heldout_seed_answers.jsonl"
"""The held-out seed answers of the proposer evaluation (`ssp eval --seeds`): split off the training seeds
(scheduler.seeds_file) by data/seeds/split_heldout.py, so training never draws them (data/README.md)."""


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
    """Solver sampling temperature; 0 is greedy, the protocol of the paper's tables (one sample per question)."""
    proposer_temperature: float = 0.0
    """Proposer sampling temperature in the proposer evaluation (game.proposer_temperature is training's). 0 =
    greedy: one deterministic question per seed. Set training's value to measure the questions as training samples
    them (the rates then also vary between runs; their intervals cover that)."""
    verifier_temperature: float = 0.0
    """Sampling temperature of the RAG verification in the proposer evaluation. 0 = greedy, one verification
    answer per question; > 0 = game.verify_samples answers, passing at game.verify_threshold, as in training."""
    limit: int = 0
    """Questions per dataset file: a seeded random subset of this size (`--limit` overrides it). 0 = every
    question of every file."""
    seeds_limit: int = 0
    """Seed answers in the proposer evaluation: a seeded random subset of this size of the `--seeds` file
    (`--seeds-limit` overrides it). 0 = every seed answer of the file."""
    seed: int = 0
    """Seed of the subsets drawn when `limit` or `seeds_limit` is set, and of the hop counts and distractor draws of
    the proposer evaluation; the same seed gives the same questions and seeds, so a before/after comparison scores
    both models on identical work."""
    out_dir: Path | None = None
    """Where summary.json, records.jsonl (one line per QA question, with the full response),
    proposer_records.jsonl (one line per seed answer: question, invalid reasons, verification, solver answer), the
    resolved config and the server log are written. Unset = artifacts/eval/<date-time>."""
    server_start_timeout_s: float = 300.0
    """With `--model DIR`: how long the reference server started for the evaluation may take to answer /health
    (model load included) before the evaluation fails, naming its log."""

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_turns", "max_new_tokens_per_turn", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        for name in ("temperature", "proposer_temperature", "verifier_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 0 (0 = greedy)")
        if self.limit < 0:
            raise ValueError(f"limit = {self.limit}: must be >= 0 (0 = every question)")
        if self.seeds_limit < 0:
            raise ValueError(f"seeds_limit = {self.seeds_limit}: must be >= 0 (0 = every seed answer)")
        if self.server_start_timeout_s <= 0:
            raise ValueError(f"server_start_timeout_s = {self.server_start_timeout_s}: must be > 0 seconds")
