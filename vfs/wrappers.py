"""Filesystems made of other filesystems: a read-only view, a hub of several, and a
threaded adapter for filesystems written as plain blocking methods.

A hub exists because pyfuse3 allows one mount per process: a VM with three host
filesystems gets one FUSE mount whose top-level directories are those filesystems, and
virtiofsd exports each directory.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import trio

from .changes import Change, EntryChanged, NodeChanged, Observer
from .interface import (
    XATTR_METHODS,
    Attr,
    Context,
    Filesystem,
    FSError,
    Handle,
    Key,
    NotFound,
    NotSupported,
    ReadOnly,
    SetAttr,
    StatFS,
)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def remove() -> None:
        first()
        second()

    return remove


class ReadOnlyFS(Filesystem):
    """Everything of ``inner`` that reads; every change is ``EROFS``."""

    def __init__(self, inner: Filesystem) -> None:
        self.inner = inner
        self.kernel_cache = getattr(inner, "kernel_cache", False)

    @property
    def root(self) -> Key:
        return self.inner.root

    async def lookup(self, parent: Key, name: bytes) -> Attr:
        return await self.inner.lookup(parent, name)

    async def getattr(self, key: Key) -> Attr:
        return await self.inner.getattr(key)

    async def opendir(self, key: Key) -> Handle:
        return await self.inner.opendir(key)

    def readdir(self, handle: Handle, offset: int) -> AsyncIterator[tuple[bytes, Attr, int]]:
        return self.inner.readdir(handle, offset)

    async def releasedir(self, handle: Handle) -> None:
        await self.inner.releasedir(handle)

    async def forget(self, key: Key, count: int) -> None:
        await self.inner.forget(key, count)

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Changes made to the inner filesystem behind the mount reach the mount too."""
        return _both(super().observe(observer), self.inner.observe(observer))

    async def readlink(self, key: Key) -> bytes:
        return await self.inner.readlink(key)

    async def open(self, key: Key, flags: int) -> Handle:
        if flags & _WRITE_FLAGS:
            raise ReadOnly()
        return await self.inner.open(key, flags)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return await self.inner.read(handle, offset, size)

    async def flush(self, handle: Handle) -> None:
        await self.inner.flush(handle)

    @property
    def wants_flush(self) -> bool:
        return self.inner.wants_flush

    @property
    def has_xattrs(self) -> bool:
        return self.inner.has_xattrs

    async def release(self, handle: Handle) -> None:
        await self.inner.release(handle)

    async def statfs(self) -> StatFS:
        return await self.inner.statfs()

    async def getxattr(self, key: Key, name: bytes) -> bytes:
        return await self.inner.getxattr(key, name)

    async def listxattr(self, key: Key) -> list[bytes]:
        return await self.inner.listxattr(key)


