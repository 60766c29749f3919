"""A "test internet" for the network tests: ``unshare -n python -m tests.netorigins``.

It runs in a network namespace of its own with only a loopback device, holding the test
addresses (203.0.113.0/24 and 198.51.100.0/24, documentation ranges) and no route anywhere
else, so nothing sent through it can leave this machine. Its origins:

- HTTP on 203.0.113.10:80: ``/hello`` (a fixed body) and ``/bytes/N`` (N pseudo-random bytes,
  the same for the same N);
- a TCP echo on 198.51.100.20:7;
- DNS on 203.0.113.53:53 (``origin.test``, ``echo.test``, ``rebind.test`` -> 10.1.2.3, and
  ``big.test``: an answer too big for UDP) and a second resolver on 198.51.100.53:53 that
  alone answers ``elsewhere.test`` (198.51.100.99).

It prints ``ready`` once everything listens and runs until stdin closes.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # type: ignore[import-untyped]

ADDRESSES = ("203.0.113.10", "203.0.113.53", "198.51.100.20", "198.51.100.53", "198.51.100.99")
HELLO = b"hello from the test internet\n"
MAIN_ZONE = {
    "origin.test": ["203.0.113.10"],
    "echo.test": ["198.51.100.20"],
    "rebind.test": ["10.1.2.3"],
    "big.test": [f"203.0.113.{i}" for i in range(100, 160)],
}
OTHER_ZONE = {"elsewhere.test": ["198.51.100.99"]}


def payload(size: int) -> bytes:
    block = random.Random(size).randbytes(1 << 20)
    return block * (size >> 20) + block[: size & ((1 << 20) - 1)]


class Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: dict[str, list[str]]) -> None:
        self.zone = zone

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name not in self.zone:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in self.zone[name]:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=60))
        return reply


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/hello":
            body = HELLO
        elif self.path.startswith("/bytes/"):
            body = payload(int(self.path.removeprefix("/bytes/")))
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ThreadedHTTP(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for ip in ADDRESSES:
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    servers = [ThreadedHTTP(("203.0.113.10", 80), Origin), Threaded(("198.51.100.20", 7), Echo)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for address, zone in (("203.0.113.53", MAIN_ZONE), ("198.51.100.53", OTHER_ZONE)):
        for tcp in (False, True):
            quiet = DNSLogger(logf=lambda line: None)  # stdout is the parent's pipe
            DNSServer(Zone(zone), port=53, address=address, tcp=tcp, logger=quiet).start_thread()
    print("ready", flush=True)
    sys.stdin.read()


@contextlib.contextmanager
def internet_namespace(cwd: str) -> Iterator[str]:
    """Run the test internet; yields the path of its network namespace."""
    proc = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-m", "tests.netorigins"],
        cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"/proc/{proc.pid}/ns/net"
    finally:
        proc.kill()
        proc.wait()


def namespace_holders(inode: int) -> list[str]:
    """Every process, thread or open file that holds the network namespace ``inode``."""
    link = f"net:[{inode}]"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/task/{tid}/ns/net") == link:
                        found.append(f"task {pid}/{tid}")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                        found.append(f"fd {pid}/{fd}")
    return found


def assert_namespace_gone(inode: int) -> None:
    """Nothing holds the namespace any more, so the kernel freed it with its nftables
    table, listeners and sockets; no lanekit name was left in /run/netns."""
    deadline = time.monotonic() + 15
    while namespace_holders(inode) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert namespace_holders(inode) == []
    netns = Path("/run/netns")
    assert not any(
        p.name.startswith("lanekit") for p in (netns.iterdir() if netns.is_dir() else ())
    )


if __name__ == "__main__":
    main()
