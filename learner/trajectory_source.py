"""Read the engine's trajectory stream: one frame per episode, from a file of frames or a TCP connection.

Framing (engine/wire.py, shared with the engine's writer): each frame is a 4-byte big-endian unsigned length N
followed by N bytes, the msgpack payload of `ssp.engine.trajectory.pack_group` (the trajectories of one episode), with N
at most stream.max_frame_bytes, the one limit both ends read from the [stream] section.

    +----------------+---------------------------+
    | N (uint32, BE) | pack_group(...) (N bytes) |   repeated
    +----------------+---------------------------+

A file source can resume at a byte offset (recorded in the learner's checkpoint); a TCP stream cannot be rewound,
so the trainer also records consumed group ids and skips any group it sees again. Over TCP the learner listens
(`tcp://HOST:PORT`) and the engine connects (engine/stream.py, [stream] host/port); before the first frame the
engine must pass the handshake (engine/wire.py: the run's key, run id, frame limit). The first engine to pass it
is the only one: every other peer, before or after, is refused with its reason logged, and the engine's connection
is never touched by them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from ssp.engine.config import MAX_FRAME_BYTES, StreamConfig
from ssp.engine.wire import HEADER, FrameError, HandshakeError, Terms, challenge, read_frame, send_verdict, terms_of

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_HANDSHAKING = 16
"""Peers handshaking at once; more are refused at once, so a flood of idle connections cannot pile up."""
LOGGED_REFUSALS = 20
"""Refusals logged one by one; after that every 100th, with the count (a port scan must not flood the log)."""


class StreamError(ValueError):
    """The stream cannot be trained on: broken framing, an oversized frame, a silent engine, or a frame that is not
    a valid trajectory group; the message names the source and the byte offset."""


class FrameSource(Protocol):
    """A source of frame payloads. `offset` is the byte position after the last frame returned."""

    name: str
    offset: int

    def next_frame(self) -> bytes | None:
        """The next payload, or None when the stream has ended cleanly (EOF exactly at a frame boundary)."""
        ...

    def close(self) -> None:
        """Release the file or socket."""
        ...


class _FileFrames:
    """Frames read from a file of frames."""

    def __init__(self, f: BinaryIO, name: str, offset: int, max_frame_bytes: int) -> None:
        self._f = f
        self._max = max_frame_bytes
        self.name = name
        self.offset = offset

    def _read_exact(self, n: int, what: str) -> bytes | None:
        buf = self._f.read(n)
        if len(buf) < n:
            if not buf and what == "header":
                return None
            raise StreamError(f"{self.name}: stream ends inside a frame {what} at byte {self.offset} "
                              f"({len(buf)} of {n} bytes); the writer was cut off, drop the torn tail")
        return buf

    def next_frame(self) -> bytes | None:
        header = self._read_exact(HEADER.size, "header")
        if header is None:
            return None
        (n,) = HEADER.unpack(header)
        if n > self._max:
            raise StreamError(f"{self.name}: frame length {n} at byte {self.offset} exceeds {self._max} "
                              "(stream.max_frame_bytes); this is not a trajectory stream (expected 4-byte "
                              "big-endian length + msgpack), or raise the limit if the frame is real")
        payload = self._read_exact(n, "payload")
        assert payload is not None
        self.offset += HEADER.size + n
        return payload

    def close(self) -> None:
        self._f.close()


def open_file_source(path: Path, offset: int = 0, max_frame_bytes: int = MAX_FRAME_BYTES) -> FrameSource:
    """Frames from a file, starting at byte `offset` (a frame boundary recorded by a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} does not exist; write one with the engine "
                                "(`ssp rollout`) or listen for the engine with tcp://HOST:PORT")
    size = path.stat().st_size
    if offset > size:
        raise StreamError(f"{path}: resume offset {offset} is past the end of the file ({size} bytes); "
                          "the checkpoint belongs to a different trajectory file")
    f = path.open("rb")
    f.seek(offset)
    return _FileFrames(f, str(path), offset, max_frame_bytes)


