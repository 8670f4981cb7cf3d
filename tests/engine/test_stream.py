"""The trajectory stream: frame format, file round trip, TCP to a real listener (after the handshake), back-pressure,
and spilling on a broken connection or an oversized frame (nothing finished is lost); the handshake's refusals and
the run key. The learner's end of the TCP stream is tested in tests/learner/test_stream_auth.py."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
from pathlib import Path

import pytest

from ssp.engine.stream import FileSink, TcpSink, TrajectoryStream, iter_frames, read_frames
from ssp.engine.trajectory import Trajectory, unpack_group
from ssp.engine.wire import FrameError, HandshakeError, Terms, challenge, encode_frame, read_frame, send_verdict
from ssp.run_key import KEY_ENV, RunKeyError, load_run_key, write_run_key

TERMS = Terms(run_id="run-a", key=b"k" * 32, max_frame_bytes=1 << 24, timeout_s=5.0)


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The learner's side of the handshake, for the fake learners below (the real one: ssp.learner.trajectory_source)."""
    await challenge(reader, writer, TERMS)
    await send_verdict(writer, None)


def group(i: int, n_tokens: int = 4) -> list[Trajectory]:
    return [Trajectory(role="solver", group_id=f"g{i}", prompt_ids=[1, 2], response_ids=list(range(n_tokens)),
                       loss_mask=[1] * n_tokens, rollout_logprobs=[-0.1] * n_tokens, policy_versions=[0] * n_tokens,
                       reward=1.0, meta={"i": i})]


def test_frame_format_is_big_endian_length_prefix() -> None:
    frame = encode_frame(b"abc", 1024)
    assert frame == b"\x00\x00\x00\x03abc"
    assert list(iter_frames(io.BytesIO(frame * 2))) == [b"abc", b"abc"]
    with pytest.raises(FrameError, match="exceeds the limit"):
        encode_frame(b"x" * 2000, 1024)
    with pytest.raises(FrameError, match="truncated"):
        list(iter_frames(io.BytesIO(frame[:-1])))


async def test_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.frames"
    stream = TrajectoryStream(FileSink(path), max_frame_bytes=1 << 20, queue_groups=2, spill_path=tmp_path / "s")
    sender = asyncio.create_task(stream.run())
    for i in range(5):
        await stream.put(group(i))
    await stream.finish()
    stats = await sender
    assert stats.frames_sent == 5 and stats.frames_spilled == 0
    groups = [unpack_group(p) for p in read_frames(path)]
    assert [g[0].meta["i"] for g in groups] == list(range(5))


async def test_oversized_group_is_spilled_not_dropped(tmp_path: Path) -> None:
    path, spill = tmp_path / "out.frames", tmp_path / "spill.frames"
    stream = TrajectoryStream(FileSink(path), max_frame_bytes=1024, queue_groups=4, spill_path=spill)
    sender = asyncio.create_task(stream.run())
    await stream.put(group(0))
    await stream.put(group(1, n_tokens=500))
    await stream.finish()
    stats = await sender
    assert (stats.frames_sent, stats.frames_spilled) == (1, 1)
    assert unpack_group(read_frames(spill)[0])[0].meta["i"] == 1


async def test_tcp_back_pressure_and_spill_when_the_learner_goes_away(tmp_path: Path) -> None:
    received: list[bytes] = []
    release = asyncio.Event()
    first_read = asyncio.Event()

    async def learner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept(reader, writer)
        await release.wait()  # a slow learner: reads nothing at first
        while len(received) < 3:
            payload = await read_frame(reader, 1 << 24)
            assert payload is not None
            received.append(payload)
            first_read.set()
        writer.close()  # then it goes away

    server = await asyncio.start_server(learner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = await TcpSink.connect("127.0.0.1", port, 5, TERMS)
    spill = tmp_path / "spill.frames"
    stream = TrajectoryStream(sink, max_frame_bytes=1 << 24, queue_groups=2, spill_path=spill,
                              resend_window_bytes=1 << 30)
    sender = asyncio.create_task(stream.run())
    big = 200_000  # frames large enough to fill the socket buffers

    async def produce() -> None:
        for i in range(12):
            await stream.put(group(i, n_tokens=big))
        await stream.finish()

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.5)
    assert not producer.done(), "with a stalled learner the producer must be held back by the bounded queue"
    assert stream.queue_depth == 2
    release.set()
    await asyncio.wait_for(producer, 30)
    stats = await asyncio.wait_for(sender, 30)
    server.close()
    await server.wait_closed()
    spilled = [unpack_group(p)[0].meta["i"] for p in read_frames(spill)]
    got = [unpack_group(p)[0].meta["i"] for p in received]
    assert got == [0, 1, 2] and stats.error is not None
    # Nothing finished was lost: frames never sent, and those sent just before the break, are in the spill file.
    assert set(got) | set(spilled) == set(range(12))
    assert stats.frames_spilled + stats.frames_resent_to_spill == len(spilled)
    assert stats.frames_sent + stats.frames_spilled == 12


