"""Read the engine's trajectory stream: one frame per episode, from a file of frames or a TCP connection.

Framing (shared with the engine's writer): each frame is a 4-byte big-endian unsigned length N followed by N bytes,
the msgpack payload of `engine.trajectory.pack_group` (the trajectories of one episode). Nothing else is on the wire.

    +----------------+---------------------------+
    | N (uint32, BE) | pack_group(...) (N bytes) |   repeated
    +----------------+---------------------------+

A file source can resume at a byte offset (recorded in the learner's checkpoint); a TCP stream cannot be rewound,
so the trainer also records consumed group ids and skips any group it sees again. Over TCP the learner listens
(`tcp://HOST:PORT`) and the engine connects (engine/stream.py, [stream] host/port).
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import BinaryIO, Protocol

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30
"""A frame longer than this (1 GiB) is taken for a corrupt header, not an episode."""


class StreamError(ValueError):
    """The stream breaks the framing (truncated frame, absurd length); the message gives the byte offset."""


def encode_frame(payload: bytes) -> bytes:
    """Header + payload: what a writer appends per episode."""
    if len(payload) > MAX_FRAME_BYTES:
        raise StreamError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return HEADER.pack(len(payload)) + payload


class FrameSource(Protocol):
    """A source of frame payloads. `offset` is the byte position after the last frame returned."""

    offset: int

    def next_frame(self) -> bytes | None:
        """The next payload, or None when the stream has ended cleanly (EOF exactly at a frame boundary)."""
        ...

    def close(self) -> None:
        """Release the file or socket."""
        ...


class _ReaderFrames:
    """Frames read from a binary stream (a file object or a socket's makefile)."""

    def __init__(self, stream: BinaryIO, name: str, offset: int = 0, sock: socket.socket | None = None) -> None:
        self._stream = stream
        self._sock = sock
        self._name = name
        self.offset = offset

    def _read_exact(self, n: int, what: str) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self._stream.read(n - len(buf))
            if not chunk:
                if not buf and what == "header":
                    return None
                raise StreamError(f"{self._name}: stream ends inside a frame {what} at byte {self.offset} "
                                  f"({len(buf)} of {n} bytes); the writer was cut off, drop the torn tail")
            buf += chunk
        return buf

    def next_frame(self) -> bytes | None:
        header = self._read_exact(HEADER.size, "header")
        if header is None:
            return None
        (n,) = HEADER.unpack(header)
        if n > MAX_FRAME_BYTES:
            raise StreamError(f"{self._name}: frame length {n} at byte {self.offset} exceeds {MAX_FRAME_BYTES}; "
                              "this is not a trajectory stream (expected 4-byte big-endian length + msgpack)")
        payload = self._read_exact(n, "payload")
        assert payload is not None
        self.offset += HEADER.size + n
        return payload

    def close(self) -> None:
        self._stream.close()
        if self._sock is not None:  # closing a socket's makefile leaves the socket itself open
            self._sock.close()


def open_file_source(path: Path, offset: int = 0) -> FrameSource:
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
    return _ReaderFrames(f, str(path), offset)


def open_tcp_source(host: str, port: int, accept_timeout_s: float = 600.0) -> FrameSource:
    """Listen on HOST:PORT and read frames from the engine's connection (the engine's TcpSink connects to us,
    see engine/stream.py); the stream ends when the engine closes it."""
    with socket.create_server((host, port)) as server:
        server.settimeout(accept_timeout_s)
        try:
            conn, _ = server.accept()
        except TimeoutError:
            raise TimeoutError(f"no engine connected to tcp://{host}:{port} within {accept_timeout_s} s; start "
                               "the engine with stream.host/stream.port pointing here") from None
    conn.settimeout(None)
    return _ReaderFrames(conn.makefile("rb"), f"tcp://{host}:{port}", sock=conn)


def open_source(spec: str, offset: int = 0) -> FrameSource:
    """`tcp://HOST:PORT` (listen there for the engine) or a file path. The offset applies to files only
    (a stream cannot be rewound; the trainer skips group ids it already trained instead)."""
    if spec.startswith("tcp://"):
        host, _, port = spec.removeprefix("tcp://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"trajectory source {spec!r}: expected tcp://HOST:PORT")
        return open_tcp_source(host, int(port))
    return open_file_source(Path(spec), offset)
