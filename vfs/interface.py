"""The interface a host-implemented filesystem provides, and its errors.

It is node-based, like the kernel's: a filesystem names each file by a *key* of its own
choosing (any hashable value — an int, an ``(st_dev, st_ino)`` pair) and every operation
takes keys, not paths. Paths cannot express what POSIX tools rely on: a file that stays
readable after it is unlinked, hard links, a directory renamed while a process is inside
it. The FUSE adapter (:mod:`vfs.fuse`) turns keys into inode numbers with generations,
counts the kernel's lookups and calls :meth:`Filesystem.forget` when the kernel drops the
last one, keeps the open handles and maps exceptions to errno — so an implementation
only deals with its own data. Every method is async; code that blocks (disk I/O, big
computations) must run in a thread (``trio.to_thread.run_sync``), never on the loop.

Only :meth:`~Filesystem.lookup`, :meth:`~Filesystem.getattr` and
:meth:`~Filesystem.readdir` are required; everything else defaults to an error
(``ENOSYS`` for reads, ``EROFS`` for changes), so a read-only filesystem is small.
"""

from __future__ import annotations

import dataclasses
import errno
import stat
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import Any

import trio

from .changes import Change, Observer, Observers

Key = Hashable
Handle = Any

NAME_MAX = 255


class FSError(Exception):
    """An error with an errno; the adapter answers the kernel with it."""

    errno = errno.EIO

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if code is not None:
            self.errno = code


class NotFound(FSError):
    errno = errno.ENOENT


class Exists(FSError):
    errno = errno.EEXIST


class NotEmpty(FSError):
    errno = errno.ENOTEMPTY


class NotADirectory(FSError):
    errno = errno.ENOTDIR


class IsADirectory(FSError):
    errno = errno.EISDIR


class NoSpace(FSError):
    errno = errno.ENOSPC


class ReadOnly(FSError):
    errno = errno.EROFS


class NotPermitted(FSError):
    errno = errno.EPERM


class InvalidArgument(FSError):
    errno = errno.EINVAL


class NameTooLong(FSError):
    errno = errno.ENAMETOOLONG


class NoAttribute(FSError):
    errno = errno.ENODATA


class NotSupported(FSError):
    errno = errno.ENOSYS


@dataclasses.dataclass
class Attr:
    """What ``stat`` shows; times in nanoseconds since the epoch."""

    key: Key
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blocks: int | None = None
    """512-byte blocks allocated; None means ``ceil(size / 512)``."""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclasses.dataclass(frozen=True)
class SetAttr:
    """The fields a ``setattr`` changes; None leaves a field alone."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """Who asks: the caller's uid, gid and pid (the kernel has checked permissions)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


ROOT_CONTEXT = Context()


@dataclasses.dataclass(frozen=True)
class StatFS:
    block_size: int = 4096
    blocks: int = 0
    blocks_free: int = 0
    files: int = 0
    files_free: int = 0
    name_max: int = NAME_MAX


def check_name(name: bytes) -> bytes:
    """Refuse names no POSIX directory may hold."""
    if not name or name in (b".", b".."):
        raise InvalidArgument(f"invalid name {name!r}")
    if b"/" in name or b"\0" in name:
        raise InvalidArgument(f"name {name!r} contains '/' or NUL")
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes is over {NAME_MAX}")
    return name


XATTR_METHODS = ("getxattr", "listxattr", "setxattr", "removexattr")


