"""Which trajectory groups the learner must remember so that no group is trained twice, in bounded memory.

Where a repeat can come from: group ids are `<engine run id>-<counter>`, so a new engine (a resumed `ssp train`)
never reuses an id, and a file source resumes at the byte offset saved in the checkpoint. The one way a trained
group comes back is the engine's resend: when its TCP connection breaks, `ssp.engine.stream.TrajectoryStream` writes the
frames it sent last, up to `resend_window_bytes` (64 MiB, and always at least the newest frame), to the spill file
again, because they may still have been sitting unread in socket buffers. The learner reads the stream in order,
so a trained frame that can come back lies within the last `resend_window_bytes` of frames the learner consumed.

`RecentGroups` keeps exactly that: the ids of the groups whose frames make up the last `window_bytes` of consumed
stream, evicted by the engine's own rule (drop the oldest while more than one is kept and the total exceeds the
window). With `window_bytes` >= the engine's resend window every possible repeat is recognised, and a checkpoint
holds at most window_bytes / (smallest frame) ids however long the run (a few thousand for 64 MiB of typical
frames), instead of every id ever trained.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class RecentGroups:
    """Ids (with frame sizes) of the groups consumed within the last `window_bytes` of the stream, oldest first."""

    def __init__(self, window_bytes: int, ids: Iterable[str] = (), sizes: Iterable[int] = ()) -> None:
        ids, sizes = list(ids), list(sizes)
        if len(ids) != len(sizes):
            raise ValueError(f"{len(ids)} group ids but {len(sizes)} frame sizes: the checkpoint's state.json is "
                             "inconsistent (consumed_group_ids and consumed_group_bytes must pair up); restore it "
                             "or start the run fresh")
        self.window_bytes = window_bytes
        self._entries: deque[tuple[str, int]] = deque()
        self._ids: set[str] = set()
        self._bytes = 0
        for gid, size in zip(ids, sizes):
            self.add(gid, size)

    def __contains__(self, group_id: str) -> bool:
        return group_id in self._ids

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, group_id: str, frame_bytes: int) -> None:
        """Record a consumed group (its frame's size: header + payload) and forget what fell out of the window."""
        self._entries.append((group_id, frame_bytes))
        self._ids.add(group_id)
        self._bytes += frame_bytes
        while len(self._entries) > 1 and self._bytes > self.window_bytes:
            old, size = self._entries.popleft()
            self._ids.discard(old)
            self._bytes -= size

    def ids(self) -> list[str]:
        return [gid for gid, _ in self._entries]

    def sizes(self) -> list[int]:
        return [size for _, size in self._entries]