class Hub(Filesystem):
    """A read-only root directory whose entries are whole filesystems."""

    ROOT = ("hub",)

    def __init__(self, members: Mapping[str, Filesystem]) -> None:
        self.names = [n.encode() for n in members]
        self.members = list(members.values())
        self.kernel_cache = False
        self._created = time.time_ns()

    @property
    def root(self) -> Key:
        return self.ROOT

    def _split(self, key: Any) -> tuple[Filesystem, Any, int]:
        if not isinstance(key, tuple) or len(key) != 2 or key == self.ROOT:
            raise FSError("operation not allowed on the hub root", errno.EPERM)
        index, inner = key
        return self.members[index], inner, index

    def _wrap(self, index: int, attr: Attr) -> Attr:
        attr.key = (index, attr.key)
        return attr

    def _root_attr(self) -> Attr:
        t = self._created
        return Attr(self.ROOT, stat.S_IFDIR | 0o755, 0, 2 + len(self.members), 0, 0, 0, t, t, t)

    @property
    def writeback_cache(self) -> bool:
        return bool(self.members) and all(member.writeback_cache for member in self.members)

    def observe(self, observer: Observer) -> Callable[[], None]:
        """The members' changes, with their keys as the hub names them."""
        remove = super().observe(observer)
        for index, member in enumerate(self.members):
            remove = _both(remove, member.observe(self._translated(index, observer)))
        return remove

    def _translated(self, index: int, observer: Observer) -> Observer:
        async def translated(changes: Sequence[Change]) -> None:
            await observer(
                [
                    NodeChanged((index, c.key))
                    if isinstance(c, NodeChanged)
                    else EntryChanged((index, c.parent), c.name)
                    for c in changes
                ]
            )

        return translated

    async def lookup(self, parent: Key, name: bytes) -> Attr:
        if parent == self.ROOT:
            if name not in self.names:
                raise NotFound()
            index = self.names.index(name)
            return self._wrap(index, await self.members[index].getattr(self.members[index].root))
        fs, inner, index = self._split(parent)
        return self._wrap(index, await fs.lookup(inner, name))

    async def getattr(self, key: Key) -> Attr:
        if key == self.ROOT:
            return self._root_attr()
        fs, inner, index = self._split(key)
        return self._wrap(index, await fs.getattr(inner))

    async def statfs(self) -> StatFS:
        """The sum of the members (the kernel asks once per mount, not per directory)."""
        total = [0, 0, 0, 0]
        for fs in self.members:
            info = await fs.statfs()
            scale = info.block_size / 4096
            total[0] += int(info.blocks * scale)
            total[1] += int(info.blocks_free * scale)
            total[2] += info.files
            total[3] += info.files_free
        return StatFS(4096, *total)

    async def opendir(self, key: Key) -> Handle:
        if key == self.ROOT:
            return (None, self.ROOT)
        fs, inner, index = self._split(key)
        return (index, await fs.opendir(inner))

    async def readdir(self, handle: Handle, offset: int) -> AsyncIterator[tuple[bytes, Attr, int]]:
        index, inner = handle
        if index is None:
            for i in range(offset, len(self.members)):
                fs = self.members[i]
                yield self.names[i], self._wrap(i, await fs.getattr(fs.root)), i + 1
            return
        async for name, attr, cookie in self.members[index].readdir(inner, offset):
            yield name, self._wrap(index, attr), cookie

    async def releasedir(self, handle: Handle) -> None:
        index, inner = handle
        if index is not None:
            await self.members[index].releasedir(inner)

    async def forget(self, key: Key, count: int) -> None:
        if key != self.ROOT:
            assert isinstance(key, tuple)
            if key[1] == self.members[key[0]].root:
                return
            fs, inner, _ = self._split(key)
            await fs.forget(inner, count)

    async def setattr(self, key: Key, changes: SetAttr, ctx: Context) -> Attr:
        fs, inner, index = self._split(key)
        return self._wrap(index, await fs.setattr(inner, changes, ctx))

    async def readlink(self, key: Key) -> bytes:
        fs, inner, _ = self._split(key)
        return await fs.readlink(inner)

    async def mknod(self, parent: Key, name: bytes, mode: int, rdev: int, ctx: Context) -> Attr:
        fs, inner, index = self._split(parent)
        return self._wrap(index, await fs.mknod(inner, name, mode, rdev, ctx))

    async def mkdir(self, parent: Key, name: bytes, mode: int, ctx: Context) -> Attr:
        fs, inner, index = self._split(parent)
        return self._wrap(index, await fs.mkdir(inner, name, mode, ctx))

    async def symlink(self, parent: Key, name: bytes, target: bytes, ctx: Context) -> Attr:
        fs, inner, index = self._split(parent)
        return self._wrap(index, await fs.symlink(inner, name, target, ctx))

    async def link(self, key: Key, parent: Key, name: bytes) -> Attr:
        fs, inner, index = self._split(key)
        _, inner_parent, index2 = self._split(parent)
        if index != index2:
            raise FSError("hard link across filesystems", errno.EXDEV)
        return self._wrap(index, await fs.link(inner, inner_parent, name))

    async def unlink(self, parent: Key, name: bytes) -> None:
        fs, inner, _ = self._split(parent)
        await fs.unlink(inner, name)

    async def rmdir(self, parent: Key, name: bytes) -> None:
        fs, inner, _ = self._split(parent)
        await fs.rmdir(inner, name)

    async def rename(
        self, old_parent: Key, old_name: bytes, new_parent: Key, new_name: bytes, flags: int
    ) -> None:
        fs, old, index = self._split(old_parent)
        _, new, index2 = self._split(new_parent)
        if index != index2:
            raise FSError("rename across filesystems", errno.EXDEV)
        await fs.rename(old, old_name, new, new_name, flags)

    async def open(self, key: Key, flags: int) -> Handle:
        fs, inner, _ = self._split(key)
        return (fs, await fs.open(inner, flags))

    async def create(
        self, parent: Key, name: bytes, mode: int, flags: int, ctx: Context
    ) -> tuple[Attr, Handle]:
        fs, inner, index = self._split(parent)
        attr, handle = await fs.create(inner, name, mode, flags, ctx)
        return self._wrap(index, attr), (fs, handle)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return await handle[0].read(handle[1], offset, size)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        return await handle[0].write(handle[1], offset, data)

    async def flush(self, handle: Handle) -> None:
        await handle[0].flush(handle[1])

    @property
    def wants_flush(self) -> bool:
        return any(member.wants_flush for member in self.members)

    @property
    def has_xattrs(self) -> bool:
        return any(member.has_xattrs for member in self.members)

    def _xattr_member(self, key: Key) -> tuple[Filesystem, Any]:
        """A member without xattrs refuses them itself: an ENOSYS from it would switch
        xattrs off in the kernel for the whole mount, its other members included."""
        fs, inner, _ = self._split(key)
        if not fs.has_xattrs:
            raise FSError("this filesystem keeps no extended attributes", errno.EOPNOTSUPP)
        return fs, inner

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        """A member with nothing to sync succeeds here: its ENOSYS would switch fsync off
        in the kernel for the whole mount, so the other members would never be synced."""
        with contextlib.suppress(NotSupported):
            await handle[0].fsync(handle[1], datasync)

    async def fsyncdir(self, handle: Handle, datasync: bool) -> None:
        index, inner = handle
        if index is not None:
            with contextlib.suppress(NotSupported):
                await self.members[index].fsyncdir(inner, datasync)

    async def release(self, handle: Handle) -> None:
        await handle[0].release(handle[1])

    async def getxattr(self, key: Key, name: bytes) -> bytes:
        if key == self.ROOT:
            raise FSError("", errno.ENODATA)
        fs, inner = self._xattr_member(key)
        return await fs.getxattr(inner, name)

    async def listxattr(self, key: Key) -> list[bytes]:
        if key == self.ROOT:
            return []
        fs, inner = self._xattr_member(key)
        return await fs.listxattr(inner)

    async def setxattr(self, key: Key, name: bytes, value: bytes) -> None:
        fs, inner = self._xattr_member(key)
        await fs.setxattr(inner, name, value)

    async def removexattr(self, key: Key, name: bytes) -> None:
        fs, inner = self._xattr_member(key)
        await fs.removexattr(inner, name)


