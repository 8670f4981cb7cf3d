"""Small asyncio helpers shared by the game and the scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines concurrently; if one fails, cancel the rest and raise the first failure itself (not an
    ExceptionGroup), so callers catch the same errors as for a single call."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first  # NOTE: not `from None`, which would erase the failure's own __cause__
    return [t.result() for t in tasks]
