"""The trajectory stream: finished episode groups as length-prefixed msgpack frames, to the learner or a file.

Frame = 4-byte big-endian payload length + payload, payload = `ssp.engine.trajectory.pack_group(records)`. The same
frames go over TCP to the learner (after the handshake that proves the engine holds the run's key, engine/wire.py)
and into `.frames` files (`ssp rollout --out`, spill files), which `read_frames` reads.

    episodes ─ put(group) ─► queue (≤ stream.queue_groups; a full queue blocks the episode: back-pressure)
                                └─► sender loop ─ write + drain ─► sink (TCP to the learner, or a file)
                                       on a broken connection or an oversized frame: ─► spill file (reported)

Nothing finished is dropped: a frame the sink cannot take goes to the spill file, and `stats` says how many.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ssp.engine.config import MAX_FRAME_BYTES
from ssp.engine.trajectory import Trajectory, pack_group
from ssp.engine.wire import HEADER, FrameError, Terms, encode_frame, offer

log = logging.getLogger(__name__)


def iter_frames(f: BinaryIO, max_frame_bytes: int = MAX_FRAME_BYTES) -> Iterator[bytes]:
    """Payloads of a frame file, in order. A torn last frame (the writer was killed) raises FrameError."""
    while True:
        head = f.read(HEADER.size)
        if not head:
            return
        if len(head) < HEADER.size:
            raise FrameError(f"{getattr(f, 'name', 'stream')}: truncated frame header at the end")
        (n,) = HEADER.unpack(head)
        if n > max_frame_bytes:
            raise FrameError(f"{getattr(f, 'name', 'stream')}: frame of {n} bytes exceeds the limit of "
                             f"{max_frame_bytes} (stream.max_frame_bytes)")
        payload = f.read(n)
        if len(payload) < n:
            raise FrameError(f"{getattr(f, 'name', 'stream')}: last frame is truncated ({len(payload)} of {n} bytes)")
        yield payload


def read_frames(path: Path, max_frame_bytes: int = MAX_FRAME_BYTES) -> list[bytes]:
    with path.open("rb") as f:
        return list(iter_frames(f, max_frame_bytes))


class FrameSink(Protocol):
    """Where frames go. `write` returns when the frame is handed over (TCP: the socket buffer drained)."""

    async def write(self, frame: bytes) -> None: ...

    async def close(self) -> None: ...


class FileSink:
    """Appends frames to a file, flushing each, so a killed run keeps every finished frame."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("ab")

    def _write(self, frame: bytes) -> None:
        self._f.write(frame)
        self._f.flush()

    async def write(self, frame: bytes) -> None:
        await asyncio.to_thread(self._write, frame)

    async def close(self) -> None:
        self._f.close()


