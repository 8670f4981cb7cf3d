"""Judge plug-ins for tests/engine/test_judge.py, loaded as "example_judges:ClassName" (the seam a user's package
uses)."""

from __future__ import annotations

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


class NumberWords:
    """A user's judge: accepts a number written in words for its digits ("three" for "3"), which EM misses."""

    def __init__(self, case_sensitive: bool = False) -> None:
        self.case_sensitive = case_sensitive
        self.closed = False
        self.asked = 0

    async def judge(self, question: str, prediction: str, aliases: tuple[str, ...]) -> bool:
        self.asked += 1
        word = prediction.strip() if self.case_sensitive else prediction.strip().lower()
        return NUMBER_WORDS.get(word) in {a.strip() for a in aliases}

    async def close(self) -> None:
        self.closed = True


class Flaky:
    """A judge whose service is down: every call raises."""

    async def judge(self, question: str, prediction: str, aliases: tuple[str, ...]) -> bool:
        raise ConnectionError("judge service unreachable")


class Sloppy:
    """A broken plug-in: it answers "yes" instead of a bool."""

    async def judge(self, question: str, prediction: str, aliases: tuple[str, ...]) -> str:
        return "yes"


class NotAsync:
    """A broken plug-in: its judge is not a coroutine function."""

    def judge(self, question: str, prediction: str, aliases: tuple[str, ...]) -> bool:
        return True