class TcpFrames:
    """The learner's trajectory listener: waits for the engine, then reads its frames when the trainer asks.

    Why a thread with its own event loop: the trainer is synchronous (rank 0 reads a batch between steps), but the
    listener must answer other peers at any time (handshake them, refuse them, log why) without ever touching the
    engine's connection. The loop thread does all socket work; `next_frame` hands it one read and waits for the
    result, so the engine's socket is read only as fast as the trainer consumes (back-pressure stays with TCP).
    """

    def __init__(self, host: str, port: int, terms: Terms, *, read_timeout_s: float,
                 accept_timeout_s: float = 600.0) -> None:
        self.name = f"tcp://{host}:{port}"
        self.offset = 0
        self.refused = 0
        """Peers refused so far (their reasons are logged)."""
        self._terms = terms
        self._read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None
        self._engine: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._handshaking: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trajectory-listener", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen(host, port))
            self._reader, _ = self._call(self._wait_for_engine(accept_timeout_s))
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _listen(self, host: str, port: int) -> None:
        self._engine = self._loop.create_future()
        self._server = await asyncio.start_server(self._on_peer, host, port)

    async def _wait_for_engine(self, timeout_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self._engine is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._engine), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no engine passed the handshake at {self.name} within {timeout_s} s ({self.refused} "
                               "peer(s) refused, reasons in the log); start the engine with stream.host/stream.port "
                               "pointing here and this run's key (stream.key_file, or $SSP_RUN_KEY)") from None

    async def _on_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connecting peer: the first to pass the handshake becomes the engine; every other one is refused.

        A peer is refused only after its handshake (so a second engine hears why, while a peer without the key
        hears only that its key is wrong), except beyond MAX_HANDSHAKING at once: those are closed unanswered."""
        assert self._engine is not None
        peer = _address(writer)
        if len(self._handshaking) >= MAX_HANDSHAKING:
            self._note_refusal(peer, f"{MAX_HANDSHAKING} other peers are handshaking; closed unanswered")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)
        try:
            await challenge(reader, writer, self._terms)
        except HandshakeError as e:
            await self._refuse(writer, peer, str(e))
            return
        except asyncio.CancelledError:  # the learner is closing
            writer.close()
            raise
        finally:
            self._handshaking.discard(task)
        if self._engine.done():
            await self._refuse(writer, peer, "an engine is already streaming to this learner (one engine per run)")
            return
        self._engine.set_result((reader, writer))  # claimed before any await: no second peer can claim it
        log.info("%s: engine %s passed the handshake (run %r); streaming", self.name, peer, self._terms.run_id)
        try:
            await send_verdict(writer, None)
        except OSError as e:  # the engine went away at once; the first read reports it
            log.warning("%s: could not send the verdict to the engine %s: %s", self.name, peer, e)

    def _note_refusal(self, peer: str, reason: str) -> None:
        self.refused += 1
        if self.refused <= LOGGED_REFUSALS or self.refused % 100 == 0:
            log.warning("%s: refused %s (refusal %d): %s", self.name, peer, self.refused, reason)

    async def _refuse(self, writer: asyncio.StreamWriter, peer: str, reason: str) -> None:
        """Log why, tell the peer why (best effort, bounded: it may not read), close its connection."""
        self._note_refusal(peer, reason)
        try:
            await asyncio.wait_for(send_verdict(writer, reason), 1.0)
        except (OSError, TimeoutError):
            pass
        writer.close()

    def next_frame(self) -> bytes | None:
        return self._call(self._next_frame())

    async def _next_frame(self) -> bytes | None:
        try:
            payload = await asyncio.wait_for(read_frame(self._reader, self._terms.max_frame_bytes),
                                             self._read_timeout_s)
        except TimeoutError:
            raise StreamError(f"{self.name}: no complete frame from the engine within {self._read_timeout_s} s at "
                              f"byte {self.offset} (stream.read_timeout_s); the engine is hung or gone; raise the "
                              "timeout if one episode can take longer") from None
        except FrameError as e:
            raise StreamError(f"{self.name}: at byte {self.offset}: {e}; the learner stops here") from None
        except OSError as e:
            raise StreamError(f"{self.name}: the engine's connection failed at byte {self.offset}: {e}") from None
        if payload is not None:
            self.offset += HEADER.size + len(payload)
        return payload

    def close(self) -> None:
        """Close the engine's connection (the engine sees the end it waits for), stop listening, end the thread."""
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handshaking):
            task.cancel()
        await asyncio.gather(*self._handshaking, return_exceptions=True)
        if self._engine is not None and self._engine.done() and not self._engine.cancelled():
            _, writer = self._engine.result()
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 10)
            except (OSError, TimeoutError):
                pass
        elif self._engine is not None:
            self._engine.cancel()


def _address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def open_source(spec: str, offset: int = 0, stream: StreamConfig | None = None) -> FrameSource:
    """`tcp://HOST:PORT` (listen there for the engine) or a file path, read under the [stream] section `stream`
    (defaults when None: the frame limit; over TCP also the run id, the run key and the timeouts). The offset applies
    to files only (a stream cannot be rewound; the trainer skips group ids it already trained instead)."""
    stream = stream or StreamConfig()
    if spec.startswith("tcp://"):
        host, _, port = spec.removeprefix("tcp://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"trajectory source {spec!r}: expected tcp://HOST:PORT")
        return TcpFrames(host, int(port), terms_of(stream), read_timeout_s=stream.read_timeout_s)
    return open_file_source(Path(spec), offset, stream.max_frame_bytes)
