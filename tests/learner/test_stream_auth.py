"""The learner's end of the trajectory stream over real sockets on 127.0.0.1, against the real engine end
(ssp.engine.stream.TcpSink and TrajectoryStream): only the engine with the run's key streams; strangers before it, peers
beside it and silent peers are refused with a logged reason and never disturb it; oversized and invalid frames stop
the learner with a message naming the frame, and nothing of that batch is trained."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from learner_tiny import EngineStream, make_groups

from ssp.engine.config import StreamConfig
from ssp.engine.stream import TcpSink, TrajectoryStream
from ssp.engine.trajectory import Trajectory, pack_group, unpack_group
from ssp.engine.wire import HEADER, HandshakeError, Terms, encode_frame, offer, terms_of
from ssp.learner.dedup import RecentGroups
from ssp.learner.trainer import read_batch
from ssp.learner.trajectory_source import FrameSource, StreamError, open_source
from ssp.run_key import write_run_key

VOCAB = 250
"""The tiny models' vocabulary (learner_tiny)."""


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stream(tmp_path: Path, **changes: Any) -> StreamConfig:
    return StreamConfig(key_file=write_run_key(tmp_path / "stream.key"), run_id="run-a", **changes)


def _in_thread(work: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[threading.Thread, list[Any]]:
    """Run the engine side (its own event loop) beside the learner, which blocks in this thread."""
    out: list[Any] = []

    def main() -> None:
        try:
            out.append(asyncio.run(work()))
        except BaseException as e:  # re-raised by the test
            out.append(e)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, out


def _result(thread: threading.Thread, out: list[Any]) -> Any:
    thread.join(30)
    assert not thread.is_alive(), "the engine side did not finish"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect as soon as the learner listens."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def _refusal(port: int, terms: Terms) -> str:
    """Handshake as a peer with `terms`; the learner's reason for refusing it."""
    reader, writer = await _connect(port)
    try:
        await offer(reader, writer, terms)
    except HandshakeError as e:
        return str(e)
    finally:
        writer.close()
    raise AssertionError("the learner accepted a peer it must refuse")


async def _stream_groups(port: int, terms: Terms, groups: list[list[Trajectory]], spill: Path,
                         beside: Callable[[], Coroutine[Any, Any, None]] | None = None) -> Any:
    """The real engine: handshake, then every group through a TrajectoryStream; `beside` runs after the first group
    is sent, while the connection is open. Returns the stream's stats."""
    sink = await TcpSink.connect("127.0.0.1", port, 30, terms)
    stream = TrajectoryStream(sink, max_frame_bytes=terms.max_frame_bytes, queue_groups=4, spill_path=spill)
    sender = asyncio.create_task(stream.run())
    await stream.put(groups[0])
    if beside is not None:
        while stream.stats.frames_sent < 1:
            await asyncio.sleep(0.01)
        await beside()
    for group in groups[1:]:
        await stream.put(group)
    await stream.finish()
    return await sender


def _read_all(src: FrameSource) -> list[str]:
    got = []
    while (payload := src.next_frame()) is not None:
        got.append(unpack_group(payload)[0].group_id)
    return got


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


def test_strangers_first_are_refused_then_the_engine_streams(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    stream = _stream(tmp_path)
    port, terms, groups = _port(), terms_of(stream), make_groups(3, seed=1)
    told: list[Any] = []

    async def engine_side() -> Any:
        told.append(await _refusal(port, dataclasses.replace(terms, key=b"w" * 32)))  # the wrong key
        reader, writer = await _connect(port)  # no key, not even the protocol
        await reader.readexactly(37)  # the challenge
        writer.write(b"let me in\n")
        told.append(await reader.read())
        writer.close()
        return await _stream_groups(port, terms, groups, tmp_path / "spill.frames")

    with caplog.at_level(logging.WARNING, logger="ssp.learner.trajectory_source"):
        thread, out = _in_thread(engine_side)
        src = open_source(f"tcp://127.0.0.1:{port}", stream=stream)
        got = _read_all(src)
        src.close()
        stats = _result(thread, out)
    assert got == [g[0].group_id for g in groups]  # the engine's stream, whole and in order
    assert stats.frames_sent == 3 and stats.error is None and stats.frames_spilled == 0
    assert "the learner refused the trajectory stream: wrong run key" in told[0]
    assert b"does not start with b'SSPT'" in told[1]
    logged = _refusals(caplog)
    assert len(logged) == 2 and "wrong run key" in logged[0] and "does not start with" in logged[1], logged
    assert src.refused == 2


def test_peers_beside_the_engine_are_refused_and_its_stream_is_undisturbed(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    stream = _stream(tmp_path, handshake_timeout_s=0.5)
    port, terms, groups = _port(), terms_of(stream), make_groups(4, seed=2)
    told: list[str] = []

    async def intruders() -> None:
        told.append(await _refusal(port, terms))  # a second engine, with the right key
        told.append(await _refusal(port, dataclasses.replace(terms, key=b"w" * 32)))
        reader, writer = await _connect(port)  # a silent peer: times out
        told.append((await reader.read()).decode(errors="replace"))
        writer.close()

    with caplog.at_level(logging.WARNING, logger="ssp.learner.trajectory_source"):
        thread, out = _in_thread(lambda: _stream_groups(port, terms, groups, tmp_path / "spill.frames", intruders))
        src = open_source(f"tcp://127.0.0.1:{port}", stream=stream)
        got = _read_all(src)
        src.close()
        stats = _result(thread, out)
    assert got == [g[0].group_id for g in groups]
    assert stats.frames_sent == 4 and stats.error is None and stats.frames_spilled == 0
    assert "an engine is already streaming to this learner" in told[0]
    assert "wrong run key" in told[1] and "already streaming" not in told[1]  # a stranger learns nothing more
    assert "no complete hello within 0.5 s" in told[2]
    logged = _refusals(caplog)
    assert len(logged) == 3 and "already streaming" in logged[0] and "no complete hello" in logged[2], logged


def test_a_silent_peer_times_out_and_a_silent_engine_stops_the_learner(tmp_path: Path) -> None:
    stream = _stream(tmp_path, handshake_timeout_s=0.3, read_timeout_s=0.3)
    port, terms = _port(), terms_of(stream)

    async def engine_side() -> str:
        reader, writer = await _connect(port)  # connects first and sends nothing
        started = time.monotonic()
        verdict = (await reader.read()).decode(errors="replace")
        assert time.monotonic() - started < 5
        writer.close()
        reader, writer = await _connect(port)
        await offer(reader, writer, terms)  # authenticated, then silent: the learner's read timeout
        assert await reader.read() == b""  # until the learner gives up and closes
        writer.close()
        return verdict

    thread, out = _in_thread(engine_side)
    src = open_source(f"tcp://127.0.0.1:{port}", stream=stream)
    with pytest.raises(StreamError, match=r"no complete frame from the engine within 0.3 s at byte 0 "
                                          r"\(stream.read_timeout_s\)"):
        src.next_frame()
    src.close()
    assert "no complete hello within 0.3 s" in _result(thread, out)


def test_an_oversized_frame_is_refused_unread(tmp_path: Path) -> None:
    stream = _stream(tmp_path, max_frame_bytes=4096)
    port, terms = _port(), terms_of(stream)
    good = make_groups(1, seed=3)[0]

    async def engine_side() -> None:
        engine = await TcpSink.connect("127.0.0.1", port, 30, terms)
        await engine.write(_frame(good))
        await engine.write(HEADER.pack(4097) + b"x" * 100)  # a header over the shared limit
        with contextlib.suppress(ConnectionError):  # the learner stopped reading and closed
            await engine.close()

    thread, out = _in_thread(engine_side)
    src = open_source(f"tcp://127.0.0.1:{port}", stream=stream)
    first = src.next_frame()
    assert first is not None and unpack_group(first)[0].group_id == good[0].group_id
    with pytest.raises(StreamError, match=rf"at byte {len(_frame(good))}: a frame of 4097 bytes exceeds the limit "
                                          r"of 4096 \(stream.max_frame_bytes"):
        src.next_frame()
    src.close()
    _result(thread, out)


def _frame(group: list[Trajectory]) -> bytes:
    return encode_frame(pack_group(group))


def _out_of_vocabulary(t: Trajectory) -> None:
    t.response_ids[1] = VOCAB


def _nan_reward(t: Trajectory) -> None:
    t.reward = math.nan


def _bad_mask(t: Trajectory) -> None:
    t.loss_mask[0] = 2


FAULTS = [(_out_of_vocabulary, f"response_ids[1] = {VOCAB} is outside the vocabulary [0, {VOCAB})"),
          (_nan_reward, "reward = nan is not a finite number"),
          (_bad_mask, "loss_mask[0] = 2; loss_mask must contain only the integers 0 and 1")]


@pytest.mark.parametrize(("fault", "reason"), FAULTS, ids=["out_of_vocabulary", "nan_reward", "bad_mask"])
def test_an_invalid_frame_stops_the_learner_naming_the_frame(tmp_path: Path, fault: Callable[[Trajectory], None],
                                                             reason: str) -> None:
    stream = _stream(tmp_path)
    port = _port()
    good, bad = make_groups(2, seed=4)
    fault(bad[1])
    thread, out = _in_thread(lambda: _stream_groups(port, terms_of(stream), [good, bad], tmp_path / "spill.frames"))
    src = open_source(f"tcp://127.0.0.1:{port}", stream=stream)
    with pytest.raises(StreamError) as stopped:
        read_batch(src, 2, RecentGroups(1 << 20), VOCAB)
    src.close()
    _result(thread, out)
    message = str(stopped.value)
    assert f"tcp://127.0.0.1:{port}: the frame at byte {len(_frame(good))}" in message, message
    assert f"trajectory {bad[1].group_id}/{bad[1].role}: {reason}" in message, message
    assert "stops without training this batch" in message


def test_a_batch_with_an_invalid_frame_trains_nothing(tiny_llama: Path, tmp_path: Path, par1: object) -> None:
    """The real learner loop over TCP: the batch holding the bad frame is never trained, nothing is checkpointed."""
    from ssp.learner import checkpoint
    from ssp.learner.config import LearnerConfig
    from ssp.learner.trainer import run

    stream = _stream(tmp_path)
    port = _port()
    good, bad = make_groups(2, seed=5)
    _out_of_vocabulary(bad[0])
    cfg = LearnerConfig(model_dir=tiny_llama, out_dir=tmp_path / "run", groups_per_step=2, vocab_divisor=8,
                        micro_batch_tokens=48, checkpoint_every=1, drop_zero_variance_groups=False)
    sent: list[int] = []

    def engine() -> None:
        connection = EngineStream(port, terms_of(stream))
        for group in (good, bad):
            connection.send(group)
            sent.append(1)
        connection.close()

    sender = threading.Thread(target=engine, daemon=True)
    sender.start()
    with pytest.raises(StreamError, match=rf"the frame at byte {len(_frame(good))} .* is outside the vocabulary"):
        run(cfg, f"tcp://127.0.0.1:{port}", [], stream)
    sender.join(30)
    assert len(sent) == 2
    assert checkpoint.latest(cfg.out_dir / "checkpoints") is None
    metrics = cfg.out_dir / "metrics.jsonl"
    assert not metrics.exists() or not [json.loads(x) for x in metrics.read_text().splitlines()]