async def test_tcp_clean_end_of_stream(tmp_path: Path) -> None:
    received: list[int] = []

    async def learner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept(reader, writer)
        while (payload := await read_frame(reader, 1 << 24)) is not None:
            received.append(unpack_group(payload)[0].meta["i"])
        writer.close()

    server = await asyncio.start_server(learner, "127.0.0.1", 0)
    sink = await TcpSink.connect("127.0.0.1", server.sockets[0].getsockname()[1], 5, TERMS)
    stream = TrajectoryStream(sink, max_frame_bytes=1 << 24, queue_groups=2, spill_path=tmp_path / "spill")
    sender = asyncio.create_task(stream.run())
    for i in range(5):
        await stream.put(group(i))
    await stream.finish()
    stats = await asyncio.wait_for(sender, 10)
    server.close()
    await server.wait_closed()
    assert received == list(range(5)) and stats.frames_sent == 5 and stats.error is None
    assert not (tmp_path / "spill").exists()


async def test_cancelled_stream_spills_what_it_still_holds(tmp_path: Path) -> None:
    class Stuck:
        async def write(self, frame: bytes) -> None:
            await asyncio.sleep(3600)  # a learner that never reads

        async def close(self) -> None:
            pass

    spill = tmp_path / "spill.frames"
    stream = TrajectoryStream(Stuck(), max_frame_bytes=1 << 20, queue_groups=8, spill_path=spill)
    sender = asyncio.create_task(stream.run())
    for i in range(4):
        await stream.put(group(i))
    await asyncio.sleep(0.05)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    # The group being written when the stream was cancelled and the queued ones are all kept.
    assert [unpack_group(p)[0].meta["i"] for p in read_frames(spill)] == [0, 1, 2, 3]
    assert stream.stats.frames_spilled == 4


@pytest.mark.parametrize(("change", "reason"), [
    ({"key": b"x" * 32}, "wrong run key"),
    ({"run_id": "run-b"}, "the engine belongs to run 'run-b', this learner to run 'run-a'"),
    ({"max_frame_bytes": 1 << 20}, "frames of up to 1048576 bytes, this learner reads up to 16777216"),
])
async def test_handshake_refuses_another_key_run_or_frame_limit(change: dict[str, object], reason: str) -> None:
    """Both ends' real handshake code over a socket: the learner names the reason, the engine hears it."""
    refusals: list[str] = []

    async def learner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await challenge(reader, writer, TERMS)
            await send_verdict(writer, None)
        except HandshakeError as e:
            refusals.append(str(e))
            await send_verdict(writer, str(e))
        writer.close()

    server = await asyncio.start_server(learner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(HandshakeError, match="the learner refused the trajectory stream") as refused:
        await TcpSink.connect("127.0.0.1", port, 5, dataclasses.replace(TERMS, **change))  # type: ignore[arg-type]
    assert reason in str(refused.value) and len(refusals) == 1 and reason in refusals[0]
    sink = await TcpSink.connect("127.0.0.1", port, 5, TERMS)  # the right terms are accepted
    await sink.close()
    server.close()
    await server.wait_closed()


async def test_handshake_rejects_what_is_not_an_ssp_peer() -> None:
    """Garbage instead of a hello, and a silent learner, both end the handshake with a reason (never a hang)."""
    refusals: list[str] = []

    async def learner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await challenge(reader, writer, TERMS)
        except HandshakeError as e:
            refusals.append(str(e))
        writer.close()

    server = await asyncio.start_server(learner, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    await reader.readexactly(37)  # the challenge
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await reader.read() == b""  # closed on us
    writer.close()
    server.close()
    assert len(refusals) == 1 and "does not start with b'SSPT'" in refusals[0], refusals

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    with pytest.raises(HandshakeError, match="did not complete the handshake within 0.2 s"):
        await TcpSink.connect("127.0.0.1", server.sockets[0].getsockname()[1], 5,
                              dataclasses.replace(TERMS, timeout_s=0.2))
    server.close()


def test_run_key_file_env_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_run_key(tmp_path / "run" / "stream.key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    key = load_run_key(path)
    assert len(key) == 64 and write_run_key(path) and load_run_key(path) != key  # a new run, a new key
    monkeypatch.setenv(KEY_ENV, "e" * 40)
    assert load_run_key(None) == b"e" * 40 and load_run_key(path) != b"e" * 40  # the file wins when set
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(RunKeyError, match=f"\\${KEY_ENV}: the run key has 5 bytes; it must have 32"):
        load_run_key(None)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RunKeyError, match="stream.key_file is unset and .SSP_RUN_KEY is not set"):
        load_run_key(None)
    with pytest.raises(RunKeyError, match="cannot read the run key"):
        load_run_key(tmp_path / "missing.key")
