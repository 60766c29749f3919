"""The guest's files, from the host: :class:`GuestFS` (``machine.fs``).

Every transfer streams: a 300 MiB file goes through in window-sized pieces, and neither
side ever holds the whole of it. Errors are the OSError subclass the guest met
(``FileNotFoundError``, ``IsADirectoryError``, ...) with the guest path as ``filename``.

Copies out of the guest trust nothing the guest says: host files are created beneath the
destination with ``O_NOFOLLOW | O_EXCL``, directories are walked through descriptors, and
a guest symlink becomes a host symlink that nothing is ever written through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .client import AgentSession

HOST_CHUNK = 4 << 20


@dataclasses.dataclass(frozen=True)
class FileInfo:
    path: str
    kind: str
    """ "file", "directory", "symlink" or "other"."""
    size: int
    mode: int
    uid: int
    gid: int
    modified: float

    @classmethod
    def of(cls, raw: Any) -> FileInfo:
        return cls(
            str(raw["path"]), str(raw["kind"]), int(raw["size"]), int(raw["mode"]),
            int(raw["uid"]), int(raw["gid"]), float(raw["modified"]),
        )  # fmt: skip


class GuestFS:
    """Files in the guest. ``session`` returns the live agent session (reconnecting if
    the last one broke)."""

    def __init__(self, session: Callable[[], Awaitable[AgentSession]]) -> None:
        self._session = session

    async def _call(self, op: str, **args: Any) -> Any:
        return await (await self._session()).call(op, **args)

    # ------------------------------------------------------------ whole files

    async def read(self, path: str) -> bytes:
        parts = [chunk async for chunk in self.read_stream(path)]
        return b"".join(parts)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        """The file's content in pieces, as it arrives."""
        session = await self._session()
        async with contextlib.aclosing(session.read_file(path)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def write(
        self,
        path: str,
        data: bytes | str,
        *,
        mode: int | None = None,
        append: bool = False,
        parents: bool = False,
    ) -> int:
        """Create or replace (or append to) a guest file; returns once it is fsynced."""
        raw = data.encode() if isinstance(data, str) else data
        chunks = [raw[i : i + (1 << 20)] for i in range(0, len(raw), 1 << 20)] or [b""]
        session = await self._session()
        return await session.write_file(path, chunks, mode=mode, append=append, parents=parents)

    async def write_stream(self, path: str, chunks: AsyncIterator[bytes], **options: Any) -> int:
        session = await self._session()
        return await session.write_file(path, chunks, **options)

    # ------------------------------------------------------------ metadata

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileInfo:
        return FileInfo.of(await self._call("stat", path=path, lstat=not follow_symlinks))

    async def exists(self, path: str) -> bool:
        return bool(await self._call("exists", path=path))

    async def list(self, path: str) -> list[FileInfo]:
        return [FileInfo.of(e) for e in await self._call("listdir", path=path)]

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None:
        await self._call("mkdir", path=path, parents=parents, mode=mode, exist_ok=parents)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._call("remove", path=path, recursive=recursive)

    async def rename(self, source: str, target: str, *, replace: bool = True) -> None:
        await self._call("rename", source=source, target=target, replace=replace)

    async def copy(
        self, source: str, target: str, *, recursive: bool = False, replace: bool = False
    ) -> None:
        """Copy within the guest (no bytes cross to the host)."""
        await self._call("copy", source=source, target=target, recursive=recursive, replace=replace)

    async def chmod(self, path: str, mode: int) -> None:
        await self._call("chmod", path=path, mode=mode)

    async def chown(self, path: str, uid: int | None = None, gid: int | None = None) -> None:
        await self._call("chown", path=path, uid=uid, gid=gid)

    async def symlink(self, target: str, path: str) -> None:
        await self._call("symlink", path=path, target=target)

    async def readlink(self, path: str) -> str:
        return str(await self._call("readlink", path=path))

    # ------------------------------------------------------------ host <-> guest

    async def copy_in(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        """Copy a host file or directory tree into the guest (modes kept, symlinks as
        symlinks); the guest path must not exist yet for a directory."""
        source = Path(host_path)
        info = await trio.to_thread.run_sync(os.lstat, source)
        if stat.S_ISDIR(info.st_mode):
            await self.mkdir(guest_path, mode=stat.S_IMODE(info.st_mode) | 0o700)
            names = await trio.to_thread.run_sync(lambda: sorted(os.listdir(source)))
            for name in names:
                await self.copy_in(source / name, f"{guest_path.rstrip('/')}/{name}")
            await self.chmod(guest_path, stat.S_IMODE(info.st_mode))
        elif stat.S_ISLNK(info.st_mode):
            await self.symlink(await trio.to_thread.run_sync(os.readlink, source), guest_path)
        elif stat.S_ISREG(info.st_mode):
            session = await self._session()
            await session.write_file(
                guest_path, read_host_file(source), mode=stat.S_IMODE(info.st_mode)
            )
        else:
            raise OSError(f"{source} is neither a file, a directory nor a symlink")

    async def copy_out(self, guest_path: str, host_path: str | os.PathLike[str]) -> None:
        """Copy a guest file or directory tree to ``host_path``, which must not exist."""
        target = await trio.to_thread.run_sync(lambda: Path(host_path).absolute())
        parent_fd = await trio.to_thread.run_sync(
            lambda: os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        )
        try:
            await self._copy_out(guest_path, parent_fd, target.name)
        finally:
            os.close(parent_fd)

    async def _copy_out(self, guest_path: str, parent_fd: int, name: str) -> None:
        info = await self.stat(guest_path, follow_symlinks=False)
        if info.kind == "directory":
            await trio.to_thread.run_sync(lambda: os.mkdir(name, 0o700, dir_fd=parent_fd))
            fd = await trio.to_thread.run_sync(
                lambda: os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd
                )
            )
            try:
                for entry in await self.list(guest_path):
                    child = entry.path.rsplit("/", 1)[-1]
                    if child in ("", ".", "..") or "/" in child:
                        continue
                    await self._copy_out(entry.path, fd, child)
                os.fchmod(fd, info.mode)
            finally:
                os.close(fd)
        elif info.kind == "symlink":
            link = await self.readlink(guest_path)
            await trio.to_thread.run_sync(lambda: os.symlink(link, name, dir_fd=parent_fd))
        elif info.kind == "file":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = await trio.to_thread.run_sync(
                lambda: os.open(name, flags, info.mode & 0o777, dir_fd=parent_fd)
            )
            try:
                pending: list[bytes] = []
                size = 0
                async for chunk in self.read_stream(guest_path):
                    pending.append(chunk)
                    size += len(chunk)
                    if size >= HOST_CHUNK:
                        await trio.to_thread.run_sync(_write_all, fd, b"".join(pending))
                        pending, size = [], 0
                await trio.to_thread.run_sync(_write_all, fd, b"".join(pending))
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def read_host_file(path: Path) -> AsyncIterator[bytes]:
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    try:
        while True:
            chunk = await trio.to_thread.run_sync(os.read, fd, HOST_CHUNK)
            if not chunk:
                return
            for i in range(0, len(chunk), 1 << 20):
                yield chunk[i : i + (1 << 20)]
    finally:
        os.close(fd)