class TcpSink:
    """Frames over one TCP connection to the learner, opened by the handshake (engine/wire.py); `drain` gives
    back-pressure when the learner is slow."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 close_timeout_s: float = 10.0) -> None:
        self._reader = reader
        self._writer = writer
        self._close_timeout_s = close_timeout_s
        self._closed = False

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float, terms: Terms) -> TcpSink:
        """Connect (retrying for `timeout_s` while the learner starts), then run the handshake once: a refusal
        (wrong key, run or limit, another engine already streaming) is a configuration error, raised as
        ssp.engine.wire.HandshakeError with the learner's reason, not retried."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                break
            except OSError as e:
                if asyncio.get_running_loop().time() > deadline:
                    raise ConnectionError(f"cannot connect to the learner at {host}:{port} within {timeout_s} s "
                                          f"(stream.connect_timeout_s): {e}; is the learner listening?") from None
                await asyncio.sleep(0.2)
        try:
            await offer(reader, writer, terms)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def write(self, frame: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise ConnectionError("the learner connection is closed")
        self._writer.write(frame)
        await self._writer.drain()

    async def close(self) -> None:
        """Graceful end: half-close, then wait for the learner to close its side after reading everything. A reset
        instead raises ConnectionError (frames may be unread). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._writer.is_closing():
                self._writer.write_eof()
                await self._writer.drain()
                try:
                    await asyncio.wait_for(self._reader.read(), self._close_timeout_s)
                except asyncio.TimeoutError:
                    log.warning("the learner did not close the trajectory connection within %s s after the end "
                                "of the stream", self._close_timeout_s)
        finally:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass


@dataclass(slots=True)
class StreamStats:
    frames_sent: int = 0
    frames_spilled: int = 0
    """Frames never sent over the connection, written to the spill file instead."""
    frames_resent_to_spill: int = 0
    """Frames sent just before the connection broke, also written to the spill file (may be duplicates)."""
    bytes_sent: int = 0
    trajectories: int = 0
    spill_path: str | None = None
    error: str | None = None


class TrajectoryStream:
    """Bounded buffer of finished groups and the loop that sends them. See the module docstring.

    NOTE: TCP gives no application-level acknowledgement (the learner only reads), so frames written just before a
    connection breaks may sit in socket buffers and never be read. The stream therefore keeps the most recent
    frames (up to `resend_window_bytes`, far more than socket buffers hold) and spills them too when the
    connection breaks; the learner skips group ids it already trained, so a duplicate is harmless, a loss is not.
    """

    def __init__(self, sink: FrameSink, *, max_frame_bytes: int, queue_groups: int, spill_path: Path,
                 resend_window_bytes: int = 64 << 20) -> None:
        self._sink: FrameSink | None = sink
        self._max = max_frame_bytes
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=queue_groups)
        self._spill_path = spill_path
        self._spill: FileSink | None = None
        self._window: collections.deque[bytes] = collections.deque()
        self._window_bytes = 0
        self._resend_window_bytes = resend_window_bytes
        self._closed = False
        self._current: bytes | None = None
        """The payload being sent now (spilled too if the stream is cancelled mid-write)."""
        self.stats = StreamStats()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def put(self, group: list[Trajectory]) -> None:
        """Queue one episode's records; waits while the queue is full (the learner is behind)."""
        if self._closed:
            raise RuntimeError("the trajectory stream is closed; no more groups can be sent")
        self.stats.trajectories += len(group)
        await self._queue.put(pack_group(group))

    async def finish(self) -> None:
        """No more groups: the sender loop sends what is queued, then returns."""
        if not self._closed:
            self._closed = True
            await self._queue.put(None)

    def close_nowait(self) -> None:
        """Shutdown path: refuse further groups without waiting for room in the queue (the sender may be gone)."""
        if not self._closed:
            self._closed = True
            try:
                self._queue.put_nowait(None)
            except asyncio.QueueFull:
                pass  # the sender is being cancelled; what it still holds is reported by the caller's summary

    async def run(self) -> StreamStats:
        """The sender loop: runs until `finish()`; then closes the sinks."""
        try:
            while (payload := await self._queue.get()) is not None:
                self._current = payload
                await self._send(payload)
                self._current = None
            if self._sink is not None:
                try:
                    await self._sink.close()
                except (ConnectionError, OSError) as e:
                    await self._broken(e)
        except asyncio.CancelledError:
            self._spill_queued_now()
            raise
        finally:
            if self._sink is not None:
                await self._sink.close()
            if self._spill is not None:
                await self._spill.close()
        return self.stats

    def _spill_queued_now(self) -> None:
        """Cancelled (shutdown after an error): groups still queued are finished work; write them to the spill file
        at once (blocking: the loop is shutting down) rather than lose them."""
        payloads = [self._current] if self._current is not None else []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                payloads.append(item)
        if not payloads:
            return
        self._spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spill_path.open("ab") as f:
            for payload in payloads:
                f.write(HEADER.pack(len(payload)) + payload)
        self.stats.frames_spilled += len(payloads)
        self.stats.spill_path = str(self._spill_path)
        log.error("stream cancelled with %d finished groups queued; they are in %s", len(payloads), self._spill_path)

    async def _send(self, payload: bytes) -> None:
        frame = None
        try:
            frame = encode_frame(payload, self._max)
        except FrameError as e:
            log.error("%s; writing it to the spill file %s", e, self._spill_path)
        if frame is not None and self._sink is not None:
            try:
                await self._sink.write(frame)
                self.stats.frames_sent += 1
                self.stats.bytes_sent += len(frame)
                self._remember(frame)
                return
            except (ConnectionError, OSError) as e:
                await self._broken(e)
        await self._spill_frame(HEADER.pack(len(payload)) + payload)

    def _remember(self, frame: bytes) -> None:
        self._window.append(frame)
        self._window_bytes += len(frame)
        while len(self._window) > 1 and self._window_bytes > self._resend_window_bytes:
            self._window_bytes -= len(self._window.popleft())

    async def _broken(self, err: BaseException) -> None:
        """The connection broke: spill the frames that may not have been read, then send nothing more over it."""
        self.stats.error = f"{type(err).__name__}: {err}"
        log.error("trajectory stream broke (%s); the last %d sent frames and all later groups go to %s",
                  err, len(self._window), self._spill_path)
        sink, self._sink = self._sink, None
        if sink is not None:
            await sink.close()
        while self._window:
            await self._spill_frame(self._window.popleft(), resent=True)
        self._window_bytes = 0

    async def _spill_frame(self, frame: bytes, *, resent: bool = False) -> None:
        if self._spill is None:
            self._spill = FileSink(self._spill_path)
            self.stats.spill_path = str(self._spill_path)
        await self._spill.write(frame)
        if resent:
            self.stats.frames_resent_to_spill += 1
        else:
            self.stats.frames_spilled += 1
