"""Small asyncio helpers shared by the game and the scheduler."""

from __future__ import annotations

import asyncio
import gc
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


def freeze_startup_objects() -> None:
    """Exclude everything alive now (imported modules: transformers pulls in torch, sympy, ...) from the garbage
    collector's future full collections.

    NOTE: without it a full (generation 2) collection walks those millions of long-lived objects and stalls the event
    loop for about a second (measured by `ssp bench engine`); call it once, after set-up and before the run.
    """
    gc.collect()
    gc.freeze()
