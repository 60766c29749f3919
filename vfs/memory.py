"""An in-memory filesystem with POSIX semantics and limits on bytes and inodes.

File data lives in 1 MiB chunks that hold only what was written, so sparse files cost
what they store, and small files cost their size. Directory entries carry a cookie that
grows with each insertion: a readdir resumed at a cookie never skips or repeats entries
that stayed, whatever was added or removed meanwhile. A node lives until it has no links,
no open handles and no kernel references.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from .interface import (
    Attr,
    Context,
    Exists,
    Filesystem,
    FSError,
    InvalidArgument,
    IsADirectory,
    Key,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    SetAttr,
    StatFS,
    check_name,
)
from .paths import BlockingPaths, Paths

CHUNK = 1 << 20
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_SIZE_MAX = 64 << 10


class _Node:
    __slots__ = (
        "atime",
        "children",
        "chunks",
        "ctime",
        "gid",
        "key",
        "lookups",
        "mode",
        "mtime",
        "next_cookie",
        "nlink",
        "opens",
        "rdev",
        "size",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, key: int, mode: int, uid: int, gid: int, now: int) -> None:
        self.key = key
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev = 0
        self.nlink = 0
        self.atime = self.mtime = self.ctime = now
        self.size = 0
        self.chunks: dict[int, bytearray] = {}
        self.children: dict[bytes, tuple[int, int]] = {}
        self.next_cookie = 1
        self.target = b""
        self.xattrs: dict[bytes, bytes] = {}
        self.opens = 0
        self.lookups = 0


class MemoryFS(Filesystem):
    """``MemoryFS(files={"a/b.txt": "hi"}, copy_from="dir", max_bytes=..., max_inodes=...)``.

    Mounted, the kernel caches its data, names and attributes (``kernel_cache``). Host
    code changes it by path through :attr:`paths` (async, on the loop serving the mount) or
    :attr:`paths_blocking` (plain threads): each change drops those caches before the call
    returns, so the mount shows it at once. The kernel gets no writeback cache: it would
    own file sizes, so a size changed by host code would never show, and a write past
    ``max_bytes`` would fail only at close. The cost, measured with dd here: 4 KiB writes
    go to the server one by one (18-23 MB/s instead of 26-36), and a file just written is
    read back from the server, not the page cache (0.8-1.5 GB/s instead of 4.5: the
    kernel drops its pages when it sees the new mtime); 1 MiB writes and ``tar x`` cost
    the same.
    """

    kernel_cache = True

    def __init__(
        self,
        files: Mapping[str, str | bytes] | None = None,
        *,
        copy_from: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        max_inodes: int | None = None,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_inodes = max_inodes
        self.used_bytes = 0
        self._nodes: dict[int, _Node] = {}
        self._next_key = 1
        root = self._new(stat.S_IFDIR | 0o755, uid, gid)
        root.nlink = 2
        self._root = root.key
        if copy_from is not None:
            self._copy_tree(Path(copy_from), root)
        for path, content in (files or {}).items():
            self._seed_file(path, content.encode() if isinstance(content, str) else content)

    # ------------------------------------------------------------ internals

    @property
    def root(self) -> Key:
        return self._root

    @functools.cached_property
    def paths(self) -> Paths:
        """The path-level host API: ``await fs.paths.write_file("a.txt", b"...")``."""
        return Paths(self)

    @functools.cached_property
    def paths_blocking(self) -> BlockingPaths:
        """:attr:`paths` for plain threads: ``fs.paths_blocking.read_file("a.txt")``."""
        return BlockingPaths(self.paths)

    def _new(self, mode: int, uid: int, gid: int) -> _Node:
        if self.max_inodes is not None and len(self._nodes) >= self.max_inodes:
            raise NoSpace("inode limit reached")
        node = _Node(self._next_key, mode, uid, gid, time.time_ns())
        self._next_key += 1
        self._nodes[node.key] = node
        return node

    def _node(self, key: Key) -> _Node:
        try:
            return self._nodes[key]  # type: ignore[index]
        except KeyError:
            raise NotFound(f"no node {key!r}") from None

    def _dir(self, key: Key) -> _Node:
        node = self._node(key)
        if not stat.S_ISDIR(node.mode):
            raise NotADirectory()
        return node

    def _attr(self, n: _Node) -> Attr:
        if stat.S_ISREG(n.mode):
            blocks = sum((len(c) + 511) // 512 for c in n.chunks.values())
        else:
            blocks = (n.size + 511) // 512
        return Attr(
            key=n.key, mode=n.mode, size=n.size, nlink=n.nlink, uid=n.uid, gid=n.gid,
            rdev=n.rdev, atime_ns=n.atime, mtime_ns=n.mtime, ctime_ns=n.ctime, blocks=blocks,
        )  # fmt: skip

    def _charge(self, delta: int) -> None:
        if delta > 0 and self.max_bytes is not None and self.used_bytes + delta > self.max_bytes:
            raise NoSpace(f"byte limit of {self.max_bytes} reached")
        self.used_bytes += delta

    def _link_into(self, parent: _Node, name: bytes, node: _Node, now: int) -> None:
        parent.children[name] = (node.key, parent.next_cookie)
        parent.next_cookie += 1
        node.nlink += 1
        if stat.S_ISDIR(node.mode):
            parent.nlink += 1
        parent.mtime = parent.ctime = now

    def _unlink_from(self, parent: _Node, name: bytes, now: int) -> _Node:
        key, _ = parent.children.pop(name)
        node = self._nodes[key]
        node.nlink -= 1
        if stat.S_ISDIR(node.mode):
            parent.nlink -= 1
            node.nlink = 0
        node.ctime = parent.mtime = parent.ctime = now
        self._maybe_free(node)
        return node

    def _maybe_free(self, node: _Node) -> None:
        unused = node.nlink <= 0 and node.opens == 0 and node.lookups == 0
        if unused and node.key != self._root and self._nodes.pop(node.key, None) is not None:
            self.used_bytes -= sum(len(c) for c in node.chunks.values()) + len(node.target)
            self.used_bytes -= sum(len(k) + len(v) for k, v in node.xattrs.items())

    def _child_mode_gid(self, parent: _Node, mode: int, ctx: Context) -> tuple[int, int]:
        if parent.mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return mode, parent.gid
        return mode, ctx.gid

    def _create_node(
        self, parent_key: Key, name: bytes, mode: int, ctx: Context
    ) -> tuple[_Node, _Node]:
        parent = self._dir(parent_key)
        check_name(name)
        if name in parent.children:
            raise Exists()
        mode, gid = self._child_mode_gid(parent, mode, ctx)
        node = self._new(mode, ctx.uid, gid)
        if stat.S_ISDIR(mode):
            node.nlink = 1
        self._link_into(parent, name, node, node.ctime)
        return parent, node

    # ------------------------------------------------------------ data

    def _read(self, node: _Node, offset: int, size: int) -> bytes:
        """Views of the chunks (zeros for holes and short chunks), joined: one copy."""
        end = min(offset + size, node.size)
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            index, within = divmod(pos, CHUNK)
            take = min(CHUNK - within, end - pos)
            chunk = node.chunks.get(index)
            piece = memoryview(chunk)[within : within + take] if chunk is not None else b""
            parts.append(piece)
            if len(piece) < take:
                parts.append(bytes(take - len(piece)))
            pos += take
        return b"".join(parts)

    def _write(self, node: _Node, offset: int, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        grow = 0
        plan = []
        while pos < len(data):
            index, within = divmod(offset + pos, CHUNK)
            take = min(CHUNK - within, len(data) - pos)
            chunk = node.chunks.get(index)
            have = len(chunk) if chunk is not None else 0
            grow += max(0, within + take - have)
            plan.append((index, within, take, pos))
            pos += take
        self._charge(grow)
        for index, within, take, start in plan:
            piece = view[start : start + take]
            chunk = node.chunks.get(index)
            if chunk is None:
                node.chunks[index] = bytearray(within) + piece if within else bytearray(piece)
            elif len(chunk) <= within:
                chunk.extend(bytes(within - len(chunk)))
                chunk += piece
            else:
                chunk[within : within + take] = piece
        node.size = max(node.size, offset + len(data))

    def _truncate(self, node: _Node, size: int) -> None:
        if size < node.size:
            last = size // CHUNK
            freed = 0
            for index in [i for i in node.chunks if i > last or (i == last and size % CHUNK == 0)]:
                freed += len(node.chunks.pop(index))
            chunk = node.chunks.get(last)
            if chunk is not None and len(chunk) > size % CHUNK:
                freed += len(chunk) - size % CHUNK
                del chunk[size % CHUNK :]
            self.used_bytes -= freed
        node.size = size

    # ------------------------------------------------------------ seeding

    def _mkdirs(self, parts: list[bytes]) -> _Node:
        node = self._nodes[self._root]
        for part in parts:
            check_name(part)
            entry = node.children.get(part)
            if entry is None:
                child = self._new(stat.S_IFDIR | 0o755, node.uid, node.gid)
                child.nlink = 1
                self._link_into(node, part, child, child.ctime)
                node = child
            else:
                node = self._nodes[entry[0]]
                if not stat.S_ISDIR(node.mode):
                    raise NotADirectory(f"{part!r} is a file")
        return node

    def _seed_file(self, path: str, data: bytes) -> None:
        parts = [p.encode() for p in path.strip("/").split("/") if p]
        if not parts or any(p in (b".", b"..") for p in parts):
            raise InvalidArgument(f"invalid seed path {path!r}")
        parent = self._mkdirs(parts[:-1])
        if parts[-1] in parent.children:
            raise Exists(f"seed path {path!r} given twice")
        node = self._new(stat.S_IFREG | 0o644, parent.uid, parent.gid)
        self._link_into(parent, check_name(parts[-1]), node, node.ctime)
        self._write(node, 0, data)

    def _copy_tree(
        self, source: Path, target: _Node, seen: dict[tuple[int, int], _Node] | None = None
    ) -> None:
        """Copy a host tree (files, dirs, symlinks; hard links kept) into ``target``."""
        seen = {} if seen is None else seen
        for entry in os.scandir(source):
            st = entry.stat(follow_symlinks=False)
            name = os.fsencode(entry.name)
            if (st.st_dev, st.st_ino) in seen and not stat.S_ISDIR(st.st_mode):
                existing = seen[(st.st_dev, st.st_ino)]
                self._link_into(target, name, existing, existing.ctime)
                continue
            node = self._new(st.st_mode, st.st_uid, st.st_gid)
            if stat.S_ISDIR(st.st_mode):
                node.nlink = 1
            self._link_into(target, name, node, node.ctime)
            if stat.S_ISDIR(st.st_mode):
                self._copy_tree(Path(entry.path), node, seen)
            elif stat.S_ISLNK(st.st_mode):
                node.target = os.fsencode(os.readlink(entry.path))
                node.size = len(node.target)
                self._charge(node.size)
            elif stat.S_ISREG(st.st_mode):
                with open(entry.path, "rb") as f:
                    offset = 0
                    while data := f.read(CHUNK):
                        self._write(node, offset, data)
                        offset += len(data)
            seen[(st.st_dev, st.st_ino)] = node
            node.atime, node.mtime = st.st_atime_ns, st.st_mtime_ns

    # ------------------------------------------------------------ interface

    async def lookup(self, parent: Key, name: bytes) -> Attr:
        directory = self._dir(parent)
        entry = directory.children.get(name)
        if entry is None:
            raise NotFound()
        node = self._nodes[entry[0]]
        node.lookups += 1
        return self._attr(node)

    async def forget(self, key: Key, count: int) -> None:
        node = self._nodes.get(key)  # type: ignore[call-overload]
        if node is not None:
            node.lookups = max(node.lookups - count, 0)
            self._maybe_free(node)

    async def getattr(self, key: Key) -> Attr:
        return self._attr(self._node(key))

    async def setattr(self, key: Key, changes: SetAttr, ctx: Context) -> Attr:
        node = self._node(key)
        now = time.time_ns()
        if changes.size is not None:
            if stat.S_ISDIR(node.mode):
                raise IsADirectory()
            if not stat.S_ISREG(node.mode):
                raise InvalidArgument("truncate of a special file")
            self._truncate(node, changes.size)
            node.mtime = now
        if changes.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(changes.mode)
        if changes.uid is not None:
            node.uid = changes.uid
        if changes.gid is not None:
            node.gid = changes.gid
        if changes.atime_ns is not None:
            node.atime = changes.atime_ns
        if changes.mtime_ns is not None:
            node.mtime = changes.mtime_ns
        node.ctime = changes.ctime_ns if changes.ctime_ns is not None else now
        return self._attr(node)

    async def readlink(self, key: Key) -> bytes:
        node = self._node(key)
        if not stat.S_ISLNK(node.mode):
            raise InvalidArgument("not a symbolic link")
        return node.target

    async def readdir(self, key: Key, offset: int) -> AsyncIterator[tuple[bytes, Attr, int]]:
        directory = self._dir(key)
        for name, (child, cookie) in list(directory.children.items()):
            if cookie <= offset:
                continue
            node = self._nodes.get(child)
            if node is None or name not in directory.children:
                continue
            node.lookups += 1
            yield name, self._attr(node), cookie

    async def mknod(self, parent: Key, name: bytes, mode: int, rdev: int, ctx: Context) -> Attr:
        _, node = self._create_node(parent, name, mode, ctx)
        node.rdev = rdev
        node.lookups += 1
        return self._attr(node)

    async def mkdir(self, parent: Key, name: bytes, mode: int, ctx: Context) -> Attr:
        _, node = self._create_node(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        node.lookups += 1
        return self._attr(node)

    async def symlink(self, parent: Key, name: bytes, target: bytes, ctx: Context) -> Attr:
        if len(target) > 4095:
            raise FSError("symlink target too long", errno.ENAMETOOLONG)
        self._charge(len(target))
        _, node = self._create_node(parent, name, stat.S_IFLNK | 0o777, ctx)
        node.target = target
        node.size = len(target)
        node.lookups += 1
        return self._attr(node)

    async def link(self, key: Key, parent: Key, name: bytes) -> Attr:
        node = self._node(key)
        directory = self._dir(parent)
        check_name(name)
        if stat.S_ISDIR(node.mode):
            raise FSError("hard link to a directory", errno.EPERM)
        if name in directory.children:
            raise Exists()
        now = time.time_ns()
        self._link_into(directory, name, node, now)
        node.ctime = now
        node.lookups += 1
        return self._attr(node)

    async def unlink(self, parent: Key, name: bytes) -> None:
        directory = self._dir(parent)
        entry = directory.children.get(name)
        if entry is None:
            raise NotFound()
        if stat.S_ISDIR(self._nodes[entry[0]].mode):
            raise IsADirectory()
        self._unlink_from(directory, name, time.time_ns())

    async def rmdir(self, parent: Key, name: bytes) -> None:
        directory = self._dir(parent)
        entry = directory.children.get(name)
        if entry is None:
            raise NotFound()
        node = self._nodes[entry[0]]
        if not stat.S_ISDIR(node.mode):
            raise NotADirectory()
        if node.children:
            raise NotEmpty()
        self._unlink_from(directory, name, time.time_ns())

    async def rename(
        self, old_parent: Key, old_name: bytes, new_parent: Key, new_name: bytes, flags: int
    ) -> None:
        src_dir, dst_dir = self._dir(old_parent), self._dir(new_parent)
        check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise InvalidArgument("invalid rename flags")
        src_entry = src_dir.children.get(old_name)
        if src_entry is None:
            raise NotFound()
        node = self._nodes[src_entry[0]]
        dst_entry = dst_dir.children.get(new_name)
        now = time.time_ns()
        if flags & RENAME_EXCHANGE:
            if dst_entry is None:
                raise NotFound()
            other = self._nodes[dst_entry[0]]
            src_dir.children[old_name] = (other.key, src_entry[1])
            dst_dir.children[new_name] = (node.key, dst_entry[1])
            if stat.S_ISDIR(node.mode) != stat.S_ISDIR(other.mode) and src_dir is not dst_dir:
                delta = 1 if stat.S_ISDIR(node.mode) else -1
                src_dir.nlink -= delta
                dst_dir.nlink += delta
            node.ctime = other.ctime = now
            src_dir.mtime = src_dir.ctime = dst_dir.mtime = dst_dir.ctime = now
            return
        if dst_entry is not None:
            if flags & RENAME_NOREPLACE:
                raise Exists()
            if dst_entry[0] == node.key:
                return
            target = self._nodes[dst_entry[0]]
            if stat.S_ISDIR(node.mode) and not stat.S_ISDIR(target.mode):
                raise NotADirectory()
            if not stat.S_ISDIR(node.mode) and stat.S_ISDIR(target.mode):
                raise IsADirectory()
            if stat.S_ISDIR(target.mode) and target.children:
                raise NotEmpty()
            self._unlink_from(dst_dir, new_name, now)
        del src_dir.children[old_name]
        node.nlink -= 1
        if stat.S_ISDIR(node.mode):
            src_dir.nlink -= 1
        src_dir.mtime = src_dir.ctime = now
        self._link_into(dst_dir, new_name, node, now)
        node.ctime = now

    async def open(self, key: Key, flags: int) -> _Node:
        node = self._node(key)
        if stat.S_ISDIR(node.mode) and flags & (os.O_WRONLY | os.O_RDWR):
            raise IsADirectory()
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode) and node.size:
            self._truncate(node, 0)
            node.mtime = node.ctime = time.time_ns()
        node.opens += 1
        return node

    async def create(
        self, parent: Key, name: bytes, mode: int, flags: int, ctx: Context
    ) -> tuple[Attr, _Node]:
        _, node = self._create_node(parent, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        node.lookups += 1
        node.opens += 1
        return self._attr(node), node

    async def read(self, handle: _Node, offset: int, size: int) -> bytes:
        handle.atime = time.time_ns()
        return self._read(handle, offset, size)

    async def write(self, handle: _Node, offset: int, data: bytes) -> int:
        self._write(handle, offset, data)
        handle.mtime = handle.ctime = time.time_ns()
        return len(data)

    async def release(self, handle: _Node) -> None:
        handle.opens -= 1
        self._maybe_free(handle)

    async def statfs(self) -> StatFS:
        block = 4096
        total = (self.max_bytes if self.max_bytes is not None else 1 << 40) // block
        used = -(-self.used_bytes // block)
        files = self.max_inodes if self.max_inodes is not None else 1 << 32
        return StatFS(block, total, max(total - used, 0), files, max(files - len(self._nodes), 0))

    async def getxattr(self, key: Key, name: bytes) -> bytes:
        try:
            return self._node(key).xattrs[name]
        except KeyError:
            raise NoAttribute() from None

    async def listxattr(self, key: Key) -> list[bytes]:
        return list(self._node(key).xattrs)

    async def setxattr(self, key: Key, name: bytes, value: bytes) -> None:
        node = self._node(key)
        if not name or len(name) > 255 or len(value) > XATTR_SIZE_MAX:
            raise FSError("xattr name or value too long", errno.ERANGE)
        old = node.xattrs.get(name)
        self._charge(len(name) + len(value) - (len(name) + len(old) if old is not None else 0))
        node.xattrs[name] = value
        node.ctime = time.time_ns()

    async def removexattr(self, key: Key, name: bytes) -> None:
        node = self._node(key)
        value = node.xattrs.pop(name, None)
        if value is None:
            raise NoAttribute()
        self.used_bytes -= len(name) + len(value)
        node.ctime = time.time_ns()
