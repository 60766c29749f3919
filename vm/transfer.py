"""Images in object stores: each image is a read-only disk of the block store, named by its
digest, so a host that has never built it boots from it lazily (only the blocks the guest
touches are fetched) and ``image pull`` is a verified export of it.

``image-sha256-<digest>`` holds the raw image; its checkpoint ``complete`` is written last,
after every block is durable, and only a complete image is ever read: an upload cut short
(a crash, a lost store) is resumed by the next one, since the name is its content.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

import blockstore
from blockstore import DiskBase, ObjectStore
from blockstore.sparse import data_ranges

from .errors import ImageNotFoundError
from .images import ImageMeta, ImageStore, check_digest

COMPLETE = "complete"
CHUNK = 4 << 20
Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) as a transfer goes."""


def image_disk(digest: str) -> str:
    return f"image-sha256-{check_digest(digest)}"


def stored(objects: ObjectStore, digest: str) -> bool:
    """Whether a complete copy of the image is in the store (blocking)."""
    name = image_disk(digest)
    try:
        return COMPLETE in blockstore.list_checkpoints(objects, name)
    except blockstore.DiskNotFound:
        return False


async def push(
    images: ImageStore, digest: str, objects: ObjectStore, progress: Progress | None = None
) -> int:
    """Put a local image into the store (once per store); returns bytes uploaded."""
    digest = check_digest(digest)
    if await trio.to_thread.run_sync(stored, objects, digest):
        return 0
    path = images.path(digest)
    name = image_disk(digest)
    size = path.stat().st_size
    with contextlib.suppress(blockstore.DiskExists):
        await blockstore.create((objects, name), size)
    async with blockstore.open_disk((objects, name)) as disk:
        sent = await copy_file_into(disk, path, progress)
        await disk.checkpoint(COMPLETE)
    return sent


async def copy_file_into(
    disk: blockstore.Disk, path: Path, progress: Progress | None = None
) -> int:
    """Write the parts of a (sparse) file that hold data into ``disk`` at the same offsets,
    all-zero chunks skipped; returns the bytes read. The caller flushes."""
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    sent = 0
    try:
        size = os.fstat(fd).st_size
        ranges = await trio.to_thread.run_sync(data_ranges, fd, size)
        total = sum(length for _, length in ranges)
        for start, length in ranges:
            for offset in range(start, start + length, CHUNK):
                n = min(CHUNK, start + length - offset)
                data = await trio.to_thread.run_sync(os.pread, fd, n, offset)
                if data.count(0) != len(data):
                    await disk.write(offset, data)
                sent += n
                if progress is not None:
                    progress(sent, total)
    finally:
        os.close(fd)
    return sent


@contextlib.asynccontextmanager
async def open_base(objects: ObjectStore, digest: str) -> AsyncIterator[DiskBase]:
    """The image in the store as a base for a root disk, read as the guest reads it."""
    digest = check_digest(digest)
    if not await trio.to_thread.run_sync(stored, objects, digest):
        raise ImageNotFoundError(f"no complete image sha256:{digest} in {objects.describe()}")
    target = (objects, f"{image_disk(digest)}@{COMPLETE}")
    async with blockstore.open_disk(target, writable=False) as disk:
        yield DiskBase(disk, digest, f"{objects.describe()} image sha256:{digest}")


async def pull(
    images: ImageStore, digest: str, objects: ObjectStore, progress: Progress | None = None
) -> ImageMeta:
    """Copy an image from the store to this host; it appears only once its digest checks."""
    digest = check_digest(digest)
    if images.has(digest):
        return images.meta(digest)
    if not await trio.to_thread.run_sync(stored, objects, digest):
        raise ImageNotFoundError(
            f"no image sha256:{digest} in {objects.describe()}: push it from a host that has it "
            f"(`lanekit image push sha256:{digest} --store URL`)"
        )
    work = await trio.to_thread.run_sync(images.new_build_dir)
    try:
        target = work / "disk.raw"
        async with blockstore.open_disk(
            (objects, f"{image_disk(digest)}@{COMPLETE}"), writable=False
        ) as disk:
            await _export(disk, target, progress)
        actual = await trio.to_thread.run_sync(blockstore.sha256_file, target)
        if actual != digest:
            raise ImageNotFoundError(
                f"the image in {objects.describe()} has sha256:{actual}, not sha256:{digest}: "
                "the store's copy is damaged; push it again"
            )
        return await trio.to_thread.run_sync(
            lambda: images.add(target, {"kind": "pulled", "store": objects.describe()}, digest)
        )
    finally:
        await trio.to_thread.run_sync(lambda: _remove_tree(work))


async def _export(disk: blockstore.Disk, target: Path, progress: Progress | None) -> None:
    fd = await trio.to_thread.run_sync(
        lambda: os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    )
    try:
        await trio.to_thread.run_sync(os.ftruncate, fd, disk.size)
        for offset in range(0, disk.size, CHUNK):
            n = min(CHUNK, disk.size - offset)
            runs = await disk.extents(offset, n)
            if not all(flags & blockstore.ZERO_FLAG for _, flags in runs):
                data = await disk.read(offset, n)
                await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
            if progress is not None:
                progress(offset + n, disk.size)
        await trio.to_thread.run_sync(os.fsync, fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
