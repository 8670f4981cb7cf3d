"""RAG verification: can the policy answer the proposed question from the proposer's own documents, without search?

The documents are those the proposer retrieved plus documents of other recent episodes (distractors), shuffled, so a
question answerable only by guessing, or only with the proposer's hidden knowledge, fails. `verify_samples` answers
are sampled on one shared prompt (sent together with one affinity, so the server's prefix cache holds the long
document prefix once). The question passes when the fraction judged correct reaches `verify_threshold`.

Fails closed: a judge error counts that answer as wrong; an inference failure raises (the episode is dropped and
reported), never a pass (SSP's reference code passed a question when its check raised).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ssp.engine.chat import ChatTokenizer
from ssp.engine.checks import extract_answer
from ssp.engine.config import GameConfig
from ssp.engine.judge import Judge, Verdict
from ssp.engine.prompts import ANSWER_CLOSE, ANSWER_OPEN, render_docs, verifier_messages
from ssp.engine.rollout import Rollout, RolloutRunner, RolloutSpec
from ssp.retriever.protocol import Doc


class DistractorPool:
    """Document sets of recent episodes, to mix into other episodes' verification documents."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self._sets: collections.deque[tuple[str, list[Doc]]] = collections.deque(maxlen=size)
        self._rng = rng

    def add(self, episode_id: str, docs: Sequence[Doc]) -> None:
        if docs:
            self._sets.append((episode_id, list(docs)))

    def draw(self, n: int, *, exclude: str) -> list[list[Doc]]:
        """Up to n document sets of episodes other than `exclude` (fewer while the pool is young)."""
        others = [docs for eid, docs in self._sets if eid != exclude]
        return self._rng.sample(others, min(n, len(others)))


def verification_documents(own: Sequence[Doc], distractors: Sequence[Sequence[Doc]], rng: random.Random
                           ) -> list[Doc]:
    """The proposer's documents and the distractors, de-duplicated by id, shuffled (shown numbered as one list)."""
    seen: dict[str, Doc] = {}
    for doc in [*own, *(d for docs in distractors for d in docs)]:
        seen.setdefault(doc.id, doc)
    docs = list(seen.values())
    rng.shuffle(docs)
    return docs


@dataclass(slots=True)
class Verification:
    passed: bool
    fraction: float
    samples: list[tuple[Rollout, Verdict]]
    documents: str


class Verifier:
    def __init__(self, runner: RolloutRunner, chat: ChatTokenizer, judge: Judge, cfg: GameConfig) -> None:
        self._runner = runner
        self._chat = chat
        self._judge = judge
        self._cfg = cfg
        self.spec = RolloutSpec(final_open=ANSWER_OPEN, final_close=ANSWER_CLOSE, search=False,
                                temperature=cfg.verifier_temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.verify_max_new_tokens, prefill=cfg.verifier_prefill)

    async def verify(self, question: str, aliases: Sequence[str], docs: Sequence[Doc], *, affinity: str
                     ) -> Verification:
        documents = render_docs(docs)
        prompt = await self._chat.render(verifier_messages(question, documents), prefill=self.spec.prefill,
                                         documents=docs)
        rollouts = await self._runner.run_group(prompt, self.spec, self._cfg.verify_samples, affinity=affinity)
        verdicts = [await self._judge.judge(question, extract_answer(r.generated_text), aliases) for r in rollouts]
        fraction = sum(v.correct for v in verdicts) / len(verdicts)
        return Verification(fraction >= self._cfg.verify_threshold, fraction, list(zip(rollouts, verdicts)),
                            documents)
