"""Path-level access to a filesystem for host code, safe while it is mounted.

Host code (a test, an agent's supervisor) reads and edits a workspace by path:
``await fs.paths.write_file("src/main.py", b"...")``. Each change is announced with
:meth:`~vfs.Filesystem.notify`, so a mount serving the filesystem has dropped the kernel's
caches of it before the call returns: the next read through the mount, even through a
file that was already open, sees the whole new content and size.

The async form runs on the trio loop that serves the mount (a filesystem's methods are
not thread-safe); plain threads use :class:`BlockingPaths` (``fs.paths_blocking``), which
runs each call on that loop. Paths are relative to the filesystem's root (a leading ``/``
changes nothing); symlinks are not followed (their targets are guest paths); host code
acts with root's rights, and what it creates belongs to the root directory's owner.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from .changes import Change, EntryChanged, NodeChanged
from .interface import (
    Attr,
    Context,
    Exists,
    Filesystem,
    FSError,
    InvalidArgument,
    IsADirectory,
    Key,
    NotADirectory,
    NotFound,
    NotPermitted,
    SetAttr,
    check_name,
)

PathLike = str | bytes | os.PathLike[str]
_READ_SIZE = 1 << 20


def _missing(exc: Exception) -> bool:
    """A lookup's "no such entry", as an FSError or as the OSError a host call raised."""
    return isinstance(exc, NotFound) or (isinstance(exc, OSError) and exc.errno == errno.ENOENT)


