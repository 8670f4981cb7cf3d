"""The trajectory stream: frame format, file round trip, TCP to a real listener, back-pressure, and spilling on a
broken connection or an oversized frame (nothing finished is lost)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from engine.stream import FileSink, FrameError, TcpSink, TrajectoryStream, encode_frame, iter_frames, read_frame, read_frames
from engine.trajectory import Trajectory, unpack_group


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
        await release.wait()  # a slow learner: reads nothing at first
        while len(received) < 3:
            payload = await read_frame(reader, 1 << 24)
            assert payload is not None
            received.append(payload)
            first_read.set()
        writer.close()  # then it goes away

    server = await asyncio.start_server(learner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = await TcpSink.connect("127.0.0.1", port, timeout_s=5)
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
        while (payload := await read_frame(reader, 1 << 24)) is not None:
            received.append(unpack_group(payload)[0].meta["i"])
        writer.close()

    server = await asyncio.start_server(learner, "127.0.0.1", 0)
    sink = await TcpSink.connect("127.0.0.1", server.sockets[0].getsockname()[1], timeout_s=5)
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
