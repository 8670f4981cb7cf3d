"""What the simulated server says: SSP-shaped turns as real token ids of the served tokenizer, without a model.

Design (how the engine decodes sim output): the sim serves the ids of a REAL tokenizer (by default the prepared
SmolLM2-135M-Instruct one, whose path /model_info reports as tokenizer_path), so the engine tokenizes prompts and
decodes outputs exactly as it does against a real server, and finds `<search>`, `<answer>` and `<question>` tags in
the decoded text. Every output is a concatenation of snippets (tags, filler words, the sim's EOS) tokenized once at
start-up; the response `text` is the concatenation of their per-token strings, so no detokenizer runs per request.

Which turn of which role a request is, is read from its prompt: from the last `PROMPT_TAIL_TOKENS` tokens before the
first assistant header (the end of the last user message, where engine/prompts.py puts the markers and the
question), decoded once per distinct tail and cached. Not the whole prompt: a verifier prompt carries ~5k tokens of
documents, and decoding them on every new prompt was the largest part of a sim server's own CPU when a sync step's
verify phase sent hundreds of them at once (`ssp bench async-vs-sync`).

- role: "proposer" if the prompt text (before the first assistant header) contains `SimSpec.proposer_marker`,
  "verifier" if it contains `SimSpec.verifier_marker` (any case), else "solver" (engine/prompts.py keeps both).
- searches so far: the number of `</search>` after the first assistant header (earlier turns are in the prompt,
  since the engine appends output ids verbatim). The turn ends in a search with the hazard of the role's
  search-count distribution, so a rollout's number of searches follows `search_weights` exactly, without the
  server keeping per-rollout state. With `turn_cap_no_answer_p` a rollout keeps searching up to the turn cap.
- lengths: lognormal per turn (`gen_turn`, `gen_final`), and a per-turn runaway that fills max_new_tokens.
- answers: the proposer's given answer (`answer_pattern`) is remembered with the question the sim writes; a later
  solver or verifier prompt whose `question_pattern` finds that question answers it correctly with probability
  `correct_answer_p`, so benches see valid proposals and a mix of rewards.
"""

from __future__ import annotations

import json
import math
import random
import re
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ssp.serving.backend import Finish, SamplingOptions
from ssp.serving.sim_profile import LogNormal, RoleShape, ShapesSpec, SimSpec

Role = Literal["proposer", "solver", "verifier"]

_FILLER = (
    "the first second answer question search result document article page mentions states that which where when "
    "who because so then therefore maybe likely seems check verify year born film river city country born founded "
    "known famous author director team album song war king queen capital population located near north south east "
    "west located between after before during about many most some other another same different found shows lists "
    "need more information look again compare both names dates places clue hint step next finally consider also "
    "however although while since thus hence indeed perhaps possibly clearly directly based on from with into over "
    "under and or but not only this that these those it its their his her they we I"
).split()
_NAMES = ("Paris London Berlin Rome Madrid Vienna Prague Lisbon Dublin Oslo Amazon Nile Danube Everest Kilimanjaro "
          "Newton Darwin Curie Einstein Tesla Mozart Bach Picasso Monet Shakespeare Dickens Austen Tolstoy").split()

_ASSISTANT_MARKER = "<|im_start|>assistant"
"""Chat-template header of an assistant turn (ChatML: SmolLM2, Qwen2.5); what comes after it is the rollout."""

