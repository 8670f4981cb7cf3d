"""Prompt rendering in cached pieces gives exactly the ids of encoding the whole rendered chat."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssp.engine.chat import ChatTokenizer
from ssp.engine.prompts import information_block, proposer_messages, render_docs, solver_messages, verifier_messages
from ssp.retriever.protocol import Doc


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(model_dir)


ODD_TEXTS = ["Paris", "M.I.T.", "  leading and trailing  ", "new\n\nlines\n", "Zürich – 東京 🙂", "<b>tag</b>",
             "a<|im_end|>b", "tab\there", ""]


def _messages() -> list[list[dict[str, str]]]:
    docs = [Doc(id=str(i), title=f"T {t}", text=f"about {t}.\n more", score=1.0) for i, t in enumerate(ODD_TEXTS)]
    return ([proposer_messages(t, hops) for t in ODD_TEXTS for hops in (2, 4)]
            + [solver_messages(f"Who is {t}?") for t in ODD_TEXTS]
            + [verifier_messages(f"What is {t}?", docs[i:i + 3]) for i, t in enumerate(ODD_TEXTS)])


async def test_render_matches_the_chat_template_encoded_whole(chat: ChatTokenizer) -> None:
    tok = chat._tok  # the Hugging Face tokenizer the engine wraps: the reference
    for messages in _messages():
        whole = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        whole = whole["input_ids"] if hasattr(whole, "keys") else whole
        assert (await chat.render(messages)).tolist() == list(whole), messages
        assert (await chat.render(messages)).tolist() == list(whole)  # again, from the piece cache



def test_tool_text_is_encoded_as_the_hugging_face_tokenizer_does(chat: ChatTokenizer) -> None:
    for text in ODD_TEXTS:
        assert chat.encode_tool(text) == chat._tok.encode(text, add_special_tokens=False), text


CORPUS_LIKE = [Doc(id=str(i), title=t, text=x, score=1.0) for i, (t, x) in enumerate([
    ("Ed Wood", "Edward Davis Wood Jr. (October 10, 1924 – December 10, 1978) was an American filmmaker."),
    ("Galați", "Galați is a city in eastern Romania, on the Danube."),
    ("M.I.T.", "The Massachusetts Institute of Technology (MIT) is a private research university."),
    ("Zürich", "Zürich is the largest city in Switzerland; 東京 is not."),
])]


async def test_documents_are_cut_where_the_tokenizer_splits_anyway(chat: ChatTokenizer) -> None:
    """A verifier prompt rendered with its documents' cached pieces, and an information block, both give exactly
    the ids of encoding the whole text (SmolLM2's GPT-2-style pre-tokenizer splits at the same places)."""

    tok = chat._tok
    for docs in (CORPUS_LIKE, CORPUS_LIKE[:1], CORPUS_LIKE[::-1]):
        messages = verifier_messages("Which city lies on the Danube?", render_docs(docs))
        whole = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        whole = whole["input_ids"] if hasattr(whole, "keys") else whole
        assert (await chat.render(messages, documents=docs)).tolist() == list(whole)
        assert chat.encode_information(docs).tolist() == chat.encode_tool(information_block(docs))


async def test_documents_with_odd_text_still_decode_to_the_prompt(chat: ChatTokenizer) -> None:
    """Where a cut is not a pre-tokenizer boundary (leading spaces, empty passages) the ids may differ from the
    whole encoding, but they are a tokenization of the same text."""
    docs = [Doc(id=str(i), title=t, text=t, score=1.0) for i, t in enumerate(ODD_TEXTS)]
    messages = verifier_messages("What is it?", render_docs(docs))
    text = chat._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.decode(await chat.render(messages, documents=docs)) == text


async def test_the_template_runs_without_the_documents(chat: ChatTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verifier's documents do not go through the chat template (it copied ~5k tokens of text per prompt, hundreds
    at once in a sync step's verify phase): the template sees a placeholder, the pieces are spliced in after, and
    the ids are still those of encoding the whole chat. Where the block cannot be told apart (it occurs twice), the
    chat is rendered whole and gives the same ids."""
    tok = chat._tok
    expected = {}
    for twice in (False, True):
        block = render_docs(CORPUS_LIKE)
        messages = verifier_messages("Which city lies on the Danube?" + (f" {block}" if twice else ""), block)
        whole = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected[twice] = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    seen: list[str] = []
    original = type(tok).apply_chat_template

    def recording(self: object, conversation: list[dict[str, str]], **kw: object) -> object:
        seen.extend(m["content"] for m in conversation)
        return original(self, conversation, **kw)

    monkeypatch.setattr(type(tok), "apply_chat_template", recording)
    for twice in (False, True):
        seen.clear()
        block = render_docs(CORPUS_LIKE)
        messages = verifier_messages("Which city lies on the Danube?" + (f" {block}" if twice else ""), block)
        assert (await chat.render(messages, documents=CORPUS_LIKE)).tolist() == expected[twice]
        assert any(block in content for content in seen) == twice
