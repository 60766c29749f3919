"""Serve a :class:`~vfs.interface.Filesystem` with pyfuse3: the kernel-facing adapter.

The adapter owns what the kernel protocol needs and a user filesystem should not care
about: inode numbers (never reused within a mount, so the generation stays 0), the
kernel's lookup counts (``forget`` reaches the filesystem when the last one goes), file
and directory handles, and the mapping of exceptions to errno — :class:`FSError` gives
its errno, ``OSError`` its own, anything else is logged and answered with ``EIO`` so one
bad request never takes the mount down. pyfuse3 keeps global state, so a process has one
mount at a time; serve several filesystems at once with :class:`~vfs.hub.Hub`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from blockstore.concurrency import blocking
from blockstore.serve.fusefile import is_dead_fuse_mount, set_own_fuse_readahead

from .changes import Change, NodeChanged
from .interface import Attr, Context, Filesystem, FSError, Key, SetAttr, check_name
from .invalidate import Invalidation, Invalidator

log = logging.getLogger(__name__)
T = TypeVar("T")
# how long the kernel may trust names and attributes: long for a filesystem that changes
# only through its mount (``kernel_cache``), short for one that changes behind it
CACHED_TIMEOUT_S = 30.0
UNCACHED_TIMEOUT_S = 1.0
_mount_lock = threading.Lock()


class MountError(Exception):
    """The filesystem could not be mounted (busy process, bad mount point, no /dev/fuse)."""


async def _guard(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except pyfuse3.FUSEError:
        raise
    except FSError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    except NotImplementedError:
        raise pyfuse3.FUSEError(errno.ENOSYS) from None
    except (trio.Cancelled, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("vfs: %s failed with an unexpected exception; answering EIO", what)
        raise pyfuse3.FUSEError(errno.EIO) from None


def _ctx(ctx: pyfuse3.RequestContext | None) -> Context:
    if ctx is None:
        return Context()
    return Context(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)


class FuseAdapter(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, fs: Filesystem, *, timeout: float | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.enable_writeback_cache = fs.writeback_cache
        self.invalidator = Invalidator()
        self.initialized = trio.Event()
        self.keep_cache = bool(getattr(fs, "kernel_cache", False))
        default = CACHED_TIMEOUT_S if self.keep_cache else UNCACHED_TIMEOUT_S
        self.timeout = timeout if timeout is not None else default
        self._ino_of: dict[Key, int] = {fs.root: pyfuse3.ROOT_INODE}
        self._key_of: dict[int, Key] = {pyfuse3.ROOT_INODE: fs.root}
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, Any] = {}
        self._next_fh = 1
        self._has_xattrs = fs.has_xattrs

    # ------------------------------------------------------------ plumbing

    def init(self) -> None:
        """pyfuse3 calls it with the kernel's INIT, on the loop; the reply follows at once."""
        self.initialized.set()

    def _key(self, inode: int) -> Key:
        try:
            return self._key_of[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _stat(self, attr: Attr) -> pyfuse3.EntryAttributes:
        ino = self._ino_of.get(attr.key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_of[attr.key] = ino
            self._key_of[ino] = attr.key
            self._lookups[ino] = 0
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = 4096
        e.st_blocks = attr.blocks if attr.blocks is not None else (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        e.attr_timeout = self.timeout
        e.entry_timeout = self.timeout
        return e

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """Attributes the kernel will hold a reference to (one more lookup)."""
        e = self._stat(attr)
        self._lookups[e.st_ino] += 1
        return e

    def _new_handle(self, handle: Any) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Any:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    async def apply_changes(self, changes: Sequence[Change]) -> None:
        """The filesystem's observer: the kernel drops what it caches of the nodes and
        entries it knows among ``changes``; returns once it has."""
        work: list[Invalidation] = []
        for change in changes:
            if isinstance(change, NodeChanged):
                ino = self._ino_of.get(change.key)
                if ino is not None:
                    work.append((ino, None))
            else:
                ino = self._ino_of.get(change.parent)
                if ino is not None:
                    work.append((ino, change.name))
        await self.invalidator.submit(work)

    # ------------------------------------------------------------ lookups

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(name) > 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        key = self._key(parent_inode)
        attr = await _guard("lookup", lambda: self.fs.lookup(key, name))
        return self._entry(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            if inode == pyfuse3.ROOT_INODE or inode not in self._lookups:
                continue
            count = min(count, self._lookups[inode])
            self._lookups[inode] -= count
            key = self._key_of[inode]
            if self._lookups[inode] <= 0:
                del self._lookups[inode]
                del self._key_of[inode]
                self._ino_of.pop(key, None)
            try:
                await self.fs.forget(key, count)
            except Exception:
                log.exception("vfs: forget failed")

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        key = self._key(inode)
        return self._stat(await _guard("getattr", lambda: self.fs.getattr(key)))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        key = self._key(inode)
        changes = SetAttr(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        result = await _guard("setattr", lambda: self.fs.setattr(key, changes, _ctx(ctx)))
        return self._stat(result)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        key = self._key(inode)
        return await _guard("readlink", lambda: self.fs.readlink(key))

    # ------------------------------------------------------------ namespace

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        key = self._key(parent_inode)
        return self._entry(
            await _guard(
                "mknod", lambda: self.fs.mknod(key, check_name(name), mode, rdev, _ctx(ctx))
            )
        )

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        key = self._key(parent_inode)
        return self._entry(
            await _guard("mkdir", lambda: self.fs.mkdir(key, check_name(name), mode, _ctx(ctx)))
        )

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        key = self._key(parent_inode)
        return self._entry(
            await _guard(
                "symlink", lambda: self.fs.symlink(key, check_name(name), target, _ctx(ctx))
            )
        )

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        key, parent = self._key(inode), self._key(new_parent_inode)
        return self._entry(
            await _guard("link", lambda: self.fs.link(key, parent, check_name(new_name)))
        )

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        key = self._key(parent_inode)
        await _guard("unlink", lambda: self.fs.unlink(key, name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        key = self._key(parent_inode)
        await _guard("rmdir", lambda: self.fs.rmdir(key, name))

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = self._key(parent_inode_old), self._key(parent_inode_new)
        await _guard(
            "rename", lambda: self.fs.rename(old, name_old, new, check_name(name_new), flags)
        )

    # ------------------------------------------------------------ files

    def _file_info(self, handle: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=self.keep_cache)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        key = self._key(inode)
        return self._file_info(await _guard("open", lambda: self.fs.open(key, flags)))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        key = self._key(parent_inode)
        attr, handle = await _guard(
            "create", lambda: self.fs.create(key, check_name(name), mode, flags, _ctx(ctx))
        )
        return self._file_info(handle), self._entry(attr)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        return await _guard("read", lambda: self.fs.read(handle, off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        return await _guard("write", lambda: self.fs.write(handle, off, buf))

    async def flush(self, fh: int) -> None:
        if not self.fs.wants_flush:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops sending FLUSH
        handle = self._handle(fh)
        await _guard("flush", lambda: self.fs.flush(handle))

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        await _guard("fsync", lambda: self.fs.fsync(handle, datasync))

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            await _guard("release", lambda: self.fs.release(handle))

    # ------------------------------------------------------------ directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        key = self._key(inode)
        attr = await _guard("opendir", lambda: self.fs.getattr(key))
        if not stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_handle(await _guard("opendir", lambda: self.fs.opendir(key)))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)

        async def run() -> None:
            entries = self.fs.readdir(handle, start_id)
            try:
                async for name, attr, cookie in entries:
                    entry = self._stat(attr)
                    if not pyfuse3.readdir_reply(token, name, entry, cookie):
                        if self._lookups.get(entry.st_ino) == 0:
                            del self._lookups[entry.st_ino]
                            del self._key_of[entry.st_ino]
                            self._ino_of.pop(attr.key, None)
                        await self.fs.forget(attr.key, 1)
                        break
                    self._lookups[entry.st_ino] += 1
            finally:
                await entries.aclose()  # type: ignore[attr-defined]

        await _guard("readdir", run)

    async def releasedir(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            await _guard("releasedir", lambda: self.fs.releasedir(handle))

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        await _guard("fsyncdir", lambda: self.fs.fsyncdir(handle, datasync))

    # ------------------------------------------------------------ the rest

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = await _guard("statfs", self.fs.statfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = info.block_size
        s.f_blocks = info.blocks
        s.f_bfree = s.f_bavail = info.blocks_free
        s.f_files = info.files
        s.f_ffree = s.f_favail = info.files_free
        s.f_namemax = info.name_max
        return s

    def _xattr_key(self, inode: int) -> Key:
        if not self._has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking
        return self._key(inode)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = self._xattr_key(inode)
        return await _guard("getxattr", lambda: self.fs.getxattr(key, name))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        key = self._xattr_key(inode)
        return await _guard("listxattr", lambda: self.fs.listxattr(key))

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        key = self._xattr_key(inode)
        await _guard("setxattr", lambda: self.fs.setxattr(key, name, value))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        key = self._xattr_key(inode)
        await _guard("removexattr", lambda: self.fs.removexattr(key, name))


async def serve(
    fs: Filesystem,
    mountpoint: str | os.PathLike[str],
    *,
    allow_other: bool = True,
    fsname: str = "lanekit-vfs",
    readahead_kb: int = 4096,
    timeout: float | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fs`` until the mount is taken away (``umount``: returns) or until cancelled
    (unmounts). ``task_status.started`` gets the mount point once the kernel can use it.

    ``auto_unmount`` makes the kernel drop the mount even if this process is killed, and
    ``default_permissions`` has the kernel check modes, owners, sticky and setgid bits.
    While mounted, the adapter observes ``fs`` (:meth:`Filesystem.notify`) and drops the
    kernel's caches of what changed behind the mount.
    """
    target = Path(os.path.abspath(mountpoint))  # noqa: ASYNC240  (no I/O: string work)
    if await trio.to_thread.run_sync(is_dead_fuse_mount, target):
        raise MountError(
            f"mount point {target} is a dead FUSE mount (its server died): "
            f"clear it with 'fusermount3 -uz {target}'"
        )
    if not await trio.Path(target).is_dir():
        raise MountError(f"mount point {target} is not a directory: create it first")
    if not _mount_lock.acquire(blocking=False):
        raise MountError(
            "this process already serves a FUSE mount (pyfuse3 allows one per process); "
            "serve several filesystems under one mount with vfs.Hub"
        )
    try:
        options = {"default_permissions", "auto_unmount", f"fsname={fsname}", "subtype=lanekit"}
        if allow_other:
            options.add("allow_other")
        adapter = FuseAdapter(fs, timeout=timeout)
        try:
            pyfuse3.init(adapter, str(target), options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {target}: {exc}") from None
        unmounted = False
        unsubscribe = fs.observe(adapter.apply_changes)
        try:
            async with trio.open_nursery() as nursery:
                # Shielded: requests are answered until the invalidations in flight are
                # done (the kernel may hold them until related requests are answered).
                answering = trio.CancelScope(shield=True)
                invalidating = trio.CancelScope()

                async def main() -> None:
                    nonlocal unmounted
                    with answering:
                        await pyfuse3.main()
                        unmounted = True
                    invalidating.cancel()
                    adapter.initialized.set()  # gone before INIT: nothing to wait for

                async def invalidations() -> None:
                    with invalidating:
                        try:
                            await adapter.invalidator.run()
                        finally:
                            answering.cancel()

                nursery.start_soon(main)
                nursery.start_soon(invalidations)
                await adapter.initialized.wait()
                await trio.to_thread.run_sync(set_own_fuse_readahead, target, readahead_kb)
                task_status.started(target)
        finally:
            unsubscribe()
            pyfuse3.close(unmount=not unmounted)
    finally:
        _mount_lock.release()


@contextlib.asynccontextmanager
async def mount(
    fs: Filesystem, mountpoint: str | os.PathLike[str], **options: Any
) -> AsyncIterator[Path]:
    """Mount ``fs`` (options as for :func:`serve`) for the duration of the block; unmounts
    on every way out. A mount taken away from outside does not end the block."""
    async with trio.open_nursery() as nursery:
        target = await nursery.start(functools.partial(serve, fs, mountpoint, **options))
        try:
            yield target
        finally:
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def mount_blocking(
    fs: Filesystem, mountpoint: str | os.PathLike[str], **options: Any
) -> Iterator[Path]:
    """:func:`mount` for code that is not async: serves from a helper thread."""
    with blocking(lambda: mount(fs, mountpoint, **options)) as (target, _):
        yield target
