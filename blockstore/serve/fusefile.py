"""The disk as one file, ``MOUNTPOINT/disk``, over FUSE (like s3backer's file mode).

The kernel loop device can sit on that file (``losetup``, ``mkfs.ext4``, ``mount``). An
fsync of the file is a durable flush of the disk; unmounting flushes and releases. FUSE
protocol code only: storage errors become errno here, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import subprocess
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
        self.initialized = trio.Event()

    def init(self) -> None:
        """pyfuse3 calls it with the kernel's INIT, on the loop; the reply follows at once."""
        self.initialized.set()

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


def _without_symlinks(path: str | os.PathLike[str]) -> str:
    """``path`` as the mount table names it; only its parent is resolved, since a lookup
    of a mount point itself asks the mount's server."""
    where = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(where)), os.path.basename(where))


def _mounts_at(path: str) -> list[tuple[str, str]]:
    """``(major:minor, fstype)`` of each mount at exactly ``path``, the topmost last, read
    from the mount table (a stat would ask the mount's own server)."""

    def unescape(field: str) -> str:  # mountinfo writes space, tab, newline, \\ in octal
        return field.encode().decode("unicode_escape").encode("latin-1").decode()

    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape(fields[4]) == path:
                found.append((fields[2], fields[fields.index("-") + 1]))
    return found


def _write_readahead(device: str, readahead_kb: int) -> None:
    path = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    with contextlib.suppress(OSError):
        path.write_text(str(readahead_kb))


def set_fuse_readahead(mountpoint: str | os.PathLike[str], readahead_kb: int) -> None:
    """Raise a FUSE mount's read-ahead through its bdi (pyfuse3 cannot pass
    max_readahead); at the default 128 KiB, sequential reads arrive as small requests.
    The stat waits until the server has answered INIT (which sets read-ahead too)."""
    dev = os.stat(mountpoint).st_dev
    _write_readahead(f"{os.major(dev)}:{os.minor(dev)}", readahead_kb)


def set_own_fuse_readahead(mountpoint: str | os.PathLike[str], readahead_kb: int) -> None:
    """:func:`set_fuse_readahead` for the mount's own server, once it has answered INIT.

    The device number comes from the mount table, not from a stat: a server that stats
    its own mount has a thread waiting on a request only the server answers, and a kill -9
    caught in that window never completes (the thread waits uninterruptibly, so
    ``/dev/fuse`` stays open, the mount hangs and auto_unmount never runs).
    """
    mounts = _mounts_at(_without_symlinks(mountpoint))
    if mounts:
        _write_readahead(mounts[-1][0], readahead_kb)


DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


def is_dead_fuse_mount(path: str | os.PathLike[str]) -> bool:
    """Whether a FUSE mount whose server is gone sits at ``path``: its kernel connection
    was aborted, so requests answer ENOTCONN (or ECONNABORTED for one caught by the abort).
    statfs, not stat: the kernel may answer a stat of the root from its attribute cache,
    dead server or not, but always asks the server for statfs."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in DEAD_MOUNT_ERRNOS
    return False


def _fuse_mounted(path: str) -> bool:
    mounts = _mounts_at(path)
    return bool(mounts) and mounts[-1][1].split(".")[0] in ("fuse", "fuseblk")


def _detach(path: str) -> None:
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot unmount the dead FUSE mount: {os.strerror(code)}", path)
        return
    done = subprocess.run(["fusermount3", "-uz", path], capture_output=True, text=True)
    if done.returncode != 0:
        reason = done.stderr.strip() or f"fusermount3 exited {done.returncode}"
        raise OSError(errno.EPERM, f"cannot unmount the dead FUSE mount: {reason}", path)


def clear_dead_fuse_mount(path: str | os.PathLike[str]) -> str | None:
    """Detach the dead FUSE mounts at ``path`` (``umount2(MNT_DETACH)`` as root, else
    ``fusermount3 -uz``) so it can be mounted again; returns a one-line notice saying so,
    or None when there was none.

    ``auto_unmount`` cannot always do it: fusermount3 (libfuse 3.14) mounts, then hands
    the ``/dev/fuse`` descriptor to the server; a server killed in between leaves
    fusermount3 failing to send it (EPIPE or SIGPIPE) and exiting without unmounting,
    before its auto-unmount watcher exists.
    """
    where = _without_symlinks(path)
    cleared = 0
    while is_dead_fuse_mount(where) and cleared < 8 and _fuse_mounted(where):
        _detach(where)
        cleared += 1
    if is_dead_fuse_mount(where):
        raise OSError(
            errno.ENOTCONN,
            "the mount point is not reachable and no FUSE mount to clear sits exactly there "
            "(is a directory above it a dead mount?)",
            where,
        )
    if not cleared:
        return None
    mounts = "a dead FUSE mount" if cleared == 1 else f"{cleared} dead FUSE mounts"
    return f"lanekit: cleared {mounts} at {where} (left by a server that died)"


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
        ops.initialized.set()  # gone before INIT: nothing to wait for

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await ops.initialized.wait()
            await trio.to_thread.run_sync(set_own_fuse_readahead, mountpoint, 4096)
            task_status.started()
    finally:
        pyfuse3.close(unmount=not unmounted)
