"""A host directory, confined: nothing outside the root can be reached through it.

Confinement does not rest on checking path strings. Every node the kernel knows is held
as an ``O_PATH`` descriptor opened *relative to its parent's descriptor* with
``O_NOFOLLOW``, one name at a time, and every operation is an ``*at`` call on those
descriptors (or on ``/proc/self/fd/N``, which names that exact inode). A name is a single
component (no ``/``), ``..`` is refused, symlinks are never followed by the server, and
a directory swapped for a symlink after it was looked up changes nothing, because the
server holds the directory itself, not its path. Blocking calls run in threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from .interface import (
    Attr,
    Context,
    Filesystem,
    FSError,
    InvalidArgument,
    Key,
    ReadOnly,
    SetAttr,
    StatFS,
    check_name,
)

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD = -100
_SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _sync_range(fd: int, offset: int, size: int) -> None:
    """Write a range to the device and wait, without a cache flush or metadata: what an
    O_DIRECT write does before it returns."""
    if _libc.sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WAIT_ALL) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(olddirfd, old, newdirfd, new, ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_AT_EMPTY_PATH = 0x1000


def _utimens(fd: int, atime_ns: int, mtime_ns: int, symlink: bool) -> None:
    """Set the times of exactly the node ``fd`` holds, a symlink included (AT_EMPTY_PATH)."""
    times = (_Timespec * 2)(
        _Timespec(*divmod(atime_ns, 10**9)), _Timespec(*divmod(mtime_ns, 10**9))
    )
    if _libc.utimensat(fd, b"", times, _AT_EMPTY_PATH) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.EINVAL or symlink:  # kernels before 5.8 lack AT_EMPTY_PATH here
        raise OSError(code, os.strerror(code))
    os.utime(_proc(fd), ns=(atime_ns, mtime_ns))


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _attr(key: Key, st: os.stat_result) -> Attr:
    return Attr(
        key=key, mode=st.st_mode, size=st.st_size, nlink=st.st_nlink, uid=st.st_uid,
        gid=st.st_gid, rdev=st.st_rdev, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns, blocks=st.st_blocks,
    )  # fmt: skip


class _Node:
    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0


class _File:
    """An open host file; ``direct`` when it was opened O_DIRECT without O_SYNC/O_DSYNC."""

    __slots__ = ("direct", "fd")

    def __init__(self, fd: int, flags: int) -> None:
        self.fd = fd
        self.direct = bool(flags & os.O_DIRECT) and not flags & os.O_DSYNC


def _open_host(opener: Callable[[int], int], flags: int) -> int:
    """``opener(flags)``, without O_NOATIME if the host refuses it (this server does not own
    the host file; the kernel already checked that the caller may use it)."""
    try:
        return opener(flags)
    except PermissionError as exc:
        if exc.errno != errno.EPERM or not flags & os.O_NOATIME:
            raise
        return opener(flags & ~os.O_NOATIME)


class _Dir:
    __slots__ = ("fd", "names")

    def __init__(self, fd: int, names: list[str]) -> None:
        self.fd = fd
        self.names = names


class PassthroughFS(Filesystem):
    """Serve ``root`` (a host directory); ``read_only=True`` refuses every change.

    Device nodes are refused (EPERM) unless ``allow_devices``: a sandbox must not plant a
    device node in a host directory that host processes may open. The host directory may
    change behind the mount, so the kernel gets no writeback cache (it would own file
    sizes and never see a size changed on the host) and keeps names and attributes only
    briefly.

    Open flags reach the host file as a local filesystem would honour them, with two
    exceptions. ``O_APPEND`` is dropped: the kernel sends every write with its offset, which
    an O_APPEND descriptor would ignore. ``O_DIRECT`` is dropped rather than honoured with
    aligned I/O: the host would demand buffers, offsets and sizes aligned to its block
    size, which neither pyfuse3's buffers nor the callers' requests (FUSE passes unaligned
    O_DIRECT I/O through) are, and some host filesystems refuse O_DIRECT outright. Data
    goes through the host's page cache instead, and each write to an O_DIRECT file is
    written to the device before it returns (``sync_file_range``), as O_DIRECT's
    synchronous transfer. ``O_SYNC`` and ``O_DSYNC`` stay on the host descriptor, so every
    write is durable as the flag promises before the kernel is answered, whether or not
    the kernel follows it with an fsync request. ``O_NOATIME`` is dropped only when the
    host refuses it to this server (not the file's owner; the kernel checked the caller).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, read_only: bool = False, allow_devices: bool = False
    ) -> None:
        self.path = Path(root).absolute()
        fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self._root: Key = (st.st_dev, st.st_ino)
        self._nodes: dict[Key, _Node] = {self._root: _Node(fd)}
        self._nodes[self._root].refs = 1 << 62
        self._table = threading.Lock()
        """Guards the table's entries and counts: lookups register nodes from worker
        threads while the kernel's forgets drop them on the trio thread."""
        self.read_only = read_only
        self.allow_devices = allow_devices
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    @property
    def root(self) -> Key:
        return self._root

    def _fd(self, key: Key) -> int:
        node = self._nodes.get(key)
        if node is None:
            raise FSError("stale node", errno.ESTALE)
        return node.fd

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly()

    def _reference(self, fd: int) -> Attr:
        """Register ``fd`` (an O_PATH descriptor) and return its attributes with a reference."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._table:
            node = self._nodes.get(key)
            if node is None:
                node = self._nodes[key] = _Node(fd)
                fd = -1
            node.refs += 1
        if fd >= 0:
            os.close(fd)
        return _attr(key, st)

    def _lookup(self, parent_fd: int, name: bytes) -> Attr:
        check_name(name)
        return self._reference(os.open(name, _PATH_FLAGS, dir_fd=parent_fd))

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    # ------------------------------------------------------------ reading

    async def lookup(self, parent: Key, name: bytes) -> Attr:
        fd = self._fd(parent)
        return await self._thread(self._lookup, fd, name)

    async def forget(self, key: Key, count: int) -> None:
        with self._table:
            node = self._nodes.get(key)
            if node is None or key == self._root:
                return
            node.refs -= count
            if node.refs > 0:
                return
            del self._nodes[key]
        os.close(node.fd)

    async def getattr(self, key: Key) -> Attr:
        return _attr(key, os.fstat(self._fd(key)))

    async def readlink(self, key: Key) -> bytes:
        target = os.readlink(b"", dir_fd=self._fd(key))
        return target

    async def opendir(self, key: Key) -> _Dir:
        def run() -> _Dir:
            fd = os.open(_proc(self._fd(key)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return _Dir(fd, sorted(os.listdir(fd)))
            except BaseException:
                os.close(fd)
                raise

        return await self._thread(run)

    async def readdir(self, handle: _Dir, offset: int) -> AsyncIterator[tuple[bytes, Attr, int]]:
        for index in range(offset, len(handle.names)):
            name = os.fsencode(handle.names[index])
            try:
                attr = self._lookup(handle.fd, name)
            except FileNotFoundError:
                continue  # removed since opendir
            yield name, attr, index + 1

    async def releasedir(self, handle: _Dir) -> None:
        os.close(handle.fd)

    def _host_flags(self, flags: int) -> int:
        """The flags of the host open (see the class docstring for why)."""
        flags &= ~(os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT)
        if self.writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            # the kernel may read through a write-only handle to fill a partial page
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_CLOEXEC

    async def open(self, key: Key, flags: int) -> _File:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        path = _proc(self._fd(key))
        fd = await self._thread(_open_host, lambda f: os.open(path, f), self._host_flags(flags))
        return _File(fd, flags)

    async def read(self, handle: _File, offset: int, size: int) -> bytes:
        return await self._thread(os.pread, handle.fd, size, offset)

    async def release(self, handle: _File) -> None:
        os.close(handle.fd)

    async def statfs(self) -> StatFS:
        st = os.statvfs(_proc(self._fd(self._root)))
        return StatFS(st.f_frsize, st.f_blocks, st.f_bavail, st.f_files, st.f_favail, st.f_namemax)

    async def getxattr(self, key: Key, name: bytes) -> bytes:
        try:
            return os.getxattr(_proc(self._fd(key)), name)
        except OSError as exc:
            if exc.errno == errno.ENOTSUP:
                raise FSError("", errno.ENODATA) from None
            raise

    async def listxattr(self, key: Key) -> list[bytes]:
        try:
            return [os.fsencode(n) for n in os.listxattr(_proc(self._fd(key)))]
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.ELOOP):
                return []
            raise

    # ------------------------------------------------------------ changing

    async def write(self, handle: _File, offset: int, data: bytes) -> int:
        self._writable()

        def run() -> int:
            written = os.pwrite(handle.fd, data, offset)
            if handle.direct and written:
                _sync_range(handle.fd, offset, written)
            return written

        return await self._thread(run)

    async def fsync(self, handle: _File, datasync: bool) -> None:
        await self._thread(os.fdatasync if datasync else os.fsync, handle.fd)

    async def fsyncdir(self, handle: _Dir, datasync: bool) -> None:
        await self._thread(os.fsync, handle.fd)

    def _owned(self, parent_fd: int, name: bytes, ctx: Context, mode: int | None = None) -> None:
        """Give a new node to the caller (a setgid parent already chose the group) and the
        exact mode asked for: the kernel applied the caller's umask, this process's own
        umask must not apply again."""
        parent_mode = os.fstat(parent_fd).st_mode
        gid = -1 if parent_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=parent_fd, follow_symlinks=False)
        if mode is not None:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            wanted = stat.S_IMODE(mode) | (
                st.st_mode & stat.S_ISGID if stat.S_ISDIR(st.st_mode) else 0
            )
            if stat.S_IMODE(st.st_mode) != wanted:
                fd = os.open(name, _PATH_FLAGS, dir_fd=parent_fd)
                try:
                    os.chmod(_proc(fd), wanted)
                finally:
                    os.close(fd)

    async def setattr(self, key: Key, changes: SetAttr, ctx: Context) -> Attr:
        self._writable()
        fd = self._fd(key)

        def run() -> Attr:
            st = os.fstat(fd)
            path = _proc(fd)
            if changes.size is not None:
                os.truncate(path, changes.size)
            if changes.uid is not None or changes.gid is not None:
                uid = changes.uid if changes.uid is not None else -1
                gid = changes.gid if changes.gid is not None else -1
                os.chown(path, uid, gid)
            if changes.mode is not None and not stat.S_ISLNK(st.st_mode):
                os.chmod(path, stat.S_IMODE(changes.mode))
            if changes.atime_ns is not None or changes.mtime_ns is not None:
                now = os.fstat(fd)
                atime = changes.atime_ns if changes.atime_ns is not None else now.st_atime_ns
                mtime = changes.mtime_ns if changes.mtime_ns is not None else now.st_mtime_ns
                _utimens(fd, atime, mtime, stat.S_ISLNK(st.st_mode))
            return _attr(key, os.fstat(fd))

        return await self._thread(run)

    async def mknod(self, parent: Key, name: bytes, mode: int, rdev: int, ctx: Context) -> Attr:
        self._writable()
        pfd = self._fd(parent)
        if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and not self.allow_devices:
            raise FSError("device nodes are not allowed here", errno.EPERM)

        def run() -> Attr:
            os.mknod(check_name(name), mode, rdev, dir_fd=pfd)
            self._owned(pfd, name, ctx, mode)
            return self._lookup(pfd, name)

        return await self._thread(run)

    async def mkdir(self, parent: Key, name: bytes, mode: int, ctx: Context) -> Attr:
        self._writable()
        pfd = self._fd(parent)

        def run() -> Attr:
            os.mkdir(check_name(name), mode, dir_fd=pfd)
            self._owned(pfd, name, ctx, mode)
            return self._lookup(pfd, name)

        return await self._thread(run)

    async def symlink(self, parent: Key, name: bytes, target: bytes, ctx: Context) -> Attr:
        self._writable()
        pfd = self._fd(parent)

        def run() -> Attr:
            os.symlink(target, check_name(name), dir_fd=pfd)
            self._owned(pfd, name, ctx)
            return self._lookup(pfd, name)

        return await self._thread(run)

    async def link(self, key: Key, parent: Key, name: bytes) -> Attr:
        self._writable()
        fd, pfd = self._fd(key), self._fd(parent)

        def run() -> Attr:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise FSError("hard link to a directory", errno.EPERM)
            os.link(_proc(fd), check_name(name), dst_dir_fd=pfd, follow_symlinks=True)
            return self._lookup(pfd, name)

        return await self._thread(run)

    async def unlink(self, parent: Key, name: bytes) -> None:
        self._writable()
        await self._thread(lambda: os.unlink(check_name(name), dir_fd=self._fd(parent)))

    async def rmdir(self, parent: Key, name: bytes) -> None:
        self._writable()
        await self._thread(lambda: os.rmdir(check_name(name), dir_fd=self._fd(parent)))

    async def rename(
        self, old_parent: Key, old_name: bytes, new_parent: Key, new_name: bytes, flags: int
    ) -> None:
        self._writable()
        if flags & ~3:
            raise InvalidArgument("invalid rename flags")
        ofd, nfd = self._fd(old_parent), self._fd(new_parent)
        await self._thread(_renameat2, ofd, check_name(old_name), nfd, check_name(new_name), flags)

    async def create(
        self, parent: Key, name: bytes, mode: int, flags: int, ctx: Context
    ) -> tuple[Attr, _File]:
        """Create ``name``; only a file this call created is given to the caller. Without
        O_EXCL, a file made on the host since the kernel looked is opened as it is."""
        self._writable()
        pfd = self._fd(parent)
        host = self._host_flags(flags) | os.O_NOFOLLOW

        def run() -> tuple[Attr, _File]:
            check_name(name)
            try:
                create = os.O_CREAT | os.O_EXCL
                fd = _open_host(lambda f: os.open(name, f | create, mode, dir_fd=pfd), host)
                created = True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd = _open_host(lambda f: os.open(name, f, dir_fd=pfd), host)
                created = False
            try:
                if created:
                    self._owned(pfd, name, ctx, mode)
                return self._lookup(pfd, name), _File(fd, flags)
            except BaseException:
                os.close(fd)
                raise

        return await self._thread(run)

    async def setxattr(self, key: Key, name: bytes, value: bytes) -> None:
        self._writable()
        os.setxattr(_proc(self._fd(key)), name, value)

    async def removexattr(self, key: Key, name: bytes) -> None:
        self._writable()
        os.removexattr(_proc(self._fd(key)), name)
