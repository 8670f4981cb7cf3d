"""The trajectory stream's wire format, byte for byte, and the handshake both ends run before the first frame.

The learner listens, the engine connects. Before any frame the learner proves nothing and trusts nothing: it sends
a fresh random challenge, and only an engine that answers it with the run's key (ssp/run_key.py), for the
learner's run and frame limit, may stream. Integers are big-endian.

    learner -> engine   CHALLENGE  b"SSPT" | version u8 | nonce (32 random bytes)
    engine  -> learner  HELLO      b"SSPT" | version u8 | n u16 (<= 1024) | n bytes: msgpack map
                                      {"run_id": str, "max_frame_bytes": int, "mac": 32 bytes}
    learner -> engine   VERDICT    status u8 (0 accepted, 1 refused) | n u16 (<= 1024) | n bytes: reason, UTF-8
    engine  -> learner  FRAMES     N u32 (<= max_frame_bytes) | N bytes: ssp.engine.trajectory.pack_group(...)
                                   ... repeated until the engine half-closes (a clean end at a frame boundary)

    mac = HMAC-SHA256(run key, b"ssp-trajectory-stream" | version u8 | nonce | len(run_id) u16 | run_id UTF-8
                               | max_frame_bytes u32)

Why a challenge and an HMAC rather than the key itself: the key never crosses the network (a cluster's stream
does), and a recorded handshake cannot be replayed (the nonce is new for every connection). The MAC is checked
first, so a peer without the key learns nothing about the run; then the run id and the frame limit, which must be
the same on both ends (`stream.max_frame_bytes` is the one limit: the engine spills a bigger group, the learner
refuses a bigger frame). Frames carry no MAC: once the handshake is done, the learner accepts no other peer, so
only the authenticated engine writes to that connection. Every read of the handshake is bounded in size and in time.

The same frames (length + payload, without the handshake) make up `.frames` files (`ssp rollout --out`, spill
files, a run's samples).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgpack

from ssp.engine.config import MAX_FRAME_BYTES, MAX_RUN_ID_CHARS, StreamConfig
from ssp.run_key import load_run_key

MAGIC = b"SSPT"
VERSION = 1
"""Raise on any change to the bytes above; both ends refuse a peer of another version, naming both."""

HEADER = struct.Struct(">I")
"""A frame's length prefix."""

NONCE_BYTES = 32
MAC_BYTES = 32
MAX_HANDSHAKE_BODY = 1024
"""Largest HELLO body or VERDICT reason; a peer announcing more is refused before anything more is read."""

_PREFIX = struct.Struct(">4sB")
_LENGTH = struct.Struct(">H")
_VERDICT = struct.Struct(">BH")
_MAC_DOMAIN = b"ssp-trajectory-stream"
ACCEPTED, REFUSED = 0, 1


class FrameError(ValueError):
    """A frame is larger than the limit, or a frame file is truncated."""


class HandshakeError(ConnectionError):
    """The two ends did not agree to stream; the message is the reason (wrong key, run, version or limit)."""


@dataclass(frozen=True, slots=True)
class Terms:
    """What an engine and a learner must share before a frame is sent."""

    run_id: str
    key: bytes = field(repr=False)
    max_frame_bytes: int
    timeout_s: float
    """The whole handshake must be over within this (stream.handshake_timeout_s)."""


def terms_of(cfg: StreamConfig) -> Terms:
    """The handshake terms of a [stream] section; reads the run key (ssp.run_key.RunKeyError if there is none)."""
    return Terms(run_id=cfg.run_id, key=load_run_key(cfg.key_file), max_frame_bytes=cfg.max_frame_bytes,
                 timeout_s=cfg.handshake_timeout_s)


