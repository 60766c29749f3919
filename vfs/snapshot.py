"""Snapshot any :class:`Filesystem` tree to a tar stream or an object-store prefix, and back.

This is how a workspace outlives its host: the tar keeps modes, owners, nanosecond
times (pax), hard links, symlinks, fifos and extended attributes. In an object store the
tar is cut into lz4-compressed parts with a manifest of their sha256s, written last, so a
snapshot is either complete or absent; a restore verifies every part.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from typing import IO, Any

import lz4.frame
import trio

from .interface import ROOT_CONTEXT, Filesystem, FSError, InvalidArgument, Key, SetAttr

PART = 8 << 20


async def _walk(fs: Filesystem, key: Key, prefix: str) -> Any:
    handle = await fs.opendir(key)
    try:
        entries = []
        async for name, attr, _cookie in fs.readdir(handle, 0):
            entries.append((name, attr))
    finally:
        await fs.releasedir(handle)
    for name, attr in entries:
        path = f"{prefix}{os.fsdecode(name)}"
        try:
            yield path, attr
            if stat.S_ISDIR(attr.mode):
                async for item in _walk(fs, attr.key, path + "/"):
                    yield item
        finally:
            await fs.forget(attr.key, 1)


async def snapshot_tar(fs: Filesystem, out: IO[bytes]) -> int:
    """Write the whole tree as a pax tar to ``out``; returns the number of entries."""
    count = 0
    links: dict[Key, str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        async for path, attr in _walk(fs, fs.root, ""):
            info = tarfile.TarInfo(path)
            info.mode = stat.S_IMODE(attr.mode)
            info.uid, info.gid = attr.uid, attr.gid
            info.mtime = attr.mtime_ns / 1e9
            info.pax_headers = {
                "mtime": f"{attr.mtime_ns / 1e9:.9f}",
                "atime": f"{attr.atime_ns / 1e9:.9f}",
            }
            for xname in await fs.listxattr(attr.key):
                value = await fs.getxattr(attr.key, xname)
                info.pax_headers["LANEKIT.xattr." + xname.hex()] = value.hex()
            data: bytes | None = None
            if stat.S_ISDIR(attr.mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(attr.mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.fsdecode(await fs.readlink(attr.key))
            elif attr.nlink > 1 and attr.key in links:
                info.type = tarfile.LNKTYPE
                info.linkname = links[attr.key]
            elif stat.S_ISREG(attr.mode):
                handle = await fs.open(attr.key, os.O_RDONLY)
                try:
                    parts = []
                    offset = 0
                    while offset < attr.size:
                        piece = await fs.read(handle, offset, min(1 << 20, attr.size - offset))
                        if not piece:
                            break
                        parts.append(piece)
                        offset += len(piece)
                    data = b"".join(parts)
                finally:
                    await fs.release(handle)
                info.size = len(data)
                if attr.nlink > 1:
                    links[attr.key] = path
            elif stat.S_ISFIFO(attr.mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # device nodes and sockets are not workspace content
            await trio.to_thread.run_sync(
                tar.addfile, info, io.BytesIO(data) if data is not None else None
            )
            count += 1
    return count


def _parts(path: str) -> list[bytes]:
    if path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"unsafe member name {path!r}")
    parts = [os.fsencode(p) for p in path.split("/") if p not in ("", ".")]
    if any(p == b".." for p in parts) or not parts:
        raise InvalidArgument(f"unsafe member name {path!r}")
    return parts


async def restore_tar(fs: Filesystem, source: IO[bytes]) -> int:
    """Recreate a tar's tree in ``fs`` (which should be empty); returns the entry count."""
    count = 0
    directories: dict[tuple[bytes, ...], Key] = {(): fs.root}
    created: dict[str, Key] = {}
    deferred: list[tuple[Key, SetAttr]] = []
    try:
        tar = tarfile.open(fileobj=source, mode="r|*")  # noqa: SIM115  (closed by with)
    except tarfile.TarError as exc:
        raise InvalidArgument(f"not a tar stream: {exc}") from None
    with tar:
        while (member := await trio.to_thread.run_sync(tar.next)) is not None:
            parts = _parts(member.name)
            parent = directories.get(tuple(parts[:-1]))
            if parent is None:
                raise InvalidArgument(f"{member.name!r} comes before its directory")
            name = parts[-1]
            mode = member.mode & 0o7777
            if member.isdir():
                attr = await fs.mkdir(parent, name, mode, ROOT_CONTEXT)
                directories[tuple(parts)] = attr.key
            elif member.issym():
                attr = await fs.symlink(parent, name, os.fsencode(member.linkname), ROOT_CONTEXT)
            elif member.islnk():
                target = created.get("/".join(os.fsdecode(p) for p in _parts(member.linkname)))
                if target is None:
                    raise InvalidArgument(f"hard link {member.name!r} to an unknown file")
                attr = await fs.link(target, parent, name)
            elif member.isreg():
                attr, handle = await fs.create(parent, name, mode, os.O_WRONLY, ROOT_CONTEXT)
                try:
                    reader = tar.extractfile(member)
                    assert reader is not None
                    offset = 0
                    while chunk := await trio.to_thread.run_sync(reader.read, 1 << 20):
                        await fs.write(handle, offset, chunk)
                        offset += len(chunk)
                finally:
                    await fs.release(handle)
            elif member.isfifo():
                attr = await fs.mknod(parent, name, stat.S_IFIFO | mode, 0, ROOT_CONTEXT)
            else:
                raise InvalidArgument(f"{member.name!r}: unsupported member type")
            created["/".join(os.fsdecode(p) for p in parts)] = attr.key
            for header, value in member.pax_headers.items():
                if header.startswith("LANEKIT.xattr."):
                    await fs.setxattr(attr.key, bytes.fromhex(header[14:]), bytes.fromhex(value))
            mtime = int(float(member.pax_headers.get("mtime", member.mtime)) * 1e9)
            atime = int(float(member.pax_headers.get("atime", member.mtime)) * 1e9)
            changes = SetAttr(
                mode=None if member.issym() else mode,
                uid=member.uid,
                gid=member.gid,
                atime_ns=atime,
                mtime_ns=mtime,
            )
            deferred.append((attr.key, changes))
            count += 1
    for key, changes in reversed(deferred):  # directories' times after their contents
        try:
            await fs.setattr(key, changes, ROOT_CONTEXT)
        except FSError:
            pass
    return count


