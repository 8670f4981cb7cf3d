"""The multi-turn token-in/token-out loop against a scripted Generator (pure logic) and the real SmolLM2 tokenizer.

The scripted generator returns the tokens of a given text exactly as a server would (ids, logprobs, finish, weight
spans); every test checks that the rollout appends exactly those ids, masks tool blocks, and records why it ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ssp.engine.chat import ChatTokenizer
from ssp.engine.checks import extract_answer, extract_question
from ssp.engine.config import GameConfig, RolloutConfig, SearchBatcherConfig
from ssp.engine.errors import ConnectionFailed
from ssp.engine.generation import FinishReason, GenerateResult, SamplingParams, WeightSpan
from ssp.engine.prompts import information_block, solver_messages
from ssp.engine.rollout import EndReason, Rollout, RolloutError, RolloutRunner, RolloutSpec
from ssp.engine.search_batcher import SearchBatcher
from ssp.retriever.protocol import Doc


@dataclass
class Turn:
    text: str
    finish: FinishReason
    versions: tuple[tuple[str, int], ...] = ()  # (version, length) spans; default one span of version "0"


@dataclass
class ScriptedGenerator:
    chat: ChatTokenizer
    turns: list[Turn]
    calls: list[tuple[list[int], SamplingParams, str]] = field(default_factory=list)

    async def generate(self, input_ids: list[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
        self.calls.append((list(input_ids), sampling, affinity))
        if sampling.max_new_tokens == 0:  # prefill only: nothing generated
            return GenerateResult(rid=f"r{len(self.calls)}", output_ids=[], logprobs=[], finish=FinishReason("length"),
                                  weight_version="0", weight_versions=(), prompt_tokens=len(input_ids),
                                  cached_tokens=0, text="", server="scripted")
        turn = self.turns.pop(0)
        ids = self.chat.encode_tool(turn.text)
        spans, start = [], 0
        for version, n in turn.versions or (("0", len(ids)),):
            spans.append(WeightSpan(version, start, start + n))
            start += n
        return GenerateResult(rid=f"r{len(self.calls)}", output_ids=ids,
                              logprobs=[-0.01 * (i + 1) for i in range(len(ids))], finish=turn.finish,
                              weight_version=spans[-1].version, weight_versions=tuple(spans),
                              prompt_tokens=len(input_ids), cached_tokens=0, text=turn.text, server="scripted")


class Docs:
    def __init__(self) -> None:
        self.queries: list[str] = []

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        self.queries += queries
        return [[Doc(f"d{i}", f"Title {q} {i}", f"Passage {i} about {q}.", 1.0) for i in range(k)] for q in queries]

    async def close(self) -> None:
        pass


STOP_SEARCH = FinishReason("stop", "</search>")
STOP_ANSWER = FinishReason("stop", "</answer>")
EOS = FinishReason("stop", 2)
SOLVER = RolloutSpec(final_open="<answer>", final_close="</answer>", search=True, temperature=0.7)


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(model_dir)


async def _run(chat: ChatTokenizer, turns: list[Turn], cfg: RolloutConfig | None = None,
               spec: RolloutSpec = SOLVER) -> tuple[Rollout, ScriptedGenerator, Docs]:
    gen = ScriptedGenerator(chat, turns)
    docs = Docs()
    batcher = SearchBatcher(docs, SearchBatcherConfig(window_ms=0), k=2)
    runner = RolloutRunner(gen, chat, batcher, cfg or RolloutConfig())
    prompt = await chat.render(solver_messages("What is the capital of France?"))
    try:
        return await runner.run(prompt, spec, affinity="ep-1"), gen, docs
    finally:
        await batcher.close()


async def test_a_group_prefills_its_shared_prompt_once_before_its_rollouts(chat: ChatTokenizer) -> None:
    answer = Turn("<answer>Paris</answer>", STOP_ANSWER)
    gen = ScriptedGenerator(chat, [answer] * 4)
    runner = RolloutRunner(gen, chat, None, RolloutConfig())
    prompt = [5, 6, 7]
    group = await runner.run_group(prompt, SOLVER, 3, affinity="g-s")
    assert [ro.end for ro in group] == [EndReason.ANSWER] * 3
    (warm_ids, warm, warm_affinity), *rest = gen.calls
    assert (warm_ids, warm.max_new_tokens, warm_affinity) == (prompt, 0, "g-s")
    assert [(ids, s.max_new_tokens > 0, a) for ids, s, a in rest] == [(prompt, True, "g-s")] * 3
    # One rollout alone has nothing to share.
    gen.calls.clear()
    [alone] = await runner.run_group(prompt, SOLVER, 1, affinity="a")
    assert alone.end is EndReason.ANSWER and len(gen.calls) == 1
    # A prompt that leaves no room to generate is not sent at all (the rollouts end on the context budget).
    gen.calls.clear()
    tight = RolloutRunner(gen, chat, None, RolloutConfig(max_context_tokens=len(prompt)))
    full = await tight.run_group(prompt, SOLVER, 2, affinity="b")
    assert [ro.end for ro in full] == [EndReason.CONTEXT_BUDGET] * 2 and gen.calls == []


async def test_a_failed_prompt_prefill_fails_the_group(chat: ChatTokenizer) -> None:
    class Down(ScriptedGenerator):
        async def generate(self, input_ids: list[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
            raise ConnectionFailed("no server", url="http://x", may_be_running=False)

    runner = RolloutRunner(Down(chat, []), chat, None, RolloutConfig())
    with pytest.raises(RolloutError, match="prefilling the shared prompt of 2 rollouts failed: http://x: no server"):
        await runner.run_group([1, 2], SOLVER, 2, affinity="a")


def check_alignment(ro: Rollout, chat: ChatTokenizer) -> None:
    n = len(ro.response_ids)
    assert len(ro.loss_mask) == len(ro.logprobs) == len(ro.versions) == n
    for seg in ro.segments:
        span = range(seg.start, seg.end)
        if seg.kind == "tool":
            assert all(ro.loss_mask[i] == 0 and ro.logprobs[i] == 0.0 and ro.versions[i] == -1 for i in span)
            assert chat.decode(ro.response_ids[seg.start:seg.end]).startswith("\n\n<information>")
        else:
            assert all(ro.loss_mask[i] == 1 and ro.logprobs[i] < 0 and ro.versions[i] >= 0 for i in span)
    assert sum(s.end - s.start for s in ro.segments) == n


async def test_search_then_answer(chat: ChatTokenizer) -> None:
    ro, gen, docs = await _run(chat, [
        Turn("<think>I should look it up.</think>\n<search> capital of France </search>", STOP_SEARCH),
        Turn("<answer> Paris </answer>", STOP_ANSWER),
    ])
    assert ro.end is EndReason.ANSWER and ro.turns == 2
    assert docs.queries == ["capital of France"]
    assert [s.query for s in ro.searches] == ["capital of France"] and ro.searches[0].num_docs == 2
    check_alignment(ro, chat)
    gen1, tool, gen2 = ro.segments
    assert (gen1.kind, tool.kind, gen2.kind) == ("gen", "tool", "gen")
    # The tool span is exactly the rendered information block, encoded once.
    tool_ids = ro.response_ids[tool.start:tool.end].tolist()
    assert tool_ids == chat.encode_information(ro.docs[0]).tolist()
    assert chat.decode(tool_ids) == information_block(ro.docs[0])
    # Each turn sends the running ids: prompt + everything appended so far, never re-tokenised text.
    assert gen.calls[1][0] == (ro.prompt_ids + ro.response_ids[:tool.end]).tolist()
    assert gen.calls[0][1].stop == ("</search>", "</answer>") and gen.calls[0][1].temperature == 0.7
    assert gen.calls[0][2] == gen.calls[1][2] == "ep-1"
    assert "<answer> Paris </answer>" in ro.generated_text and "<information>" not in ro.generated_text
    assert len(ro.overhead_s) == 1  # one boundary between two turns: engine work, the search wait excluded


async def test_turn_limit_does_not_run_the_last_search(chat: ChatTokenizer) -> None:
    ro, _, docs = await _run(chat, [Turn("<search> a </search>", STOP_SEARCH), Turn("<search> b </search>", STOP_SEARCH)],
                             RolloutConfig(max_turns=2))
    assert ro.end is EndReason.TURN_LIMIT and docs.queries == ["a"] and len(ro.searches) == 1
    check_alignment(ro, chat)


async def test_budgets_cap_each_turn_and_end_the_rollout(chat: ChatTokenizer) -> None:
    cfg = RolloutConfig(max_response_tokens=200, max_new_tokens_per_turn=50)
    ro, gen, _ = await _run(chat, [Turn("<search> a </search>", STOP_SEARCH), Turn("blah " * 20, FinishReason("length"))],
                            cfg)
    assert gen.calls[0][1].max_new_tokens == 50
    assert ro.end is EndReason.TURN_BUDGET
    # A tool block that would overflow the response budget is not appended.
    ro, _, _ = await _run(chat, [Turn("<search> a </search>", STOP_SEARCH)], RolloutConfig(max_response_tokens=40))
    assert ro.end is EndReason.RESPONSE_BUDGET and not ro.searches
    prompt_len = len(await chat.render(solver_messages("What is the capital of France?")))
    ro, gen, _ = await _run(chat, [Turn("x " * 5, FinishReason("length"))], RolloutConfig(max_context_tokens=prompt_len + 7))
    assert gen.calls[0][1].max_new_tokens == 7 and ro.end is EndReason.CONTEXT_BUDGET


async def test_malformed_and_unclosed_tags_end_with_a_reason(chat: ChatTokenizer) -> None:
    ro, _, _ = await _run(chat, [Turn("no opener </search>", STOP_SEARCH)])
    assert ro.end is EndReason.MALFORMED_SEARCH
    ro, _, _ = await _run(chat, [Turn("<search>   </search>", STOP_SEARCH)])
    assert ro.end is EndReason.MALFORMED_SEARCH
    ro, _, _ = await _run(chat, [Turn("<answer> Paris<|im_end|>", EOS)])
    assert ro.end is EndReason.MISSING_CLOSER
    ro, _, _ = await _run(chat, [Turn("Paris.<|im_end|>", EOS)])
    assert ro.end is EndReason.EOS and ro.response_ids[-1] == 2  # EOS is part of the trained response


async def test_aborted_generation_is_resumed_with_its_versions(chat: ChatTokenizer) -> None:
    first = "<search> capital"
    n_first = len(chat.encode_tool(first))
    rest = " of France </search>"
    n_rest = len(chat.encode_tool(rest))
    ro, gen, _ = await _run(chat, [
        Turn(first, FinishReason("abort", message="Aborted"), (("3", n_first),)),
        Turn(rest, STOP_SEARCH, (("4", n_rest),)),
        Turn("<answer>Paris</answer>", STOP_ANSWER, (("4", 2), ("5", len(chat.encode_tool("<answer>Paris</answer>")) - 2))),
    ])
    assert ro.resumes == 1 and ro.end is EndReason.ANSWER
    prompt = ro.prompt_ids
    assert gen.calls[1][0] == (prompt + ro.response_ids[:n_first]).tolist()  # prompt + partial output re-sent
    assert gen.calls[1][1].max_new_tokens == gen.calls[0][1].max_new_tokens - n_first
    assert ro.versions[:n_first].tolist() == [3] * n_first
    assert ro.versions[n_first:n_first + n_rest].tolist() == [4] * n_rest
    assert ro.searches[0].query == "capital of France"
    last = ro.segments[-1]
    assert ro.versions[last.start:last.start + 2].tolist() == [4, 4] and set(ro.versions[last.start + 2:last.end]) == {5}
    check_alignment(ro, chat)


async def test_endless_aborts_fail_the_rollout(chat: ChatTokenizer) -> None:
    with pytest.raises(RolloutError, match="aborted 3 times"):
        await _run(chat, [Turn("x", FinishReason("abort"))] * 3, RolloutConfig(max_resumes=2))


async def test_search_failure_is_a_rollout_error(chat: ChatTokenizer) -> None:
    class Broken(Docs):
        async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
            raise ConnectionError("retriever down")

    gen = ScriptedGenerator(chat, [Turn("<search> a </search>", STOP_SEARCH)])
    batcher = SearchBatcher(Broken(), SearchBatcherConfig(window_ms=0), k=1)
    runner = RolloutRunner(gen, chat, batcher, RolloutConfig())
    with pytest.raises(RolloutError, match="retriever down"):
        await runner.run([1, 2, 3], SOLVER, affinity="a")
    await batcher.close()


def test_information_block_encoding_is_cached_and_exact(chat: ChatTokenizer) -> None:
    docs = [Doc("a", "Ed Wood", "Edward Davis Wood Jr. was an American filmmaker.", 1.0),
            Doc("b", "Galați", "Galați is a city in Romania — on the Danube.", 2.0)]
    first = chat.encode_information(docs)
    assert chat.decode(first) == information_block(docs)
    assert chat.encode_information(docs) == first  # the cached path gives the same ids
    assert chat.decode(chat.encode_information([])) == information_block([])
    changed = [Doc("a", "Ed Wood", "Different text, same id.", 1.0)]
    assert chat.decode(chat.encode_information(changed)) == information_block(changed)


async def test_documents_cached_in_a_batch_encode_exactly_as_alone(model_dir: Path) -> None:
    docs = [Doc("c", "Ada Lovelace", "Augusta Ada King, Countess of Lovelace,  was an English mathematician.", 1.0),
            Doc("d", "Zürich", "Zürich is the largest city in Switzerland.\nIt lies on Lake Zürich.", 2.0)]
    alone = ChatTokenizer.load(model_dir).encode_information(docs)
    batched = ChatTokenizer.load(model_dir)
    await batched.cache_documents([docs, docs[1:]])
    batched.encode_tool = lambda text: pytest.fail(f"{text!r} was not cached")  # type: ignore[method-assign]
    assert batched.encode_information(docs) == alone
    assert batched.encode_information(docs[1:]) == ChatTokenizer.load(model_dir).encode_information(docs[1:])


async def test_verifier_spec_does_not_search(chat: ChatTokenizer) -> None:
    spec = RolloutSpec(final_open="<answer>", final_close="</answer>", search=False, temperature=0.0, max_new_tokens=9)
    gen = ScriptedGenerator(chat, [Turn("<answer>Paris</answer>", STOP_ANSWER)])
    ro = await RolloutRunner(gen, chat, None, RolloutConfig()).run([1, 2], spec, affinity="v")
    assert gen.calls[0][1].stop == ("</answer>",) and gen.calls[0][1].max_new_tokens == 9
    assert gen.calls[0][1].temperature == 0.0 and ro.end is EndReason.ANSWER
    await asyncio.sleep(0)


async def test_prefilled_opening_tag_is_prompt_and_opens_the_first_turn(chat: ChatTokenizer) -> None:
    spec = dataclasses.replace(SOLVER, prefill="<search>")
    messages = solver_messages("What is the capital of France?")
    prompt = await chat.render(messages, prefill=spec.prefill)
    assert prompt.tolist() == (await chat.render(messages)).tolist() + chat.encode_tool("<search>")

    async def run(*turns: Turn, spec: RolloutSpec = spec) -> Rollout:
        batcher = SearchBatcher(Docs(), SearchBatcherConfig(window_ms=0), k=2)
        try:
            return await RolloutRunner(ScriptedGenerator(chat, list(turns)), chat, batcher, RolloutConfig()).run(
                prompt, spec, affinity="p")
        finally:
            await batcher.close()

    ro = await run(Turn(" capital of France </search>", STOP_SEARCH), Turn("<answer> Paris </answer>", STOP_ANSWER))
    assert [s.query for s in ro.searches] == ["capital of France"] and ro.end is EndReason.ANSWER
    assert ro.prompt_ids.tolist() == prompt.tolist()  # the prefill is prompt: never in the response, never trained
    assert chat.decode(ro.response_ids[:ro.segments[0].end]) == " capital of France </search>"
    assert ro.generated_text.startswith("<search> capital of France </search>")
    check_alignment(ro, chat)
    # Only the first turn is opened by the prefill; a later closer without its own opener is still malformed.
    ro = await run(Turn(" a </search>", STOP_SEARCH), Turn(" b </search>", STOP_SEARCH))
    assert ro.end is EndReason.MALFORMED_SEARCH and [s.query for s in ro.searches] == ["a"]
    ro = await run(Turn("<|im_end|>", EOS))
    assert ro.end is EndReason.MISSING_CLOSER
    answer = dataclasses.replace(SOLVER, prefill="<answer>")
    ro = await run(Turn(" Paris </answer>", STOP_ANSWER), spec=answer)
    assert ro.end is EndReason.ANSWER and extract_answer(ro.generated_text) == "Paris"


async def test_later_prefills_open_the_turns_after_searches_as_tool_tokens(chat: ChatTokenizer) -> None:
    """The proposer scaffold: "<search>" opens turn 1 (prompt), then "<search>" and "<question>" open turns 2 and 3
    right after the information blocks, masked like them; the model writes only the query and question texts."""
    proposer = RolloutSpec(final_open="<question>", final_close="</question>", search=True, temperature=1.0,
                           prefill="<search>", later_prefills=("<search>", "<question>"))
    batcher = SearchBatcher(Docs(), SearchBatcherConfig(window_ms=0), k=2)
    gen = ScriptedGenerator(chat, [Turn(" rivers of Europe </search>", STOP_SEARCH),
                                   Turn(" Danube delta </search>", STOP_SEARCH),
                                   Turn(" Which river ends in a delta? </question>",
                                        FinishReason("stop", "</question>"))])
    try:
        ro = await RolloutRunner(gen, chat, batcher, RolloutConfig()).run([5, 6, 7], proposer, affinity="p")
    finally:
        await batcher.close()
    assert ro.end is EndReason.QUESTION and [s.query for s in ro.searches] == ["rivers of Europe", "Danube delta"]
    assert extract_question(ro.generated_text) == "Which river ends in a delta?"
    tool = [seg for seg in ro.segments if seg.kind == "tool"]
    for seg, opener in zip(tool, ("<search>", "<question>")):
        assert chat.decode(ro.response_ids[seg.start:seg.end]).endswith("</information>\n\n" + opener)
        assert set(ro.loss_mask[seg.start:seg.end]) == {0}
    check_alignment(ro, chat)
    # A turn the scaffold opened still ends the rollout when the model stops inside it.
    gen = ScriptedGenerator(chat, [Turn(" rivers </search>", STOP_SEARCH), Turn("<|im_end|>", EOS)])
    batcher = SearchBatcher(Docs(), SearchBatcherConfig(window_ms=0), k=2)
    try:
        ro = await RolloutRunner(gen, chat, batcher, RolloutConfig()).run([5, 6, 7], proposer, affinity="p")
    finally:
        await batcher.close()
    assert ro.end is EndReason.MISSING_CLOSER


def test_prefill_must_be_an_opening_tag_of_the_role() -> None:
    assert GameConfig(proposer_prefill="<search>", solver_prefill="<answer>", verifier_prefill="<answer>")
    with pytest.raises(ValueError, match="proposer_prefill = '<answer>'"):
        GameConfig(proposer_prefill="<answer>")
    with pytest.raises(ValueError, match="verifier_prefill = '<search>'"):
        GameConfig(verifier_prefill="<search>")
    assert GameConfig(proposer_scaffold=True, proposer_prefill="<search>")
    with pytest.raises(ValueError, match="proposer_prefill = '<think>' with proposer_scaffold = true"):
        GameConfig(proposer_scaffold=True, proposer_prefill="<think>")


async def test_turn_latency_counts_the_search_and_not_the_wait_for_a_server_slot(chat: ChatTokenizer) -> None:
    slot_s, server_s, search_s = 0.08, 0.02, 0.04

    class Timed(ScriptedGenerator):
        """A generator that waits slot_s for a slot and server_s for the server, and says so, as the pool does."""

        async def generate(self, input_ids: list[int], sampling: SamplingParams, *, affinity: str) -> GenerateResult:
            await asyncio.sleep(slot_s)
            started = time.perf_counter()
            await asyncio.sleep(server_s)
            result = await super().generate(input_ids, sampling, affinity=affinity)
            result.request_started_at = result.request_sent_at = started
            result.answer_received_at = time.perf_counter()
            return result

    class SlowDocs(Docs):
        async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
            await asyncio.sleep(search_s)
            return await super().search(queries, k)

    gen = Timed(chat, [Turn("<search>capital of France</search>", STOP_SEARCH), Turn("<answer>Paris</answer>",
                                                                                     STOP_ANSWER)])
    batcher = SearchBatcher(SlowDocs(), SearchBatcherConfig(window_ms=0), k=2)
    runner = RolloutRunner(gen, chat, batcher, RolloutConfig())
    try:
        ro = await runner.run(await chat.render(solver_messages("What is the capital of France?")), SOLVER,
                              affinity="ep-1")
    finally:
        await batcher.close()
    assert ro.end is EndReason.ANSWER and runner.turn_latency.count == runner.turn_slot_wait.count == 1
    [latency], [slot_wait] = runner.turn_latency.values(), runner.turn_slot_wait.values()
    assert search_s <= latency < search_s + 0.035, f"{latency:.3f} s: the search wait only (server and slot excluded)"
    assert slot_s <= slot_wait < slot_s + 0.035
