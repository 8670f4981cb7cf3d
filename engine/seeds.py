"""Seed answers: the ground truths the proposer writes questions for, each with a requested hop count.

File format (data/seeds/seed_answers.jsonl): one JSON object per line, `{"answer": str, "type": str,
"aliases": [str, ...] (optional), ...}`. Answers are always handled as a list of aliases, never as a bare string.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssp.engine.judge import normalize_answer


@dataclass(frozen=True, slots=True)
class Seed:
    aliases: tuple[str, ...]
    """Every accepted form of the answer; aliases[0] is the one shown to the proposer."""
    type: str
    """person, place, event, date, year, number or entity (data/README.md)."""
    hops: int
    """How many searches the question must need."""

    @property
    def answer(self) -> str:
        return self.aliases[0]


@dataclass(frozen=True, slots=True)
class SeedAnswer:
    aliases: tuple[str, ...]
    type: str


class SeedError(ValueError):
    """A seed file line is malformed; the message names the file and line."""


def load_seed_answers(path: Path) -> list[SeedAnswer]:
    if not path.exists():
        raise SeedError(f"seed file {path} does not exist; set scheduler.seeds_file to a JSONL of "
                        '{"answer": ..., "type": ...} lines (the shipped one is data/seeds/seed_answers.jsonl)')
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SeedError(f"{path}:{lineno}: not valid JSON ({e})") from None
            answer = row.get("answer") if isinstance(row, dict) else None
            if not isinstance(answer, str) or not answer.strip():
                raise SeedError(f"{path}:{lineno}: 'answer' must be a non-empty string, got {answer!r}")
            extra = row.get("aliases", [])
            if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
                raise SeedError(f"{path}:{lineno}: 'aliases' must be a list of strings, got {extra!r}")
            aliases = tuple(dict.fromkeys([answer.strip(), *(a.strip() for a in extra if a.strip())]))
            out.append(SeedAnswer(aliases, str(row.get("type", "entity"))))
    if not out:
        raise SeedError(f"seed file {path} has no seed answers")
    return out


def shared_answers(first: Sequence[SeedAnswer], second: Sequence[SeedAnswer]) -> list[str]:
    """The answers both lists hold under any alias, compared as the exact-match judge compares answers (SQuAD
    normalisation) and case-insensitively: a held-out seed is held out only if training cannot draw it in any form."""
    shared = []
    for key in (str.lower, normalize_answer):
        keys = {key(alias.strip()) for answer in first for alias in answer.aliases}
        shared += [alias for answer in second for alias in answer.aliases if key(alias.strip()) in keys]
    return sorted(set(shared))


def seed_stream(answers: list[SeedAnswer], *, hops_min: int, hops_max: int, seed: int) -> Iterator[Seed]:
    """Endless shuffled seeds: each pass over the answers is a fresh permutation; hop counts are drawn uniformly
    from [hops_min, hops_max]."""
    rng = random.Random(seed)
    order = list(range(len(answers)))
    while True:
        rng.shuffle(order)
        for i in order:
            a = answers[i]
            yield Seed(a.aliases, a.type, rng.randint(hops_min, hops_max))
