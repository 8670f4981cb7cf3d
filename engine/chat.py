"""The model's chat template and tool-text encoding: the only places the engine turns text into token ids.

A prompt is rendered once with the tokenizer's own chat template (`apply_chat_template`, generation prompt added);
a tool result is encoded once without special tokens. Model output is never re-encoded: the rollout appends the
ids the server returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.prompts import Message


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer. Build it with `ChatTokenizer.load(model_dir)`."""

    def __init__(self, tokenizer: Any) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template; the engine "
                             "renders prompts with the model's own template, so use an instruct/chat model")
        self._tok = tokenizer

    @classmethod
    def load(cls, model_dir: Path) -> ChatTokenizer:
        from transformers import AutoTokenizer

        if not (model_dir / "tokenizer_config.json").exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer_config.json; point rollout.tokenizer_dir at the "
                                    "served model's Hugging Face directory (or run `ssp model prepare`)")
        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of the chat up to and including the assistant's generation prompt."""
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_tool(self, text: str) -> list[int]:
        """Token ids of tool output inserted into the assistant turn (no BOS or other special tokens added)."""
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens kept (for parsing and inspection only; never re-encoded)."""
        return str(self._tok.decode(ids, skip_special_tokens=False))
