"""The model's chat template and tool-text encoding: the only places the engine turns text into token ids.

A prompt is rendered once with the tokenizer's own chat template (`apply_chat_template`, generation prompt added);
a tool result is encoded once without special tokens. Model output is never re-encoded: the rollout appends the
ids the server returned.

Encoding is the engine's largest cost per episode (prompts of hundreds to thousands of tokens, 1-5 ms apiece), so
text is encoded in cached pieces whose boundaries do not change the result: a rendered chat is split at its special
tokens (the tokenizer itself encodes the text between two special tokens independently, so the ids are exactly those
of encoding it whole: a system prompt is then encoded once per run), and documents, in search results and in
verifier prompts alike, at their `ssp.engine.prompts.doc_pieces` (a passage is encoded once per run). Pieces not cached
yet are encoded in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssp.engine.prompts import INFO_FOOTER, INFO_HEADER, NO_RESULTS, Message, doc_pieces
from ssp.retriever.protocol import Doc

DOC_CACHE_ENTRIES = 65536
"""Encoded document entries kept (popular passages come back in many searches)."""
PIECE_CACHE_ENTRIES = 4096
"""Encoded chat pieces kept (text between two special tokens: system prompts and instructions recur)."""
_DOCUMENTS_PLACEHOLDER = "\ue000ssp-documents\ue000"
"""Stands in for a verifier's documents while the chat template runs (private-use characters: no text has them)."""