class Filesystem:
    """Subclass and override what your filesystem supports."""

    @property
    def root(self) -> Key:
        raise NotImplementedError

    async def lookup(self, parent: Key, name: bytes) -> Attr:
        raise NotImplementedError

    async def getattr(self, key: Key) -> Attr:
        raise NotImplementedError

    async def opendir(self, key: Key) -> Handle:
        """Returns any object; it comes back to readdir/releasedir."""
        return key

    def readdir(self, handle: Handle, offset: int) -> AsyncIterator[tuple[bytes, Attr, int]]:
        """Entries after ``offset`` as (name, attributes, offset of this entry).

        Offsets are cookies the filesystem chooses (not indexes): a listing resumed at an
        offset must neither skip nor repeat entries that stayed while others changed.
        """
        raise NotImplementedError

    async def releasedir(self, handle: Handle) -> None:
        pass

    async def forget(self, key: Key, count: int) -> None:
        """Drop ``count`` references to ``key``.

        Every :class:`Attr` returned by lookup, readdir, create, mknod, mkdir, symlink and
        link carries one reference (getattr and setattr carry none). A filesystem that
        keeps per-node resources (an open descriptor) frees them when none is left.
        """

    async def setattr(self, key: Key, changes: SetAttr, ctx: Context) -> Attr:
        raise ReadOnly()

    async def readlink(self, key: Key) -> bytes:
        raise InvalidArgument("not a symbolic link")

    async def mknod(self, parent: Key, name: bytes, mode: int, rdev: int, ctx: Context) -> Attr:
        raise ReadOnly()

    async def mkdir(self, parent: Key, name: bytes, mode: int, ctx: Context) -> Attr:
        raise ReadOnly()

    async def symlink(self, parent: Key, name: bytes, target: bytes, ctx: Context) -> Attr:
        raise ReadOnly()

    async def link(self, key: Key, parent: Key, name: bytes) -> Attr:
        raise ReadOnly()

    async def unlink(self, parent: Key, name: bytes) -> None:
        raise ReadOnly()

    async def rmdir(self, parent: Key, name: bytes) -> None:
        raise ReadOnly()

    async def rename(
        self, old_parent: Key, old_name: bytes, new_parent: Key, new_name: bytes, flags: int
    ) -> None:
        raise ReadOnly()

    async def open(self, key: Key, flags: int) -> Handle:
        """Returns any object; it comes back to read/write/fsync/release.

        ``flags`` are open(2)'s as the kernel passes them on: ``O_TRUNC`` asks the
        filesystem to truncate (no setattr follows), and ``O_SYNC``/``O_DSYNC`` writes are
        followed by :meth:`fsync` before write(2) returns.
        """
        return key

    async def create(
        self, parent: Key, name: bytes, mode: int, flags: int, ctx: Context
    ) -> tuple[Attr, Handle]:
        raise ReadOnly()

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        raise NotSupported()

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        raise ReadOnly()

    async def flush(self, handle: Handle) -> None:
        """Called at every close(2) of a file handle; see :attr:`wants_flush`."""

    @property
    def wants_flush(self) -> bool:
        """Whether :meth:`flush` must run at each close. When it need not (the default
        ``flush`` is inherited), the kernel is told once and stops sending it: one round
        trip less per close. Written data still reaches :meth:`write` before close returns.
        """
        return type(self).flush is not Filesystem.flush

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        pass

    async def fsyncdir(self, handle: Handle, datasync: bool) -> None:
        """fsync(2) of a directory (``handle`` from :meth:`opendir`): make its entries
        durable."""

    async def release(self, handle: Handle) -> None:
        pass

    async def statfs(self) -> StatFS:
        return StatFS()

    @property
    def writeback_cache(self) -> bool:
        """Whether the kernel may buffer writes in its page cache (FUSE's writeback
        cache). It makes small writes cheaper, but the kernel then owns file sizes for good:
        a size changed behind the mount is never seen while the kernel holds the inode (not
        even after :meth:`notify`), and a write that runs out of space fails only at fsync
        or close, not at the write(2) itself. Only for a filesystem that changes through
        its mount alone and never runs out of space.
        """
        return False

    @property
    def has_xattrs(self) -> bool:
        """Whether the filesystem keeps extended attributes (it overrides an xattr method).
        When it does not, the kernel is told at the first xattr request and answers
        ``EOPNOTSUPP`` itself from then on. Otherwise it asks for ``security.capability``
        before every write(2): a round trip each, a third of the requests of a ``tar x``.
        """
        return any(getattr(type(self), m) is not getattr(Filesystem, m) for m in XATTR_METHODS)

    async def getxattr(self, key: Key, name: bytes) -> bytes:
        raise NoAttribute()

    async def listxattr(self, key: Key) -> list[bytes]:
        return []

    async def setxattr(self, key: Key, name: bytes, value: bytes) -> None:
        raise ReadOnly()

    async def removexattr(self, key: Key, name: bytes) -> None:
        raise ReadOnly()

    # ------------------------------------------------------------ changes behind the mount

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Register ``observer`` (what serves this filesystem) to hear of changes made
        behind the kernel's back; returns the function that unregisters it."""
        return self._observers().add(observer)

    async def notify(self, changes: Sequence[Change]) -> None:
        """Announce changes not made through the mount; returns once every observer has
        acted (a mount's kernel caches of those nodes and entries are gone). Must not be
        called from a request handler of the same mount."""
        await self._observers().notify(changes)

    @property
    def serving_loop(self) -> trio.lowlevel.TrioToken | None:
        """The trio token of the loop that serves this filesystem, None when unmounted."""
        return self._observers().loop

    def _observers(self) -> Observers:
        registry = vars(self).get("_vfs_observers")
        if registry is None:
            registry = vars(self).setdefault("_vfs_observers", Observers())
        return registry
