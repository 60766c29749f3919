"""A "test internet" for the network tests: ``unshare -n python -m tests.netorigins``.

It runs in a network namespace of its own with only a loopback device, holding the test
addresses (203.0.113.0/24 and 198.51.100.0/24, documentation ranges) and no route anywhere
else, so nothing sent through it can leave this machine. Its origins:

- HTTP on 203.0.113.10:80: ``/hello`` (a fixed body) and ``/bytes/N`` (N pseudo-random bytes,
  the same for the same N);
- a TCP echo on 198.51.100.20:7;
- HTTPS on 203.0.113.30:443 (``tls.test``), 203.0.113.31:443 (``other.test``) and
  203.0.113.32:443 (``cdn.test`` and ``neighbour.test``, one address), with a
  certificate of the test internet's own CA (written to the path given after
  ``--ca-file``): ``/headers`` answers the request's headers as JSON, ``authorization``
  as the SHA-256 of its value (so a test can check a secret without the guest seeing it),
  and for a POST the SHA-256 of the body as ``body``;
- DNS on 203.0.113.53:53 (``origin.test``, ``echo.test``, ``rebind.test`` -> 10.1.2.3, and
  ``big.test``: an answer too big for UDP) and a second resolver on 198.51.100.53:53 that
  alone answers ``elsewhere.test`` (198.51.100.99).

It prints ``ready`` once everything listens and runs until stdin closes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import json
import os
import random
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RCODE, RR, A  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # type: ignore[import-untyped]

ADDRESSES = (
    "203.0.113.10", "203.0.113.30", "203.0.113.31", "203.0.113.32", "203.0.113.53",
    "198.51.100.20", "198.51.100.53", "198.51.100.99",
)  # fmt: skip
HTTPS_NAMES = {
    "tls.test": "203.0.113.30",
    "other.test": "203.0.113.31",
    "cdn.test": "203.0.113.32",  # two sites on one address, as on a CDN
    "neighbour.test": "203.0.113.32",
}
HELLO = b"hello from the test internet\n"
MAIN_ZONE = {
    "origin.test": ["203.0.113.10"],
    "echo.test": ["198.51.100.20"],
    "rebind.test": ["10.1.2.3"],
    "big.test": [f"203.0.113.{i}" for i in range(100, 160)],
    "*.wild.test": ["203.0.113.10"],  # any name under it: how wildcard DNS services answer
    "loop.wild.test": ["127.0.0.1"],
    "meta.wild.test": ["169.254.169.254"],
    "priv.wild.test": ["10.1.2.4"],
    **{name: [ip] for name, ip in HTTPS_NAMES.items()},
}
OTHER_ZONE = {"elsewhere.test": ["198.51.100.99"]}


def payload_chunks(size: int) -> Iterator[bytes]:
    """``/bytes/N``'s body, 1 MiB at a time: pseudo-random, the same for the same N."""
    block = random.Random(size).randbytes(1 << 20)
    for _ in range(size >> 20):
        yield block
    if size & ((1 << 20) - 1):
        yield block[: size & ((1 << 20) - 1)]


def payload_digest(size: int, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    for chunk in payload_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


class Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: dict[str, list[str]]) -> None:
        self.zone = zone

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name not in self.zone and "." in name:
            name = "*." + name.split(".", 1)[1]
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
            size, chunks = len(HELLO), iter([HELLO])
        elif self.path.startswith("/bytes/"):
            size = int(self.path.removeprefix("/bytes/"))
            chunks = payload_chunks(size)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(chunk)

    def log_message(self, format: str, *args: object) -> None:
        pass


class HeaderEcho(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.do_GET(f"sha256:{hashlib.sha256(body).hexdigest()}")

    def do_GET(self, body_digest: str | None = None) -> None:
        if self.path.partition("?")[0] != "/headers":
            self.send_error(404)
            return
        seen: dict[str, str] = {} if body_digest is None else {"body": body_digest}
        for name, value in self.headers.items():
            if name.lower() == "authorization":
                value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
            seen[name.lower()] = value
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def make_test_ca(names: list[str]) -> tuple[bytes, bytes]:
    """A CA of its own and a server certificate for ``names``: (CA PEM, server chain+key PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test internet CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    server = leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), server


def https_server(address: tuple[str, int], server_pem: bytes) -> ThreadedHTTP:
    """A header-echoing HTTPS server presenting ``server_pem`` (certificate chain and key)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as f:
        f.write(server_pem)
        f.flush()
        context.load_cert_chain(f.name)
    server = ThreadedHTTP(address, HeaderEcho)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


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
    ca_pem, server_pem = make_test_ca(list(HTTPS_NAMES))
    if "--ca-file" in sys.argv:
        Path(sys.argv[sys.argv.index("--ca-file") + 1]).write_bytes(ca_pem)
    servers += [https_server((ip, 443), server_pem) for ip in sorted(set(HTTPS_NAMES.values()))]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for address, zone in (("203.0.113.53", MAIN_ZONE), ("198.51.100.53", OTHER_ZONE)):
        for tcp in (False, True):
            quiet = DNSLogger(logf=lambda line: None)  # stdout is the parent's pipe
            DNSServer(Zone(zone), port=53, address=address, tcp=tcp, logger=quiet).start_thread()
    print("ready", flush=True)
    sys.stdin.read()


@contextlib.contextmanager
def internet_namespace(cwd: str, ca_file: str | None = None) -> Iterator[str]:
    """Run the test internet; yields the path of its network namespace. ``ca_file``: where
    its HTTPS origins' CA certificate is written."""
    extra = ["--ca-file", ca_file] if ca_file else []
    proc = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-m", "tests.netorigins", *extra],
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