_FORWARDED = (
    "lookup", "getattr", "opendir", "releasedir", "forget", "setattr", "readlink", "mknod",
    "mkdir", "symlink", "link", "unlink", "rmdir", "rename", "open", "create", "read",
    "write", "flush", "fsync", "fsyncdir", "release", "statfs", *XATTR_METHODS,
)  # fmt: skip
_READDIR_BATCH = 256


class Threaded(Filesystem):
    """Serve an object whose methods are those of :class:`Filesystem`, but plain blocking
    functions (``readdir`` returns an iterable): each call runs in a worker thread, so disk
    or network I/O and long computations in it never stall the loop answering the kernel.

    A method the object lacks gives :class:`Filesystem`'s default answer. Calls are made
    one at a time, under a lock, since few plain objects expect several threads; pass
    ``thread_safe=True`` to let them overlap.
    """

    def __init__(self, inner: Any, *, thread_safe: bool = False) -> None:
        self.inner = inner
        self.kernel_cache = getattr(inner, "kernel_cache", False)
        # a trio lock: calls waiting their turn hold no worker thread
        self._lock = None if thread_safe else trio.Lock()

    @property
    def root(self) -> Key:
        return self.inner.root

    @property
    def wants_flush(self) -> bool:
        return hasattr(self.inner, "flush")

    @property
    def writeback_cache(self) -> bool:
        return bool(getattr(self.inner, "writeback_cache", False))

    @property
    def has_xattrs(self) -> bool:
        return any(hasattr(self.inner, name) for name in XATTR_METHODS)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._lock is None:
            return await trio.to_thread.run_sync(fn, *args)
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args)

    async def _call(self, name: str, *args: Any) -> Any:
        fn = getattr(self.inner, name, None)
        if fn is None:
            return await getattr(Filesystem, name)(self, *args)
        return await self._in_thread(fn, *args)

    async def readdir(self, handle: Handle, offset: int) -> AsyncIterator[tuple[bytes, Attr, int]]:
        entries: Iterator[tuple[bytes, Attr, int]] = await self._in_thread(
            lambda: iter(self.inner.readdir(handle, offset))
        )

        def take() -> list[tuple[bytes, Attr, int]]:
            return list(itertools.islice(entries, _READDIR_BATCH))

        while batch := await self._in_thread(take):
            for entry in batch:
                yield entry


def _forward(name: str) -> Callable[..., Any]:
    async def forward(self: Threaded, *args: Any) -> Any:
        return await self._call(name, *args)

    forward.__name__ = forward.__qualname__ = name
    return forward


for _name in _FORWARDED:
    setattr(Threaded, _name, _forward(_name))