def _parts(path: PathLike) -> list[bytes]:
    parts = [p for p in os.fsencode(path).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise InvalidArgument(f"path {path!r} climbs out with '..'")
    return [check_name(p) for p in parts]


class Paths:
    """``read_file``, ``write_file``, ``listdir``, ``mkdir``, ``remove``, ``rename``,
    ``stat`` and ``exists`` on ``fs`` by path, each announced to its mounts. Errors are
    the filesystem's own: :class:`~vfs.FSError` from MemoryFS, OSError from a host
    directory (PassthroughFS)."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    # ------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[tuple[list[Key], list[Change]]]:
        """Run one call: the lookups it makes are forgotten (each carries a reference) and
        the changes it made are announced, on every way out."""
        loop = self.fs.serving_loop
        if loop is not None and loop is not trio.lowlevel.current_trio_token():
            raise RuntimeError(
                "this filesystem is served by another trio loop: call it from that loop, "
                "or from a plain thread through paths_blocking"
            )
        held: list[Key] = []
        changes: list[Change] = []
        try:
            yield held, changes
        finally:
            for key in held:
                await self.fs.forget(key, 1)
            if changes:
                await self.fs.notify(changes)

    async def _resolve(self, parts: list[bytes], held: list[Key]) -> Attr:
        attr = await self.fs.getattr(self.fs.root)
        for name in parts:
            if not attr.is_dir:
                raise NotADirectory(f"{os.fsdecode(name)!r} is under a non-directory")
            attr = await self.fs.lookup(attr.key, name)
            held.append(attr.key)
        return attr

    async def _child(self, parent: Attr, name: bytes, held: list[Key]) -> Attr | None:
        try:
            attr = await self.fs.lookup(parent.key, name)
        except (FSError, OSError) as exc:
            if _missing(exc):
                return None
            raise
        held.append(attr.key)
        return attr

    async def _owner(self) -> Context:
        root = await self.fs.getattr(self.fs.root)
        return Context(uid=root.uid, gid=root.gid)

    # ------------------------------------------------------------ reading

    async def stat(self, path: PathLike) -> Attr:
        """The attributes of ``path`` itself (a symlink is not followed)."""
        async with self._call() as (held, _):
            return await self._resolve(_parts(path), held)

    async def exists(self, path: PathLike) -> bool:
        try:
            await self.stat(path)
        except (FSError, OSError) as exc:
            if _missing(exc) or isinstance(exc, (NotADirectory, NotADirectoryError)):
                return False
            raise
        return True

    async def read_file(self, path: PathLike) -> bytes:
        async with self._call() as (held, _):
            attr = await self._resolve(_parts(path), held)
            if attr.is_dir:
                raise IsADirectory(f"{path!r} is a directory")
            if not stat.S_ISREG(attr.mode):
                raise InvalidArgument(f"{path!r} is not a regular file")
            handle = await self.fs.open(attr.key, os.O_RDONLY)
            try:
                pieces = []
                offset = 0
                while piece := await self.fs.read(handle, offset, _READ_SIZE):
                    pieces.append(piece)
                    offset += len(piece)
                return b"".join(pieces)
            finally:
                await self.fs.release(handle)

    async def listdir(self, path: PathLike = "") -> list[str]:
        """The names in a directory, sorted."""
        async with self._call() as (held, _):
            attr = await self._resolve(_parts(path), held)
            if not attr.is_dir:
                raise NotADirectory(f"{path!r} is not a directory")
            handle = await self.fs.opendir(attr.key)
            names = []
            try:
                async for name, entry, _cookie in self.fs.readdir(handle, 0):
                    held.append(entry.key)
                    names.append(os.fsdecode(name))
            finally:
                await self.fs.releasedir(handle)
            return sorted(names)

    # ------------------------------------------------------------ changing

    async def write_file(self, path: PathLike, data: bytes | str, *, mode: int = 0o644) -> None:
        """Create the file, or replace its content in place: the same node, so a handle
        open on it reads the new content, as after a rewrite on a local filesystem. The
        parent must exist. When there is no room for it, :class:`~vfs.NoSpace` is raised
        and a MemoryFS file keeps its old content (the new bytes go in one write, which
        MemoryFS takes whole or not at all, and only then is the old tail cut)."""
        content = data.encode() if isinstance(data, str) else bytes(data)
        parts = _parts(path)
        if not parts:
            raise IsADirectory("the root is a directory")
        async with self._call() as (held, changes):
            parent = await self._resolve(parts[:-1], held)
            if not parent.is_dir:
                raise NotADirectory(f"the parent of {path!r} is not a directory")
            owner = await self._owner()
            attr = await self._child(parent, parts[-1], held)
            if attr is None:
                mode = stat.S_IFREG | stat.S_IMODE(mode)
                attr, handle = await self.fs.create(parent.key, parts[-1], mode, os.O_WRONLY, owner)
                held.append(attr.key)
                changes += [EntryChanged(parent.key, parts[-1]), NodeChanged(parent.key)]
            elif attr.is_dir:
                raise IsADirectory(f"{path!r} is a directory")
            elif not stat.S_ISREG(attr.mode):
                raise InvalidArgument(f"{path!r} is not a regular file")
            else:
                handle = await self.fs.open(attr.key, os.O_WRONLY)
            try:
                if content:
                    await self.fs.write(handle, 0, content)
                    changes.append(NodeChanged(attr.key))
                if attr.size > len(content):
                    await self.fs.setattr(attr.key, SetAttr(size=len(content)), owner)
                    changes.append(NodeChanged(attr.key))
            finally:
                await self.fs.release(handle)

    async def mkdir(
        self, path: PathLike, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False
    ) -> None:
        """Make a directory (and missing parents with ``parents=True``), as pathlib does."""
        parts = _parts(path)
        async with self._call() as (held, changes):
            owner = await self._owner()
            attr = await self.fs.getattr(self.fs.root)
            if not parts and not exist_ok:
                raise Exists("the root exists")
            for index, name in enumerate(parts):
                last = index == len(parts) - 1
                child = await self._child(attr, name, held)
                if child is None:
                    if not (last or parents):
                        raise NotFound(f"{os.fsdecode(name)!r} in {path!r} does not exist")
                    mode_here = stat.S_IFDIR | stat.S_IMODE(mode)
                    child = await self.fs.mkdir(attr.key, name, mode_here, owner)
                    held.append(child.key)
                    changes += [EntryChanged(attr.key, name), NodeChanged(attr.key)]
                elif last and not (exist_ok and child.is_dir):
                    raise Exists(f"{path!r} exists")
                elif not child.is_dir:
                    raise NotADirectory(f"{os.fsdecode(name)!r} in {path!r} is not a directory")
                attr = child

    async def remove(self, path: PathLike) -> None:
        """Remove a file, symlink or special file, or an empty directory."""
        parts = _parts(path)
        if not parts:
            raise NotPermitted("the root cannot be removed")
        async with self._call() as (held, changes):
            parent = await self._resolve(parts[:-1], held)
            attr = await self.fs.lookup(parent.key, parts[-1])
            held.append(attr.key)
            if attr.is_dir:
                await self.fs.rmdir(parent.key, parts[-1])
            else:
                await self.fs.unlink(parent.key, parts[-1])
            changes += [EntryChanged(parent.key, parts[-1]), NodeChanged(parent.key)]
            changes.append(NodeChanged(attr.key))

    async def rename(self, source: PathLike, target: PathLike) -> None:
        """Move ``source`` to ``target``, replacing a file or an empty directory there
        (as os.replace does)."""
        src, dst = _parts(source), _parts(target)
        if not src or not dst:
            raise NotPermitted("the root cannot be renamed or replaced")
        async with self._call() as (held, changes):
            src_parent = await self._resolve(src[:-1], held)
            dst_parent = await self._resolve(dst[:-1], held)
            moved = await self.fs.lookup(src_parent.key, src[-1])
            held.append(moved.key)
            replaced = await self._child(dst_parent, dst[-1], held)
            await self.fs.rename(src_parent.key, src[-1], dst_parent.key, dst[-1], 0)
            changes += [
                EntryChanged(src_parent.key, src[-1]),
                EntryChanged(dst_parent.key, dst[-1]),
            ]
            changes += [NodeChanged(src_parent.key), NodeChanged(dst_parent.key)]
            changes.append(NodeChanged(moved.key))
            if replaced is not None:
                changes.append(NodeChanged(replaced.key))


class BlockingPaths:
    """:class:`Paths` for plain threads: each call runs on the trio loop that serves the
    filesystem, or in a trio run of its own while it is not mounted."""

    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    def _run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(method, *args, **kwargs)
        loop = self._paths.fs.serving_loop
        if loop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                return trio.from_thread.run(call, trio_token=loop)
        return trio.run(call)

    def stat(self, path: PathLike) -> Attr:
        return self._run(self._paths.stat, path)

    def exists(self, path: PathLike) -> bool:
        return self._run(self._paths.exists, path)

    def read_file(self, path: PathLike) -> bytes:
        return self._run(self._paths.read_file, path)

    def listdir(self, path: PathLike = "") -> list[str]:
        return self._run(self._paths.listdir, path)

    def write_file(self, path: PathLike, data: bytes | str, *, mode: int = 0o644) -> None:
        self._run(self._paths.write_file, path, data, mode=mode)

    def mkdir(
        self, path: PathLike, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False
    ) -> None:
        self._run(self._paths.mkdir, path, mode, parents=parents, exist_ok=exist_ok)

    def remove(self, path: PathLike) -> None:
        self._run(self._paths.remove, path)

    def rename(self, source: PathLike, target: PathLike) -> None:
        self._run(self._paths.rename, source, target)