PROMPT_TAIL_TOKENS = 512
"""Tokens before the first assistant header that the sim reads to tell the role, the answer and the question."""
_PROMPT_CACHE_ENTRIES = 50_000
_MEMORY_ENTRIES = 200_000


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the sim uses."""

    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """The whole output of one request, decided when it arrives: the server then only times its emission."""

    role: Role
    output_ids: list[int]
    finish: Finish
    text_pieces: list[str]
    """Per-token text of output_ids (joined for the response text)."""


@dataclass(frozen=True, slots=True)
class _PromptFacts:
    role: Role
    answer: str | None
    """Proposer: the answer it must write a question for."""
    remembered_answer: str | None
    """Solver/verifier: the answer of the question in the prompt, if the sim wrote that question."""


class SimText:
    """Plans SSP-shaped outputs as token ids of `tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, *, shapes: ShapesSpec, spec: SimSpec, rng: random.Random) -> None:
        self._tok = tokenizer
        self._shapes = shapes
        self._spec = spec
        self._rng = rng
        self.eos_id = int(tokenizer.eos_token_id)
        self._pieces: dict[int, str] = {}
        self._snippets: dict[str, list[int]] = {}
        for tag in ("<think>", "</think>\n", "<search>", " </search>", "<answer>", " </answer>", "<question>",
                    " </question>"):
            self._snippet(tag)
        self._words = [self._snippet(" " + w) for w in _FILLER]
        self._names = [self._snippet(" " + w) for w in _NAMES]
        self._marker = as_token_bytes(tokenizer.encode(_ASSISTANT_MARKER, add_special_tokens=False))
        self._search_close = as_token_bytes(self._snippets[" </search>"])
        self._proposer_answer = re.compile(spec.answer_pattern)
        self._question = re.compile(spec.question_pattern)
        self._prompt_facts: OrderedDict[bytes, _PromptFacts] = OrderedDict()
        self._memory: OrderedDict[str, str] = OrderedDict()
        """Question text (normalised) -> the answer the proposer was given."""
        self._shared = spec.shared_memory_file
        self._shared_offset = 0
        """Bytes of the shared memory file already read."""

    def _snippet(self, text: str) -> list[int]:
        ids = self._snippets.get(text)
        if ids is None:
            ids = self._tok.encode(text, add_special_tokens=False)
            self._snippets[text] = ids
            for t in ids:
                if t not in self._pieces:
                    self._pieces[t] = self._tok.decode([t], skip_special_tokens=False)
        return ids

    def piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return piece

    # ---------------------------------------------------------------- reading the prompt

    def _facts(self, input_ids: list[int], raw: bytes) -> tuple[int, _PromptFacts]:
        """(searches so far, prompt facts) of a request; `raw` is `as_token_bytes(input_ids)`."""
        start = _find_aligned(raw, self._marker, 0)
        end = len(raw) if start < 0 else start
        tail_start = max(0, end - 4 * PROMPT_TAIL_TOKENS)
        tail = raw[tail_start:end]
        facts = self._prompt_facts.get(tail)
        if facts is None:
            facts = self._read_prompt(input_ids[tail_start // 4:end // 4])
            self._prompt_facts[tail] = facts
            if len(self._prompt_facts) > _PROMPT_CACHE_ENTRIES:
                self._prompt_facts.popitem(last=False)
        else:
            self._prompt_facts.move_to_end(tail)
        searches = 0 if start < 0 else _count_aligned(raw, self._search_close, start)
        return searches, facts

    def _read_prompt(self, prompt_ids: list[int]) -> _PromptFacts:
        text = self._tok.decode(prompt_ids, skip_special_tokens=False)
        if self._spec.proposer_marker and self._spec.proposer_marker in text:
            m = self._proposer_answer.search(text)
            return _PromptFacts("proposer", m.group(1).strip() if m else None, None)
        questions = self._question.findall(text)  # the last one: a verifier prompt puts documents first
        remembered = self._recall(_normalise(questions[-1])) if questions else None
        marker = self._spec.verifier_marker.lower()
        return _PromptFacts("verifier" if marker and marker in text.lower() else "solver", None, remembered)

    # ---------------------------------------------------------------- writing the output

    def plan(self, input_ids: list[int], sampling: SamplingOptions, *, token_bytes: bytes | None = None) -> TurnPlan:
        """Decide the output of one request (a turn of a rollout) from its prompt and sampling options.
        `token_bytes`: `as_token_bytes(input_ids)` if the caller has it already (packed once per request)."""
        raw = token_bytes if token_bytes is not None else as_token_bytes(input_ids)
        searches, facts = self._facts(input_ids, raw)
        role = facts.role
        budget = sampling.max_new_tokens
        if role == "verifier":
            body = self._answer_body(facts.remembered_answer)
            ids = self._compose(self._lognormal(self._shapes.rag_verify.gen), "<answer>", body, " </answer>")
            return self._finish(role, ids, " </answer>", sampling, budget)
        shape = self._shapes.proposer if role == "proposer" else self._shapes.solver
        if self._rng.random() < shape.runaway_p_per_turn:
            ids = self._snippets["<think>"] + self._filler(budget)
            return self._finish(role, ids, None, sampling, budget)
        if self._searches_again(shape, searches):
            query = [t for _ in range(self._rng.randint(2, 6)) for t in self._rng.choice(self._words)]
            ids = self._compose(self._lognormal(shape.gen_turn), "<search>", query, " </search>")
            return self._finish(role, ids, " </search>", sampling, budget)
        if role == "proposer":
            question, question_text = self._question_body()
            if facts.answer is not None:
                self._remember(question_text, facts.answer)
            ids = self._compose(self._lognormal(shape.gen_final), "<question>", question, " </question>")
            return self._finish(role, ids, " </question>", sampling, budget)
        body = self._answer_body(facts.remembered_answer)
        ids = self._compose(self._lognormal(shape.gen_final), "<answer>", body, " </answer>")
        return self._finish(role, ids, " </answer>", sampling, budget)

    def _searches_again(self, shape: RoleShape, searches: int) -> bool:
        """Hazard of the search-count distribution: P(search now | `searches` done), with the no-answer tail."""
        cap = self._shapes.max_assistant_turns
        p_cap = shape.turn_cap_no_answer_p
        total = sum(shape.search_weights)
        weights = [w / total * (1 - p_cap) for w in shape.search_weights[:cap]]
        weights += [0.0] * (cap - len(weights)) + [p_cap]  # index cap: searches in every allowed turn
        if searches >= cap:
            return True
        tail = sum(weights[searches:])
        return tail > 0 and self._rng.random() >= weights[searches] / tail

    def _lognormal(self, dist: LogNormal) -> int:
        return max(1, round(dist.median * math.exp(dist.sigma * self._rng.gauss(0.0, 1.0))))

    def _filler(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:  # words are 1-2 tokens: one draw of n words almost always suffices
            out += [t for word in self._rng.choices(self._words, k=n - len(out)) for t in word]
        return out[:n]

    def _compose(self, length: int, open_tag: str, body: list[int], close_tag: str) -> list[int]:
        """<think> filler </think> OPEN body CLOSE, with the filler sized so the whole is about `length` tokens."""
        fixed = (self._snippets["<think>"], self._snippets["</think>\n"], self._snippets[open_tag], body,
                 self._snippets[close_tag])
        filler = self._filler(max(1, length - sum(len(part) for part in fixed)))
        return [*fixed[0], *filler, *fixed[1], *fixed[2], *fixed[3], *fixed[4]]

    def _question_body(self) -> tuple[list[int], str]:
        words = [self._rng.choice(self._words) for _ in range(self._rng.randint(8, 14))]
        ids = [*self._snippet(" Which"), *(t for w in words for t in w), *self._snippet("?")]
        return ids, "".join(self.piece(t) for t in ids)

    def _answer_body(self, remembered: str | None) -> list[int]:
        if remembered is not None and self._rng.random() < self._spec.correct_answer_p:
            return self._tok.encode(" " + remembered, add_special_tokens=False)
        return [t for _ in range(self._rng.randint(1, 3)) for t in self._rng.choice(self._names)]

    def _remember(self, question_text: str, answer: str) -> None:
        question = _normalise(question_text)
        self._memory[question] = answer
        if len(self._memory) > _MEMORY_ENTRIES:
            self._memory.popitem(last=False)
        if self._shared is not None:
            with self._shared.open("a", encoding="utf-8") as f:  # one small O_APPEND write: lines do not interleave
                f.write(json.dumps([question, answer]) + "\n")

    def _recall(self, question: str) -> str | None:
        answer = self._memory.get(question)
        if answer is None and self._shared is not None:
            self._read_shared()
            answer = self._memory.get(question)
        return answer

    def _read_shared(self) -> None:
        """Take in the lines other servers appended since the last read (a line still being written waits)."""
        try:
            with self._shared.open("rb") as f:  # type: ignore[union-attr]
                f.seek(self._shared_offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._shared_offset += end
        for line in data[:end].splitlines():
            question, answer = json.loads(line)
            self._memory[question] = answer
        while len(self._memory) > _MEMORY_ENTRIES:
            self._memory.popitem(last=False)

    def _finish(self, role: Role, ids: list[int], close_tag: str | None, sampling: SamplingOptions,
                budget: int) -> TurnPlan:
        """Apply the request's stop rules and budget to a planned turn: stop string, else EOS, else run on."""
        stop_string = close_tag.strip() if close_tag else None
        finish: Finish
        if close_tag is not None and stop_string in sampling.stop:
            finish = Finish("stop", matched=stop_string)
        elif close_tag is not None and not sampling.ignore_eos:
            ids = [*ids, self.eos_id]
            finish = Finish("stop", matched=self.eos_id)
        else:  # a runaway turn, or no way to stop: generate to the budget
            ids = ids + self._filler(budget - len(ids)) if len(ids) < budget else ids
            finish = Finish("length", length=budget)
        if len(ids) < sampling.min_new_tokens:  # EOS is suppressed until min_new_tokens: think longer first
            pad = self._filler(sampling.min_new_tokens - len(ids))
            ids = [*self._snippets["<think>"], *pad, *ids[len(self._snippets["<think>"]):]]
        if len(ids) > budget:
            ids = ids[:budget]
            finish = Finish("length", length=budget)
        return TurnPlan(role, ids, finish, [self.piece(t) for t in ids])

    def render(self, plan: TurnPlan, n_tokens: int, sampling: SamplingOptions, finished: Finish | None) -> str:
        """The response text of the first `n_tokens` of a plan, trimmed like SGLang (stop string/EOS, specials)."""
        pieces = plan.text_pieces[:n_tokens]
        ids = plan.output_ids[:n_tokens]
        if finished is not None and finished.type == "stop" and not sampling.no_stop_trim and ids:
            if isinstance(finished.matched, int):
                pieces = pieces[:-1]
            elif isinstance(finished.matched, str):
                text = "".join(pieces)
                return text[: len(text) - len(finished.matched)] if text.endswith(finished.matched) else text
        if sampling.skip_special_tokens:
            pieces = [p for p, t in zip(pieces, ids) if t != self.eos_id]
        return "".join(pieces)


class TokenizerFile:
    """A Hugging Face tokenizer read with the `tokenizers` library: the same ids as transformers' fast tokenizer,
    without importing transformers (seconds), so a sim server starts in about a second."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; the sim serves the ids of a Hugging Face tokenizer: pass "
                                    f"a model directory with tokenizer.json (e.g. run `ssp model prepare`)")
        self._tok = RustTokenizer.from_file(str(path))
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eos_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None
        if eos_id is None:
            raise ValueError(f"{model_dir / 'tokenizer_config.json'}: eos_token {eos!r} is not a token of "
                             f"tokenizer.json; the sim needs an EOS token to end turns")
        self.eos_token_id = eos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


def as_token_bytes(ids: list[int]) -> bytes:
    """Token ids as packed int32, so subsequence search runs in C (bytes.find) instead of a Python loop."""
    return array("i", ids).tobytes()


def _find_aligned(haystack: bytes, needle: bytes, start: int) -> int:
    """Byte offset of the first occurrence of `needle` at a token boundary (offset % 4 == 0), or -1."""
    if not needle:
        return -1
    pos = haystack.find(needle, start)
    while pos >= 0 and pos % 4:
        pos = haystack.find(needle, pos + 1)
    return pos


def _count_aligned(haystack: bytes, needle: bytes, start: int) -> int:
    count = 0
    pos = _find_aligned(haystack, needle, start)
    while pos >= 0:
        count += 1
        pos = _find_aligned(haystack, needle, pos + len(needle))
    return count


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?. ")