class _IdsCache:
    """A bounded least-recently-used map from a key to token ids (an array: see ChatTokenizer's note)."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._ids: OrderedDict[Any, array[int]] = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        return key in self._ids

    def put(self, key: Any, ids: array[int]) -> None:
        self._ids[key] = ids
        self._ids.move_to_end(key)
        if len(self._ids) > self._entries:
            self._ids.popitem(last=False)

    def get(self, key: Any, encode: Callable[[], Sequence[int]]) -> array[int]:
        """The ids cached under `key`, else `array(encode())`, cached."""
        ids = self._ids.get(key)
        if ids is None:
            ids = array("l", encode())
            self.put(key, ids)
        else:
            self._ids.move_to_end(key)
        return ids


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer. Build it with `ChatTokenizer.load(model_dir)`.

    NOTE: ids that live long (a rendered prompt for a whole rollout, the document cache for the whole run) are kept
    in `array`s: the garbage collector walks every element of a list on each pass over it, and with thousands of
    rollouts in flight those walks stalled the event loop by tens of ms (`ssp bench engine`).
    """

    def __init__(self, tokenizer: Any) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template; the engine "
                             "renders prompts with the model's own template, so use an instruct/chat model")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast (Rust) tokenizer; "
                             "the engine needs one (tokenizer.json in the model directory)")
        self._tok = tokenizer
        self._backend = backend
        # Special tokens split the text before anything else is applied, unless they strip neighbouring spaces or
        # match normalized text: those stay inside the pieces and the backend handles them as usual.
        hard = [t.content for t in tokenizer.added_tokens_decoder.values()
                if t.special and not (t.lstrip or t.rstrip or t.single_word or t.normalized)]
        self._special_ids = {content: int(tokenizer.convert_tokens_to_ids(content)) for content in hard}
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(hard, key=len, reverse=True))) + ")")
                       if hard else None)
        self._pieces = _IdsCache(PIECE_CACHE_ENTRIES)
        self._fixed = {text: array("l", self.encode_tool(text))
                       for text in (INFO_HEADER, INFO_FOOTER, NO_RESULTS)}
        self._docs = _IdsCache(DOC_CACHE_ENTRIES)
        # A second Rust tokenizer for the worker thread (`_cache_missing`): the two threads never share one object.
        self._worker_backend = type(backend).from_str(backend.to_str())

    @classmethod
    def load(cls, model_dir: Path) -> ChatTokenizer:
        if not (model_dir / "tokenizer_config.json").exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer_config.json; point rollout.tokenizer_dir at the "
                                    "served model's Hugging Face directory (or run `ssp model prepare`)")
        return cls(_hf_tokenizer(str(model_dir.resolve())))

    async def render(self, messages: list[Message], *, prefill: str = "", documents: Sequence[Doc] = ()
                     ) -> array[int]:
        """Token ids of the chat up to and including the assistant's generation prompt, then `prefill`.

        Pieces not cached yet (a proposer's answer, a question) are encoded in a worker thread without the GIL, so
        the event loop keeps serving other rollouts meanwhile. `documents`: documents whose `render_docs` text the
        messages contain (a verifier's); the chat is also cut at their pieces, which come from the document cache
        (the passages were encoded when searches returned them), so thousands of tokens are not encoded again.

        The prefill (an opening tag such as "<search>", see `ssp.engine.prompts.PROPOSER_PREFILLS`) starts the
        assistant turn as part of the prompt: it is encoded once like tool text, carries no loss and no logprobs,
        and the model continues after it. The rollout's tag parsing reads it as the start of the first turn
        (`ssp.engine.rollout.RolloutSpec.prefill`)."""
        doc_parts = [p for p in doc_pieces(documents) if p]
        parts = self._template_parts(messages, "".join(doc_parts), doc_parts)
        known = set(doc_parts)
        await self._cache_missing((self._pieces, [p for p in parts if isinstance(p, str) and p not in known]),
                                  (self._docs, doc_parts))
        out: array[int] = array("l")
        for part in parts:
            if isinstance(part, int):
                out.append(part)
            else:
                cache = self._docs if part in known else self._pieces
                out.extend(cache.get(part, lambda: self._backend.encode(part, add_special_tokens=False).ids))
        if prefill:
            out.extend(self.encode_tool(prefill))
        return out

    def _template_parts(self, messages: list[Message], block: str, doc_parts: list[str]) -> list[str | int]:
        """The rendered chat as text pieces and special-token ids, with the documents' `block` cut into `doc_parts`.

        The template is rendered with a short placeholder in place of the block, which is then spliced back in as
        its pieces: a verifier's ~5k-token block is neither copied through the template nor searched for piece by
        piece (both scale with the block, and a sync step's verify phase renders hundreds at once). This assumes the
        template writes message contents verbatim, as chat templates do (ChatML: SmolLM2, Qwen2.5); where the
        placeholder does not come back exactly once, the chat is rendered whole and cut at the pieces instead."""
        if block:
            short = [{**m, "content": m["content"].replace(block, _DOCUMENTS_PLACEHOLDER)} for m in messages]
            text = self._tok.apply_chat_template(short, add_generation_prompt=True, tokenize=False)
            if text.count(_DOCUMENTS_PLACEHOLDER) == 1:
                before, after = text.split(_DOCUMENTS_PLACEHOLDER)
                return [*self._split_special(before), *doc_parts, *self._split_special(after)]
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        parts = self._split_special(text)
        return _cut_at(parts, doc_parts) if doc_parts else parts

    def _split_special(self, text: str) -> list[str | int]:
        """`text` cut at the hard special tokens: text pieces and the tokens' ids, empty pieces left out."""
        parts: list[str | int] = []
        for piece in self._split.split(text) if self._split is not None else [text]:
            special = self._special_ids.get(piece)
            if special is not None:
                parts.append(special)
            elif piece:
                parts.append(piece)
        return parts

    def encode_tool(self, text: str) -> list[int]:
        """Token ids of tool output inserted into the assistant turn (no BOS or other special tokens added)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_information(self, docs: Sequence[Doc]) -> array[int]:
        """Token ids of `ssp.engine.prompts.information_block(docs)`, built from separately encoded pieces.

        Each document piece (`ssp.engine.prompts.doc_pieces`) is encoded once and cached: tokenising a ~500-token block
        per search was the largest per-turn cost of the engine. The pieces are arrays, so joining them copies memory
        instead of making a Python int per token.
        """
        ids = array("l", self._fixed[INFO_HEADER])
        if not docs:
            ids += self._fixed[NO_RESULTS]
        for piece in doc_pieces(docs):
            ids += self._docs.get(piece, lambda: self.encode_tool(piece))
        ids += self._fixed[INFO_FOOTER]
        return ids

    async def cache_documents(self, results: Sequence[Sequence[Doc]]) -> None:
        """Encode the document pieces of a batch of search results that are not cached yet, in a worker thread.

        Why: a passage seen for the first time cost `encode_information` ~4 ms on the event loop (the p99 of a turn
        at 10k rollouts, `ssp bench scale`). The search batcher awaits this with every batch before it answers the
        searches, so the rollouts' own `encode_information` finds every piece cached; the Rust tokenizer runs the
        batch without the GIL, beside the loop. Pieces are inserted on the loop thread, the cache's only writer.
        """
        await self._cache_missing((self._docs, [p for docs in results for p in doc_pieces(docs)]))

    async def _cache_missing(self, *wanted: tuple[_IdsCache, Sequence[str]]) -> None:
        """Encode the pieces each cache lacks, all in one trip to a worker thread (without the GIL), then insert
        them from the loop."""
        todo = [(cache, p) for cache, pieces in wanted for p in dict.fromkeys(pieces) if p not in cache]
        if todo:
            encoded = await asyncio.to_thread(self._encode_batch, [p for _, p in todo])
            for (cache, piece), ids in zip(todo, encoded):
                cache.put(piece, ids)

    def _encode_batch(self, texts: list[str]) -> list[array[int]]:
        """Ids of each text, no special tokens added (runs in a worker thread, on the worker's own tokenizer)."""
        return [array("l", e.ids) for e in self._worker_backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept (for parsing and inspection only; never re-encoded)."""
        return str(self._tok.decode(list(ids), skip_special_tokens=False))


def _cut_at(parts: list[str | int], pieces: Sequence[str]) -> list[str | int]:
    """`parts` with its text cut at each of `pieces`, in order (where they occur: the rendered documents)."""
    out: list[str | int] = []
    todo = iter(pieces)
    want = next(todo, None)
    for part in parts:
        if isinstance(part, int) or want is None:
            out.append(part)
            continue
        pos = 0
        while want is not None:
            found = part.find(want, pos)
            if found < 0:
                break
            if found > pos:
                out.append(part[pos:found])
            out.append(want)
            pos = found + len(want)
            want = next(todo, None)
        if pos < len(part):
            out.append(part[pos:])
    return out


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(model_dir: str) -> Any:
    """One Hugging Face tokenizer per directory and process: loading one takes seconds (transformers imports torch),
    and engines, evaluations and tests in one process share it (it is only read)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
