"""Errors of the inference layer (client and pool), one tree so callers catch exactly what they can handle.

    InferenceError                 every failure talking to an inference server; carries `url` and the server's message
    ├── RetryableError             the same request may succeed later or elsewhere
    │   ├── ConnectionFailed       no answer: refused, reset, closed mid-response (`may_be_running` tells which)
    │   ├── RequestTimeout         no answer within the configured timeout (the request may still be running)
    │   ├── ServerOverloaded       HTTP 503 (queue full, waiting/running time limit); the server dropped the request
    │   └── NoServerAvailable      pool: no healthy server had a free slot within the queue timeout
    └── FatalError                 retrying the same request cannot help
        ├── BadRequest             HTTP 400: the server rejected the request (too long, bad sampling value, ...)
        ├── ServerError            HTTP 5xx other than 503 (a server bug), or another unexpected status
        └── ProtocolError          a 200 answer that breaks the protocol (bad JSON, misaligned output lists)

Retry rule, by SGLang's status: 400 -> never retry; 503 -> retry, the old rid is gone; connection errors and timeouts ->
the request may still run on the server, so abort its rid there before re-sending under a new rid.
"""


class InferenceError(Exception):
    """A failed call to an inference server. `message` is the server's own text where it sent one."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        self.message = message
        self.url = url
        self.status = status
        where = f"{url} (HTTP {status})" if status is not None else url
        super().__init__(f"{where}: {message}")


class RetryableError(InferenceError):
    """The request did not complete but may succeed when re-sent (to this or another server)."""

    may_be_running: bool = False
    """True when the server may still be generating for this rid; abort it there before re-sending."""


class ConnectionFailed(RetryableError):
    """No HTTP answer: the connection was refused, reset, or closed before the response was complete."""

    def __init__(self, message: str, *, url: str, may_be_running: bool) -> None:
        super().__init__(message, url=url)
        self.may_be_running = may_be_running


class RequestTimeout(RetryableError):
    """No complete answer within the timeout; the server may still be working on the request."""

    may_be_running = True


class ServerOverloaded(RetryableError):
    """HTTP 503: the server refused or dropped the request (queue full, time limit). Nothing is left running."""


class NoServerAvailable(RetryableError):
    """The pool could not place a request: every server was ejected or full for the whole queue timeout."""


class FatalError(InferenceError):
    """Re-sending the same request cannot succeed; the caller must change it or stop."""


class BadRequest(FatalError):
    """HTTP 400: the server rejected the request; `message` is its reason (e.g. prompt longer than the context)."""


class ServerError(FatalError):
    """HTTP 5xx other than 503, or any other unexpected status: a server-side bug."""


class ProtocolError(FatalError):
    """A 200 answer that does not follow the SGLang protocol (unparseable, or lists that do not line up)."""
