"""A small prefix cache: the KV of finished requests, reused by later requests that start with the same tokens.

Multi-turn rollouts resend the whole conversation every turn (prompt + previous output + tool result), so the
next turn's prompt starts with a finished request's tokens. Reusing that KV turns an O(conversation) prefill into
an O(new tokens) one. Entries are whole sequences (no radix tree: a linear scan over a few dozen entries is cheap
next to a forward pass), evicted least-recently-used to stay under a token budget. Computed with the weights of
the moment: `clear()` on every weight update / flush, as SGLang flushes its radix cache.

Legend: H = KV heads, T = cached tokens, D = head dim.
"""

from __future__ import annotations

import collections

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each (1, H, T, D)."""

MIN_MATCH = 8
"""Shorter shared prefixes are not worth a cache rebuild."""


class PrefixCache:
    """LRU map from token sequences to their KV, bounded by `capacity_tokens` (0 disables it)."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], KV] = collections.OrderedDict()
        self._tokens = 0

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def insert(self, tokens: list[int], kv: KV) -> None:
        """Keep `kv` (covering exactly `tokens`), evicting the least recently used entries to fit."""
        key = tuple(tokens)
        if not self.capacity_tokens or len(key) < MIN_MATCH or len(key) > self.capacity_tokens:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        # An entry that is a prefix of the new one is now redundant.
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)
        self._entries[key] = [(k.clone(), v.clone()) for k, v in kv]
        self._tokens += len(key)
        while self._tokens > self.capacity_tokens:
            self._drop(next(iter(self._entries)))

    def lookup(self, tokens: list[int]) -> tuple[int, KV | None]:
        """The longest cached prefix of `tokens`, at most len(tokens) - 1 long (one token must still run):
        (length, KV cropped to it), or (0, None)."""
        best, best_key = 0, None
        limit = len(tokens) - 1
        for key in self._entries:
            n = _common_prefix(key, tokens, limit)
            if n > best:
                best, best_key = n, key
        if best < MIN_MATCH or best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self._tokens -= len(key)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0 or a[0] != b[0]:
        return 0
    if list(a[:n]) == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] holds; find the first mismatch by bisection on slices
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if list(a[:mid]) == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
