"""The guest agent's buffers: frames queued for the port, and output kept for a reattach.

Under TCG a copy of 64 KiB costs about half a millisecond, so the agent copies data as
little as it can: a pipe read becomes a frame's payload by reference, and the port is
written from memoryviews of it. A virtio-serial write takes at most 32 KiB; small frames
(headers, replies) are joined into one write with the start of the next payload.
"""

from __future__ import annotations

import os
from _collections import deque  # type: ignore[import-not-found]  # collections.py: 24 ms under TCG

PORT_WRITE = 32 << 10


class Outbox:
    """Bytes waiting for the port, as a queue of pieces."""

    def __init__(self) -> None:
        self._pieces: deque[bytes | memoryview] = deque()
        self.size = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def put(self, *pieces: bytes | memoryview) -> None:
        for piece in pieces:
            if piece:
                self._pieces.append(piece)
                self.size += len(piece)

    def clear(self) -> None:
        self._pieces.clear()
        self.size = 0

    def _next_write(self) -> bytes | memoryview:
        first = self._pieces[0]
        if len(first) >= PORT_WRITE or len(self._pieces) == 1:
            return memoryview(first)[:PORT_WRITE]
        parts: list[bytes | memoryview] = []
        room = PORT_WRITE
        for piece in self._pieces:
            if not room:
                break
            parts.append(memoryview(piece)[:room])
            room -= min(room, len(piece))
        return b"".join(parts)

    def write_to(self, fd: int) -> None:
        """Write until the port would block (BlockingIOError propagates; other errors too)."""
        while self._pieces:
            n = os.write(fd, self._next_write())
            self.size -= n
            while n:
                first = self._pieces[0]
                if n >= len(first):
                    n -= len(first)
                    self._pieces.popleft()
                else:
                    self._pieces[0] = memoryview(first)[n:]
                    n = 0

    def drain_blocking(self, fd: int) -> None:
        """Everything, waiting as long as it takes (before the agent execs poweroff)."""
        os.set_blocking(fd, True)
        self.write_to(fd)


class Retained:
    """A channel's bytes sent to the host but not yet consumed there, by offset."""

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self.start = 0
        self.size = 0

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def consumed(self, offset: int) -> None:
        """Forget everything before ``offset``."""
        drop = offset - self.start
        while drop > 0 and self._chunks:
            first = self._chunks[0]
            if drop >= len(first):
                self._chunks.popleft()
                drop -= len(first)
                self.size -= len(first)
                self.start += len(first)
            else:
                self._chunks[0] = memoryview(first)[drop:]
                self.size -= drop
                self.start += drop
                drop = 0

    def pieces(self) -> list[bytes]:
        return [bytes(c) for c in self._chunks]
