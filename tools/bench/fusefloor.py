"""The FUSE floor: a raw ``/dev/fuse`` server that stores nothing, to measure the kernel's share.

Every FUSE filesystem pays the kernel's request round trip (two context switches and a
copy per request) before it does any work of its own. This server answers straight from
the device, one blocking ``read`` and one ``write`` per request, in one thread, with no
pyfuse3 and no storage: writes are counted and dropped, reads return zeros, names and
attributes live in a dict. It negotiates the same features libfuse does for our mounts
(writeback cache, 1 MiB requests, READDIRPLUS), lets the kernel cache names and attributes
as long as a MemoryFS mount does and uses the same 4 MiB read-ahead, so what it reaches
in the vfs bench is the ceiling for any FUSE filesystem on the machine that answers the
same requests, ours included. A benchmark instrument, not a filesystem.

``python -m tools.bench.fusefloor MOUNTPOINT`` serves until unmounted or SIGTERM; the
mount is made by ``fusermount3 -o auto_unmount``, so it disappears even after kill -9.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockstore.serve.fusefile import set_fuse_readahead
from vfs.fuse import CACHED_TIMEOUT_S

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QIi")
RW_IN = struct.Struct("<QQI")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
DIRENT = struct.Struct("<QQII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
STATFS_OUT = struct.Struct("<QQQQQIII28x")

ROOT = 1
TIMEOUT_S = int(CACHED_TIMEOUT_S)
MAX_WRITE = 1 << 20
# what libfuse 3.14 negotiates for pyfuse3 with enable_writeback_cache (read off its INIT
# reply): ASYNC_READ, ATOMIC_O_TRUNC, BIG_WRITES, AUTO_INVAL_DATA, DO_READDIRPLUS,
# ASYNC_DIO, WRITEBACK_CACHE, MAX_PAGES
FLAGS = (1 << 0) | (1 << 3) | (1 << 5) | (1 << 12) | (1 << 13) | (1 << 15) | (1 << 16) | (1 << 22)
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8

(LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME,
 OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR,
 RELEASEDIR, FSYNCDIR, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS) = (
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 22, 23, 25, 26, 27, 29, 30,
    35, 36, 38, 42, 44)  # fmt: skip
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}


@dataclass
class Node:
    mode: int
    nlink: int = 1
    size: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    target: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)


class Reply(Exception):
    """An errno answer to the request being served."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def _names(body: memoryview, count: int) -> list[bytes]:
    return bytes(body).split(b"\0")[:count]