async def snapshot_objects(fs: Filesystem, objects: Any, prefix: str) -> dict[str, Any]:
    """Store a snapshot under ``prefix/`` in a blockstore ObjectStore; returns its manifest."""
    with await trio.to_thread.run_sync(tempfile.TemporaryFile) as spool:
        entries = await snapshot_tar(fs, spool)
        await trio.to_thread.run_sync(spool.seek, 0)
        parts: list[dict[str, str]] = []
        while packed := await trio.to_thread.run_sync(_next_part, spool):
            body, sha256 = packed
            key = f"{prefix}/part-{len(parts):06d}"
            await trio.to_thread.run_sync(objects.put, key, body)
            parts.append({"key": key, "sha256": sha256})
    manifest = {"format": "lanekit-vfs-snapshot/1", "entries": entries, "parts": parts}
    await trio.to_thread.run_sync(
        objects.put, f"{prefix}/manifest.json", json.dumps(manifest).encode()
    )
    return manifest


def _next_part(spool: IO[bytes]) -> tuple[bytes, str] | None:
    """The next part of a spooled tar, compressed, and its sha256 (in a worker thread:
    8 MiB of hashing and compression would stall everything else on the trio loop)."""
    data = spool.read(PART)
    if not data:
        return None
    return lz4.frame.compress(data), hashlib.sha256(data).hexdigest()


def _spool_part(spool: IO[bytes], body: bytes, part: dict[str, str]) -> None:
    data = lz4.frame.decompress(body)
    if hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise FSError(f"snapshot part {part['key']} is corrupt")
    spool.write(data)


async def restore_objects(fs: Filesystem, objects: Any, prefix: str) -> int:
    manifest = json.loads(
        (await trio.to_thread.run_sync(objects.get, f"{prefix}/manifest.json")).data
    )
    with await trio.to_thread.run_sync(tempfile.TemporaryFile) as spool:
        for part in manifest["parts"]:
            body = (await trio.to_thread.run_sync(objects.get, part["key"])).data
            await trio.to_thread.run_sync(_spool_part, spool, body, part)
        await trio.to_thread.run_sync(spool.seek, 0)
        return await restore_tar(fs, spool)
