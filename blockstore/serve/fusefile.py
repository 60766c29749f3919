"""The disk as one file, ``MOUNTPOINT/disk``, over FUSE (like s3backer's file mode).

The kernel loop device can sit on that file (``losetup``, ``mkfs.ext4``, ``mount``). An
fsync of the file is a durable flush of the disk; unmounting flushes and releases. FUSE
protocol code only: storage errors become errno here, once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from ..errors import OutOfRange, ReadOnly
from .nbd import BlockDevice

log = logging.getLogger(__name__)

FILE_NAME = b"disk"
ROOT = pyfuse3.ROOT_INODE
FILE_INODE = ROOT + 1
T = TypeVar("T")


def fuse_errno(exc: BaseException) -> int:
    if isinstance(exc, ReadOnly):
        return errno.EROFS
    if isinstance(exc, OutOfRange):
        return errno.EINVAL
    return errno.EIO


async def _guard(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except pyfuse3.FUSEError:
        raise
    except Exception as e:
        log.warning("FUSE %s failed: %s", what, e)
        raise pyfuse3.FUSEError(fuse_errno(e)) from None


class DiskFile(pyfuse3.Operations):
    """A directory holding exactly one regular file: the disk."""

    enable_writeback_cache = False

    def __init__(self, device: BlockDevice) -> None:
        super().__init__()
        self.device = device
        self.mtime_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            mode = 0o444 if self.device.read_only else 0o644
            a.st_mode = stat.S_IFREG | mode
            a.st_nlink = 1
            a.st_size = self.device.size
            a.st_blocks = (self.device.size + 511) // 512
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = self.device.block_size
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.entry_timeout = a.attr_timeout = 60.0
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (ROOT, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.device.read_only and flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=FILE_INODE)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        size = max(0, min(size, self.device.size - off))
        return await _guard("read", lambda: self.device.read(off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.device.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        await _guard("write", lambda: self.device.write(off, bytes(buf)))
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await _guard("fsync", self.device.flush)

    async def flush(self, fh: int) -> None:
        """close(2): nothing to do; durability is fsync's job."""

    async def release(self, fh: int) -> None:
        pass

    async def releasedir(self, fh: int) -> None:
        pass

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if fields.update_size and attr.st_size != self.device.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        return self._attr(inode)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.device.size // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files, s.f_ffree, s.f_favail = 2, 0, 0
        s.f_namemax = 255
        return s


def set_fuse_readahead(mountpoint: str | os.PathLike[str], readahead_kb: int) -> None:
    """Raise a FUSE mount's read-ahead through its bdi (pyfuse3 cannot pass
    max_readahead); at the default 128 KiB, sequential reads arrive as small requests."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    with contextlib.suppress(OSError):
        path.write_text(str(readahead_kb))


async def mount_disk_file(
    device: BlockDevice,
    mountpoint: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until unmounted (returns) or cancelled (unmounts). One mount per process:
    pyfuse3 keeps global state. ``auto_unmount`` removes the mount even after kill -9."""
    ops = DiskFile(device)
    options = set(pyfuse3.default_options)
    options |= {"fsname=lanekit-disk", "subtype=lanekit", "auto_unmount", "allow_other"}
    pyfuse3.init(ops, mountpoint, options)
    unmounted = False

    async def serve() -> None:
        nonlocal unmounted
        await pyfuse3.main()
        unmounted = True

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            # The stat behind this needs the loop above to answer the kernel.
            await trio.to_thread.run_sync(set_fuse_readahead, mountpoint, 4096)
            task_status.started()
    finally:
        pyfuse3.close(unmount=not unmounted)