class FloorServer:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.nodes: dict[int, Node] = {ROOT: Node(stat.S_IFDIR | 0o755, nlink=2)}
        self.next_ino = ROOT + 1
        self.sec, self.nsec = divmod(time.time_ns(), 1_000_000_000)
        self.handlers: dict[int, Callable[[int, memoryview], bytes]] = {
            INIT: self.init, LOOKUP: self.lookup, GETATTR: self.getattr,
            SETATTR: self.setattr, READLINK: self.readlink, SYMLINK: self.symlink,
            MKNOD: self.mknod, MKDIR: self.mkdir, UNLINK: self.remove, RMDIR: self.remove,
            RENAME: self.rename, OPEN: self.open, OPENDIR: self.open, CREATE: self.create,
            READ: self.read, WRITE: self.write, STATFS: self.statfs,
            READDIRPLUS: self.readdirplus, GETXATTR: self.getxattr, LISTXATTR: self.listxattr,
            RELEASE: self.empty, RELEASEDIR: self.empty, FSYNC: self.empty,
            FSYNCDIR: self.empty, DESTROY: self.empty,
        }  # fmt: skip

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise Reply(errno.ESTALE) from None

    def attr(self, ino: int) -> bytes:
        n = self.nodes[ino]
        s, ns = self.sec, self.nsec
        blocks = (n.size + 511) // 512
        return ATTR.pack(
            ino, n.size, blocks, s, s, s, ns, ns, ns, n.mode, n.nlink, n.uid, n.gid, n.rdev,
            4096, 0,
        )  # fmt: skip

    def entry(self, ino: int) -> bytes:
        return ENTRY.pack(ino, 0, TIMEOUT_S, TIMEOUT_S, 0, 0) + self.attr(ino)

    def add(self, parent: int, name: bytes, node: Node) -> int:
        children = self.node(parent).children
        if name in children:
            raise Reply(errno.EEXIST)
        ino = self.next_ino
        self.next_ino += 1
        self.nodes[ino] = node
        children[name] = ino
        return ino

    # ------------------------------------------------------------ requests

    def init(self, ino: int, body: memoryview) -> bytes:
        major, _minor, readahead, flags = struct.unpack_from("<IIII", body)
        if major != 7:
            raise Reply(errno.EPROTO)
        return INIT_OUT.pack(7, 31, readahead, flags & FLAGS, 0, 0, MAX_WRITE, 1, 256, 0, 0, 0)

    def lookup(self, ino: int, body: memoryview) -> bytes:
        child = self.node(ino).children.get(_names(body, 1)[0])
        if child is None:
            raise Reply(errno.ENOENT)
        return self.entry(child)

    def getattr(self, ino: int, body: memoryview) -> bytes:
        self.node(ino)
        return ATTR_OUT.pack(TIMEOUT_S, 0, 0) + self.attr(ino)

    def setattr(self, ino: int, body: memoryview) -> bytes:
        fields = SETATTR_IN.unpack_from(body)
        n, valid = self.node(ino), fields[0]
        if valid & FATTR_MODE:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(fields[11])
        if valid & FATTR_UID:
            n.uid = fields[13]
        if valid & FATTR_GID:
            n.gid = fields[14]
        if valid & FATTR_SIZE:
            n.size = fields[3]
        return self.getattr(ino, body)

    def readlink(self, ino: int, body: memoryview) -> bytes:
        return self.node(ino).target

    def symlink(self, ino: int, body: memoryview) -> bytes:
        name, target = _names(body, 2)
        node = Node(stat.S_IFLNK | 0o777, size=len(target), target=target)
        return self.entry(self.add(ino, name, node))

    def mknod(self, ino: int, body: memoryview) -> bytes:
        mode, rdev = struct.unpack_from("<II", body)
        return self.entry(self.add(ino, _names(body[16:], 1)[0], Node(mode, rdev=rdev)))

    def mkdir(self, ino: int, body: memoryview) -> bytes:
        (mode,) = struct.unpack_from("<I", body)
        node = Node(stat.S_IFDIR | stat.S_IMODE(mode), nlink=2)
        return self.entry(self.add(ino, _names(body[8:], 1)[0], node))

    def create(self, ino: int, body: memoryview) -> bytes:
        (_flags, mode) = struct.unpack_from("<II", body)
        child = self.add(ino, _names(body[16:], 1)[0], Node(mode))
        return self.entry(child) + OPEN_OUT.pack(child, 0, 0)

    def remove(self, ino: int, body: memoryview) -> bytes:
        if self.node(ino).children.pop(_names(body, 1)[0], None) is None:
            raise Reply(errno.ENOENT)
        return b""

    def rename(self, ino: int, body: memoryview) -> bytes:
        (new_parent,) = struct.unpack_from("<Q", body)
        old, new = _names(body[8:], 2)
        child = self.node(ino).children.pop(old, None)
        if child is None:
            raise Reply(errno.ENOENT)
        self.node(new_parent).children[new] = child
        return b""

    def open(self, ino: int, body: memoryview) -> bytes:
        self.node(ino)
        return OPEN_OUT.pack(ino, 0, 0)

    def read(self, ino: int, body: memoryview) -> bytes:
        fh, offset, size = RW_IN.unpack_from(body)
        return bytes(max(0, min(size, self.node(fh).size - offset)))

    def write(self, ino: int, body: memoryview) -> bytes:
        fh, offset, size = RW_IN.unpack_from(body)
        n = self.node(fh)
        n.size = max(n.size, offset + size)
        return struct.pack("<II", size, 0)

    def statfs(self, ino: int, body: memoryview) -> bytes:
        big = 1 << 30
        return STATFS_OUT.pack(big, big, big, big, big, 4096, 255, 4096)

    def readdirplus(self, ino: int, body: memoryview) -> bytes:
        _fh, offset, size = RW_IN.unpack_from(body)
        out = bytearray()
        for cookie, (name, child) in enumerate(self.node(ino).children.items(), start=1):
            if cookie <= offset:
                continue
            record = self.entry(child) + DIRENT.pack(
                child, cookie, len(name), stat.S_IFMT(self.nodes[child].mode) >> 12
            )
            record += name + bytes(-len(name) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def getxattr(self, ino: int, body: memoryview) -> bytes:
        raise Reply(errno.ENODATA)

    def listxattr(self, ino: int, body: memoryview) -> bytes:
        (size,) = struct.unpack_from("<I", body)
        return struct.pack("<II", 0, 0) if size == 0 else b""

    def empty(self, ino: int, body: memoryview) -> bytes:
        return b""

    # ------------------------------------------------------------ the loop

    def serve(self) -> None:
        """Answer requests until the kernel says the mount is gone (ENODEV)."""
        while True:
            try:
                request = os.read(self.fd, MAX_WRITE + 4096)
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we read it
                raise
            _length, opcode, unique, ino = IN_HEADER.unpack_from(request)[:4]
            if opcode in NO_REPLY:
                continue
            handler = self.handlers.get(opcode)
            try:
                if handler is None:
                    raise Reply(errno.ENOSYS)  # FLUSH, ACCESS, ...: the kernel stops asking
                body = handler(ino, memoryview(request)[IN_HEADER.size :])
                error = 0
            except Reply as exc:
                body, error = b"", exc.errno
            header = OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique)
            try:
                os.write(self.fd, header + body)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted
                    raise
            if opcode == DESTROY:
                return


def mount_device(mountpoint: str) -> tuple[int, subprocess.Popen[bytes], socket.socket]:
    """Mount through ``fusermount3 -o auto_unmount`` and receive the ``/dev/fuse`` fd.

    fusermount3 stays behind, watching the socket: when this process dies, however it
    dies, the socket closes and fusermount3 unmounts.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    options = "auto_unmount,allow_other,default_permissions,fsname=fusefloor,subtype=fusefloor"
    helper = subprocess.Popen(
        ["fusermount3", "-o", options, "--", mountpoint],
        env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    if not fds:
        helper.wait()
        raise SystemExit(f"fusermount3 could not mount {mountpoint} (exit {helper.returncode})")
    return fds[0], helper, ours


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: python -m tools.bench.fusefloor MOUNTPOINT")
    mountpoint = os.path.abspath(argv[0])
    fd, helper, watch = mount_device(mountpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # the stat behind it waits for INIT, which only the serving loop answers
        threading.Thread(target=set_fuse_readahead, args=(mountpoint, 4096)).start()
        FloorServer(fd).serve()
    finally:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        os.close(fd)
        watch.close()
        helper.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
