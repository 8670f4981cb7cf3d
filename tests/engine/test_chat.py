"""Prompt rendering in cached pieces gives exactly the ids of encoding the whole rendered chat."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.chat import ChatTokenizer
from engine.prompts import proposer_messages, solver_messages, verifier_messages
from retriever.protocol import Doc


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
