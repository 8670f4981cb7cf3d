"""Request ids for SGLang `/generate`: unique within a process and never a prefix of one another.

Why fixed width: SGLang's `/abort_request` aborts every live request whose rid *starts with* the given string
(a prefix match), so with counters like "r-1" and "r-17" an abort of "r-1" would also kill "r-17". Every id made
here has the same length ("<12 hex>-<12 digits>", 25 characters), and two different strings of equal length are never
prefixes of one another. That also holds between generators: each draws its own random 12-hex-digit prefix, so two
pools in one process (or in two processes talking to one server) neither collide nor prefix each other.
"""

import itertools
import os

RID_LENGTH = 25
"""Length of every id: 12 hex digits, a dash, 12 decimal digits."""


class RequestIds:
    """A source of fresh request ids: `ids.next()` -> "3f9a0c41b2d7-000000000017".

    The counter gives uniqueness within one generator; the random prefix separates generators. 10^12 ids per
    generator is far beyond any run (a million requests a second for eleven days).
    """

    __slots__ = ("_prefix", "_counter")

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is None:
            prefix = os.urandom(6).hex()
        if len(prefix) != 12 or not prefix.isalnum():
            raise ValueError(f"request id prefix {prefix!r}: must be exactly 12 letters or digits, so that every id "
                             f"has the same length and none is a prefix of another; omit it for a random one")
        self._prefix = prefix
        self._counter = itertools.count()

    @property
    def prefix(self) -> str:
        return self._prefix

    def next(self) -> str:
        n = next(self._counter)
        if n >= 10**12:
            raise OverflowError("request id counter exhausted 10^12 ids; create a new RequestIds")
        return f"{self._prefix}-{n:012d}"
