"""The retriever room's exceptions: one tree, so callers catch exactly the level they can handle.

    RetrieverError                    base of everything raised on purpose by retriever/
    ├── CorpusError                   a corpus file is unreadable or a line is malformed (file:line named)
    ├── IndexBuildError               `ssp index build` cannot write its output (exists, bad --out, ...)
    ├── IndexOpenError                a directory is not a complete ssp index (missing, partial, other format)
    ├── RetrieverClosedError          search() after close(): a bug in the caller
    ├── RetrieverLoadError            `retriever.kind` names no usable retriever (module, class, protocol)
    ├── RetrieverRequestError         the server rejected the request (4xx): retrying cannot help
    ├── RetrieverProtocolError        the server answered something that is not Search-R1 /retrieve
    └── RetrieverUnavailableError     connection refused, timeout or 5xx, still failing after the retries

Only `RetrieverUnavailableError` is `retryable`: the engine may back off and try the episode again later; every
other error is fatal for the run (fix the config, the data or the caller).
"""

from typing import ClassVar


class RetrieverError(Exception):
    """Base of the room's errors. `retryable` says whether the same call may succeed later unchanged."""

    retryable: ClassVar[bool] = False


class CorpusError(RetrieverError):
    """A corpus file cannot be read, or one of its lines is not a passage; the message names file and line."""


class IndexBuildError(RetrieverError):
    """An index cannot be built where asked (the output exists, is not a directory we may replace, ...)."""


class IndexOpenError(RetrieverError):
    """The directory is not a complete ssp Tantivy index: missing, left over from an interrupted build, or foreign."""


class RetrieverClosedError(RetrieverError):
    """The retriever was closed; create a new one instead of reusing it."""


class RetrieverLoadError(RetrieverError):
    """`retriever.kind` could not be turned into a Retriever (unknown name, missing module or class, wrong shape)."""


class RetrieverRequestError(RetrieverError):
    """The retrieval server answered 4xx: the request breaks one of its rules (the message quotes the server)."""


class RetrieverProtocolError(RetrieverError):
    """The retrieval server's answer is not the Search-R1 /retrieve shape (wrong URL, or not a retrieval server)."""


class RetrieverUnavailableError(RetrieverError):
    """The retrieval server could not be reached or kept failing (connection error, timeout, 5xx) after retries."""

    retryable: ClassVar[bool] = True
