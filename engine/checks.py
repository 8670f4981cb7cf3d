"""Tag parsing and the rule checks on a proposed question (SSP's rule filters: length, answer leakage, distinct
searches; leakage is checked against every alias, case-insensitively, where the reference checked one string).

Pure functions over text: they never see tokens, and the rollout keeps the token ids untouched.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ssp.engine.config import ChecksConfig
from ssp.engine.judge import check_aliases

_QUESTION = re.compile(r"<question>\s*((?:(?!<question>).)*?)\s*</question>", re.DOTALL)
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
"""A closed block holds no other opener of its tag: after a prefilled "<answer>" a model that writes its own opener
anyway ("<answer>" + " <answer> Paris </answer>") still gives "Paris"."""


@dataclass(frozen=True, slots=True)
class SearchRecord:
    """One executed search of a rollout: the query as the model wrote it (stripped) and how many docs came back."""

    query: str
    num_docs: int


def extract_question(generated_text: str) -> str | None:
    """The first <question>...</question> block of the proposer's own text (tool output is not searched), or None.
    Later blocks are ignored, as in the reference."""
    m = _QUESTION.search(generated_text)
    if m is None:
        return None
    return m.group(1).strip() or None


def extract_answer(generated_text: str) -> str | None:
    """The last <answer>...</answer> block (the one SSP grades), stripped, or None when there is none."""
    found = _ANSWER.findall(generated_text)
    return found[-1].strip() if found else None


def count_answer_tags(generated_text: str) -> int:
    """The larger of the counts of <answer> and </answer>: the tag-spam measure of the solver reward."""
    return max(generated_text.count("<answer>"), generated_text.count("</answer>"))


def leaks(text: str, aliases: Sequence[str]) -> bool:
    """True when any alias occurs in `text`, case-insensitively (every alias, not only the first)."""
    lowered = text.lower()
    return any(alias.strip().lower() in lowered for alias in check_aliases(aliases))


def _norm_query(query: str) -> str:
    return " ".join(query.lower().split())


def check_question(question: str, aliases: Sequence[str], searches: Sequence[SearchRecord],
                   cfg: ChecksConfig) -> list[str]:
    """Every rule the question breaks, as short reason names (empty = it passes the rule checks)."""
    reasons = []
    if len(question) < cfg.min_chars:
        reasons.append("too_short")
    if len(question) > cfg.max_chars:
        reasons.append("too_long")
    if len(question.split()) < cfg.min_words:
        reasons.append("too_few_words")
    if leaks(question, aliases):
        reasons.append("answer_leak")
    if cfg.leak_in_search_queries and any(leaks(s.query, aliases) for s in searches):
        reasons.append("answer_in_search")
    distinct = {_norm_query(s.query) for s in searches if s.num_docs > 0}
    if len(distinct) < cfg.min_searches:
        reasons.append("too_few_searches")
    return reasons
