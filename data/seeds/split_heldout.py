"""Split the seed answers into training seeds and held-out seeds for the proposer evaluation (`ssp eval --seeds`).

    .venv/bin/python data/seeds/split_heldout.py        # rewrites both files; running it again changes nothing

Reads seed_answers.jsonl and heldout_seed_answers.jsonl (if present) as one pool, and writes them back split:
HELDOUT_SIZE answers held out, stratified over `type` (each type in proportion to its share of the pool, but at
least MIN_PER_TYPE, so the rarest types can be read on their own), the rest for training (scheduler.seeds_file).
Within a type the held-out answers are those with the smallest sha256 of SALT + the lower-cased answer: the choice
depends on the answers only, not on the file order or a random generator. Answers that share an alias after the
judge's normalisation (ssp.engine.judge.normalize_answer: case, punctuation, articles, spaces, so "The Bahamas" and
"bahamas" are one answer to the exact-match judge) stay together on one side, so no held-out answer can be drawn in
training under another spelling. Lines are copied byte for byte, in the pool's order.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

from ssp.engine.judge import normalize_answer

HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "seed_answers.jsonl"
HELDOUT_FILE = HERE / "heldout_seed_answers.jsonl"
HELDOUT_SIZE = 500
MIN_PER_TYPE = 20
SALT = "ssp-heldout-v1:"


def aliases(row: dict) -> list[str]:
    """Every accepted form of a row's answer (the answer and its optional aliases) as the judge compares them:
    normalised, or only lower-cased when normalisation leaves nothing (an answer of punctuation or articles)."""
    return [normalize_answer(a) or a.strip().lower() for a in [row["answer"], *row.get("aliases", [])] if a.strip()]


def alias_groups(rows: list[dict]) -> list[list[int]]:
    """Row indices grouped so that rows sharing an alias (as `aliases` spells it) are in one group (union-find), in
    pool order."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        for alias in aliases(row):
            if alias in first_row:
                parent[root(i)] = root(first_row[alias])
            else:
                first_row[alias] = i
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i in range(len(rows)):
        groups[root(i)].append(i)
    return list(groups.values())


def quotas(counts: dict[str, int], total: int, floor: int) -> dict[str, int]:
    """Held-out answers per type: proportional to `counts`, at least `floor` (or all of a smaller type), summing to
    `total`; fractions are settled by largest remainder."""
    fixed: dict[str, int] = {}
    while True:
        rest = {t: c for t, c in counts.items() if t not in fixed}
        left = total - sum(fixed.values())
        share = {t: left * c / sum(rest.values()) for t, c in rest.items()}
        small = {t: min(floor, counts[t]) for t, s in share.items() if s < min(floor, counts[t])}
        if not small:
            break
        fixed.update(small)
    out = {**fixed, **{t: int(s) for t, s in share.items()}}
    by_remainder = sorted(share, key=lambda t: (-(share[t] - int(share[t])), t))
    for t in by_remainder[:total - sum(out.values())]:
        out[t] += 1
    return out


def split(lines: list[str]) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines) of a pool of seed-answer JSONL lines."""
    rows = [json.loads(line) for line in lines]
    groups = alias_groups(rows)
    by_type: dict[str, list[list[int]]] = collections.defaultdict(list)
    for group in groups:
        by_type[rows[group[0]]["type"]].append(group)
    wanted = quotas({t: len(g) for t, g in by_type.items()}, HELDOUT_SIZE, MIN_PER_TYPE)
    held: set[int] = set()
    for t, type_groups in by_type.items():
        ranked = sorted(type_groups, key=lambda g: hashlib.sha256(
            (SALT + min(a for i in g for a in aliases(rows[i]))).encode()).hexdigest())
        held.update(i for g in ranked[:wanted[t]] for i in g)
    return ([line for i, line in enumerate(lines) if i not in held],
            [line for i, line in enumerate(lines) if i in held])


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSONL file (split at "\\n" only, as JSON text may hold other line separators)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()] if path.exists() else []


def main() -> None:
    train, heldout = split(read_lines(TRAIN_FILE) + read_lines(HELDOUT_FILE))
    TRAIN_FILE.write_text("".join(f"{line}\n" for line in train), encoding="utf-8")
    HELDOUT_FILE.write_text("".join(f"{line}\n" for line in heldout), encoding="utf-8")
    print(f"{TRAIN_FILE}: {len(train)} training seed answers; {HELDOUT_FILE}: {len(heldout)} held out")


if __name__ == "__main__":
    main()
