"""A scripted stand-in for the policy server, for the pure-logic tests of the game and the scheduler.

It reads which role a request is for from the rendered prompt (the system prompt) and how far the rollout is (how
many <information> blocks the input holds), and answers with a fixed script, tokenised with the real tokenizer, as
an SGLang server would return it (ids, logprobs, finish reason, weight spans). The end-to-end tests use the real
SmolLM2 reference server instead.
"""

from __future__ import annotations

import asyncio
import collections
from array import array
from dataclasses import dataclass, field

from ssp.engine.chat import ChatTokenizer
from ssp.engine.errors import ConnectionFailed
from ssp.engine.generation import FinishReason, GenerateResult, SamplingParams, WeightSpan
from ssp.engine.prompts import PROPOSER_SYSTEM, SOLVER_SYSTEM, VERIFIER_SYSTEM
from ssp.retriever.protocol import Doc

QUESTION = "Which river runs through the capital city of the country where the painter of the mural was born?"


@dataclass
class ScriptedPolicy:
    chat: ChatTokenizer
    answer: str = "Danube"
    question: str = QUESTION
    version: str = "0"
    delay_s: float = 0.0
    fail_every: int = 0
    """Raise ConnectionFailed on every n-th proposer request (0 = never): an unreachable server."""
    calls: list[tuple[str, SamplingParams, str]] = field(default_factory=list)
    prefills: list[tuple[str, int, str]] = field(default_factory=list)
    """Prefill-only requests (max_new_tokens 0): (role, prompt tokens, affinity)."""
    _counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def role_of(self, prompt: str) -> str:
        if PROPOSER_SYSTEM[:40] in prompt:
            return "proposer"
        if VERIFIER_SYSTEM in prompt:
            return "verifier"
        assert SOLVER_SYSTEM in prompt, prompt[:200]
        return "solver"

    async def generate(self, input_ids: list[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
        prompt = self.chat.decode(input_ids)
        role = self.role_of(prompt)
        if sampling.max_new_tokens == 0:  # a prompt warmed for a group: nothing is generated
            self.prefills.append((role, len(input_ids), affinity))
            return GenerateResult(rid=f"w{len(self.prefills)}", output_ids=array("l"), logprobs=array("d"),
                                  finish=FinishReason("length"), weight_version=self.version,
                                  weight_versions=(), prompt_tokens=len(input_ids), cached_tokens=0, text="",
                                  server="scripted")
        self.calls.append((role, sampling, affinity))
        self._counts[role] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if role == "proposer" and self.fail_every and self._counts[role] % self.fail_every == 0:
            raise ConnectionFailed("scripted: server unreachable", url="http://scripted", may_be_running=False)
        searches = prompt.count("<information>\n")  # tool blocks, not the mention in the prompt
        if role == "proposer":
            text = (f"<search> step {searches} towards the answer </search>" if searches < 2
                    else f"<question> {self.question} </question>")
        elif role == "verifier":
            text = f"<think>It is in the documents.</think> <answer> {self.answer} </answer>"
        else:
            # Solvers alternate right and wrong by affinity order, so groups have reward variance.
            n = self._counts[role]
            text = ("<search> mural painter </search>" if searches == 0
                    else f"<answer> {self.answer if n % 2 else 'Rhine'} </answer>")
        stop = next(s for s in sampling.stop if text.endswith(s))
        ids = self.chat.encode_tool(text)
        return GenerateResult(rid=f"r{len(self.calls)}", output_ids=ids, logprobs=[-0.5] * len(ids),
                              finish=FinishReason("stop", stop), weight_version=self.version,
                              weight_versions=(WeightSpan(self.version, 0, len(ids)),), prompt_tokens=len(input_ids),
                              cached_tokens=0, text=text, server="scripted")


class TinyRetriever:
    """Two documents per query, with ids unique per query (so distractors differ between episodes)."""

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        return [[Doc(f"{q}-{i}", f"Title {i}", f"About {q}.", 1.0) for i in range(k)] for q in queries]

    async def close(self) -> None:
        pass
