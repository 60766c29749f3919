"""A tiny raw NBD client for malformed-input and fuzz tests (real clients cover the rest)."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockstore.serve import nbd as P


class RawClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.structured = False

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf

    def greeting(self) -> None:
        magic, opt, _flags = struct.unpack(">QQH", self.recv(18))
        assert magic == P.NBDMAGIC and opt == P.IHAVEOPT
        self.sock.sendall(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == P.REPLY_MAGIC and ropt == opt
            replies.append((rtype, self.recv(length)))
            if rtype == P.REP_ACK or rtype & (1 << 31):
                return replies

    def go(self, structured: bool = True, meta: bool = True) -> int:
        self.greeting()
        if structured:
            assert self.option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
            self.structured = True
        if meta:
            q = P.BASE_ALLOCATION
            self.option(
                P.OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">II", 1, len(q)) + q
            )
        replies = self.option(P.OPT_GO, struct.pack(">IH", 0, 0))
        assert replies[-1][0] == P.REP_ACK, replies
        info = next(d for t, d in replies if t == P.REP_INFO and d[:2] == b"\0\0")
        _, size, _ = struct.unpack(">HQH", info)
        return int(size)

    def request(
        self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0, handle: int = 1
    ) -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data
        )

    def pipeline(self, requests: Iterable[tuple[int, int, int, int]]) -> None:
        """Send many (cmd, offset, length, handle) requests in one write, replies unread:
        a client that keeps sending and stops reading."""
        self.sock.sendall(
            b"".join(
                struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, cmd, handle, offset, length)
                for cmd, offset, length, handle in requests
            )
        )

    def reply(self) -> tuple[int, int, bytes]:
        """(handle, error, payload) for one complete reply."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self.recv(12))
            return handle, err, b""
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, rtype, handle, length = struct.unpack(">HHQI", self.recv(16))
        payload = self.recv(length)
        assert flags & P.REPLY_FLAG_DONE
        if rtype == P.REPLY_TYPE_ERROR:
            (err,) = struct.unpack(">I", payload[:4])
            return handle, err, payload[6:]
        if rtype == P.REPLY_TYPE_OFFSET_DATA:
            return handle, 0, payload[8:]
        return handle, 0, payload

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def serve_disk(url: str, sock: Path, log: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`lanekit disk serve URL --nbd unix:SOCK` in a subprocess, its stderr (the log) in
    ``log``; SIGTERM at the end must exit 0 after a flush and release."""
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.cli",
                "disk",
                "serve",
                url,
                "--nbd",
                f"unix:{sock}",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + log.read_text()
        yield proc
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, log.read_text()
        assert "flushed and released" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
