"""A disk as another disk's base: how a root disk reads an image that lives in an object
store (block by block, as the guest touches it, never downloading the whole), and how a
checkpoint boots as a throwaway copy (writes go to a scratch disk over it).

:class:`DiskBase` stands where a :class:`BaseImage` file would. The disk above reads its
base from a worker thread; each read hops back into the trio loop that owns the disk
below (``trio.from_thread``), whose own cache and read-ahead then apply.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from .disk import BaseImage, Disk


class DiskBase(BaseImage):
    """A read-only :class:`Disk` used as a base image. ``digest`` is what the disk above
    records as its base (the image's sha256, or a name for a scratch disk's checkpoint)."""

    def __init__(self, disk: Disk, digest: str, description: str) -> None:
        # A BaseImage without a file: the reads below go to ``disk``.
        self.path = Path(description)
        self._fd = -1
        self.size = disk.size
        self._digest = digest
        self._disk = disk
        self._token = trio.lowlevel.current_trio_token()

    def read(self, offset: int, length: int) -> bytes:
        """Called from a worker thread of the loop that owns the disk below."""
        end = min(offset + length, self.size)
        data = b""
        if offset < end:
            data = trio.from_thread.run(
                self._disk.read, offset, end - offset, trio_token=self._token
            )
        return data + bytes(length - len(data)) if len(data) < length else data

    def close(self) -> None:
        """The disk below is closed by whoever opened it."""


def scratch_digest(what: str) -> str:
    """A stable stand-in digest for a base that is not an image (a checkpoint)."""
    return hashlib.sha256(f"lanekit-scratch-base:{what}".encode()).hexdigest()