def encode_frame(payload: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Length prefix + payload: one frame, as the learner reads it and as `.frames` files store it."""
    if len(payload) > max_frame_bytes:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the limit of {max_frame_bytes} "
                         "(stream.max_frame_bytes); raise the limit on both ends or shorten rollouts")
    return HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int) -> bytes | None:
    """One payload from a connection, or None at a clean end (the peer half-closed at a frame boundary). A frame
    over the limit is refused before its payload is read; a connection that ends inside a frame raises FrameError."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise FrameError(f"the connection ended inside a frame header ({len(e.partial)} of {HEADER.size} "
                         "bytes)") from None
    (n,) = HEADER.unpack(head)
    if n > max_frame_bytes:
        raise FrameError(f"a frame of {n} bytes exceeds the limit of {max_frame_bytes} (stream.max_frame_bytes, "
                         "the same on both ends); it is refused unread")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise FrameError(f"the connection ended inside a frame ({len(e.partial)} of {n} payload bytes)") from None


def _mac(key: bytes, nonce: bytes, run_id: str, max_frame_bytes: int) -> bytes:
    rid = run_id.encode()
    message = (_MAC_DOMAIN + bytes([VERSION]) + nonce + _LENGTH.pack(len(rid)) + rid
               + HEADER.pack(max_frame_bytes))
    return hmac.new(key, message, hashlib.sha256).digest()


async def _read(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise HandshakeError(f"the peer closed the connection during the handshake ({len(e.partial)} of {n} "
                             f"bytes of the {what})") from None


def _check_prefix(prefix: bytes, what: str) -> None:
    magic, version = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise HandshakeError(f"the {what} does not start with {MAGIC!r} (got {magic!r}): the peer does not speak "
                             "the ssp trajectory stream")
    if version != VERSION:
        raise HandshakeError(f"the peer speaks trajectory stream version {version}, this ssp speaks {VERSION}; run "
                             "the same ssp version on the engine and the learner")


@contextlib.asynccontextmanager
async def _handshake_io(timeout_s: float, on_timeout: str) -> AsyncIterator[None]:
    """One side's handshake I/O, bounded by `timeout_s`: running out of time raises HandshakeError(`on_timeout`), a
    broken connection a HandshakeError saying so (HandshakeErrors raised inside pass through as they are)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise HandshakeError(on_timeout) from None
    except HandshakeError:
        raise
    except OSError as e:
        raise HandshakeError(f"the connection failed during the handshake: {e}") from None


async def _read_announced(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    """A handshake body whose length `n` the peer announced, refused above MAX_HANDSHAKE_BODY before reading."""
    if n > MAX_HANDSHAKE_BODY:
        raise HandshakeError(f"the {what} announces {n} bytes, more than the {MAX_HANDSHAKE_BODY} allowed")
    return await _read(reader, n, what)


async def challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, terms: Terms) -> None:
    """Learner side: challenge a peer that just connected and check its answer; raises HandshakeError naming the
    reason to refuse it. The caller sends the verdict (`send_verdict`), since only it knows whether another engine
    got in first."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    async with _handshake_io(terms.timeout_s, f"no complete hello within {terms.timeout_s} s of connecting "
                                              "(stream.handshake_timeout_s)"):
        writer.write(_PREFIX.pack(MAGIC, VERSION) + nonce)
        await writer.drain()
        _check_prefix(await _read(reader, _PREFIX.size, "hello"), "hello")
        (n,) = _LENGTH.unpack(await _read(reader, _LENGTH.size, "hello"))
        body = await _read_announced(reader, n, "hello")
    run_id, max_frame_bytes, mac = _parse_hello(body)
    if not hmac.compare_digest(mac, _mac(terms.key, nonce, run_id, max_frame_bytes)):
        raise HandshakeError("wrong run key: the hello was not made with this run's key (stream.key_file, or "
                             "$SSP_RUN_KEY when unset); give the engine the key of the run it streams to")
    if run_id != terms.run_id:
        raise HandshakeError(f"the engine belongs to run {run_id!r}, this learner to run {terms.run_id!r} "
                             "(stream.run_id); point the engine at its own run's learner")
    if max_frame_bytes != terms.max_frame_bytes:
        raise HandshakeError(f"the engine sends frames of up to {max_frame_bytes} bytes, this learner reads up to "
                             f"{terms.max_frame_bytes} (stream.max_frame_bytes); set the same limit on both ends")


def _parse_hello(body: bytes) -> tuple[str, int, bytes]:
    try:
        hello = msgpack.unpackb(body, raw=False)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise HandshakeError(f"the hello is not valid msgpack: {e}") from None
    if not isinstance(hello, dict):
        raise HandshakeError(f"the hello must be a msgpack map, got {type(hello).__name__}")
    run_id, limit, mac = hello.get("run_id"), hello.get("max_frame_bytes"), hello.get("mac")
    if not isinstance(run_id, str) or len(run_id) > MAX_RUN_ID_CHARS:
        raise HandshakeError(f"the hello's run_id must be a string of at most {MAX_RUN_ID_CHARS} characters")
    if type(limit) is not int or not 0 < limit < 1 << 32:
        raise HandshakeError("the hello's max_frame_bytes must be an integer in 1..2**32-1")
    if not isinstance(mac, bytes) or len(mac) != MAC_BYTES:
        raise HandshakeError(f"the hello's mac must be {MAC_BYTES} bytes")
    return run_id, limit, mac


async def send_verdict(writer: asyncio.StreamWriter, refusal: str | None) -> None:
    """Learner side: tell the peer it may stream (refusal None) or why it may not."""
    reason = (refusal or "").encode()[:MAX_HANDSHAKE_BODY]
    writer.write(_VERDICT.pack(ACCEPTED if refusal is None else REFUSED, len(reason)) + reason)
    await writer.drain()


async def offer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, terms: Terms) -> None:
    """Engine side: answer the learner's challenge and wait for its verdict; raises HandshakeError with the
    learner's reason when it refuses (or when what answered is not an ssp learner)."""
    async with _handshake_io(terms.timeout_s, f"the learner did not complete the handshake within {terms.timeout_s}"
                                              " s (stream.handshake_timeout_s); is an ssp learner listening there?"):
        _check_prefix(await _read(reader, _PREFIX.size, "challenge"), "challenge")
        nonce = await _read(reader, NONCE_BYTES, "challenge")
        body = msgpack.packb({"run_id": terms.run_id, "max_frame_bytes": terms.max_frame_bytes,
                              "mac": _mac(terms.key, nonce, terms.run_id, terms.max_frame_bytes)},
                             use_bin_type=True)
        writer.write(_PREFIX.pack(MAGIC, VERSION) + _LENGTH.pack(len(body)) + body)
        await writer.drain()
        status, n = _VERDICT.unpack(await _read(reader, _VERDICT.size, "verdict"))
        reason = (await _read_announced(reader, n, "verdict")).decode(errors="replace")
    if status != ACCEPTED:
        raise HandshakeError(f"the learner refused the trajectory stream: {reason}")
