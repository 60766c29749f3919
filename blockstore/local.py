"""Local files under a disk: its read-only base image, and the spill file for dirty blocks
beyond the memory budget while the store is failing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


class BaseImage:
    """A read-only raw image under a disk; identified by the sha256 of its content."""

    def __init__(self, path: str | os.PathLike[str], digest: str | None = None) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self._digest = digest

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = sha256_file(self.path)
        return self._digest

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset) if offset < self.size else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpillFile:
    """Fixed-size slots in an unlinked temporary file, for dirty blocks beyond the memory budget."""

    def __init__(self, block_size: int, directory: str | None) -> None:
        self.block_size = block_size
        self._fd, name = tempfile.mkstemp(prefix="lanekit-spill-", dir=directory)
        os.unlink(name)
        self._free: list[int] = []
        self._next = 0
        self._pins: dict[int, int] = {}
        self._freed_while_pinned: set[int] = set()

    def allocate(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def free(self, slot: int) -> None:
        if slot in self._pins:
            self._freed_while_pinned.add(slot)
        else:
            self._free.append(slot)

    @contextlib.contextmanager
    def pinned(self, slots: Iterable[int]) -> Iterator[None]:
        """Keep ``slots`` from being given out again while a read of them is under way
        in another thread: a slot freed meanwhile (its block rewritten) returns to the
        free list only after, or the read could return another block's bytes."""
        slots = list(slots)
        for slot in slots:
            self._pins[slot] = self._pins.get(slot, 0) + 1
        try:
            yield
        finally:
            for slot in slots:
                self._pins[slot] -= 1
                if not self._pins[slot]:
                    del self._pins[slot]
                    if slot in self._freed_while_pinned:
                        self._freed_while_pinned.discard(slot)
                        self._free.append(slot)

    def write(self, slot: int, data: bytes) -> None:
        os.pwrite(self._fd, data, slot * self.block_size)

    def read(self, slot: int) -> bytes:
        return os.pread(self._fd, self.block_size, slot * self.block_size)

    def close(self) -> None:
        os.close(self._fd)
