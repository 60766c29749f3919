"""Sandbox networking: the proxied path (namespace, nftables, policy, proxy) against the
same qemu user networking with no proxy, and host loopback, in one run.

- *bulk download guest <- origin*: ``wget`` of a large body from an HTTP origin on this
  host's loopback (reached as 10.0.2.2), through our proxy (``allow-all``) and through
  plain qemu user networking (the same device, no namespace, no policy); host loopback
  reading the same body is the ceiling;
- *connection round trip*: open a TCP connection, send a line, read the echo, close — N
  times in a guest shell loop (``nc``), mean per connection; both cases pay the same
  process start-up under TCG, so the difference is what the proxy adds (a shell loop has no
  per-connection clock: no p50/p99 here).

Not measured yet: intercepted HTTPS against plain TLS, and requests/s through the HTTP
middleware (issue #17's benchmark asks for both).
"""

from __future__ import annotations

import http.server
import socketserver
import tempfile
import threading
import time
from pathlib import Path

import trio

from vm.launcher import Sandbox
from vm.machine import Machine

from .harness import Report

PROXIED = "through lanekit's proxy (allow-all)"
PLAIN = "qemu user networking, no proxy"
LOOPBACK = "host loopback (ceiling)"
CHUNK = 1 << 20


class UnproxiedSandbox(Sandbox):
    """The same network device on plain qemu user networking: no namespace, no policy."""

    def extra_qemu_args(self, runtime: Path) -> list[str]:
        return ["-netdev", "user,id=net0,ipv6=off", "-device", "virtio-net-device,netdev=net0"]


class _Body(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    block = bytes(range(256)) * (CHUNK // 256)

    def do_GET(self) -> None:
        size = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        for _ in range(size // CHUNK):
            self.wfile.write(self.block)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


async def _guest_seconds(machine: Machine, script: str) -> float:
    start = time.perf_counter()
    result = await machine.exec(["sh", "-c", script], timeout=600)
    if result.exit_code != 0:
        raise RuntimeError(f"{script!r} failed: {result.stderr.decode()[-300:]}")
    return time.perf_counter() - start


def _loopback_mbs(port: int, size: int) -> float:
    import urllib.request

    start = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{size}") as response:
        while response.read(CHUNK):
            pass
    return size / (time.perf_counter() - start) / 1e6


def run(*, quick: bool = False) -> Report:
    repeats = 1 if quick else 5
    size = (32 if quick else 256) << 20
    connections = 20 if quick else 200
    report = Report("net", __doc__.split("\n\n")[0] if __doc__ else "net")
    report.metric("bulk download guest <- origin", "MB/s", baseline=PLAIN)
    report.metric("connection round trip (mean)", "ms", higher_is_better=False, baseline=PLAIN)
    http_server = _Threaded(("127.0.0.1", 0), _Body)
    echo_server = _Threaded(("127.0.0.1", 0), _Echo)
    for server in (http_server, echo_server):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    http_port, echo_port = http_server.server_address[1], echo_server.server_address[1]
    download = f"wget -qO- http://10.0.2.2:{http_port}/{size} >/dev/null"
    loop = f"for i in $(seq {connections}); do echo x | nc 10.0.2.2 {echo_port} >/dev/null; done"
    try:
        with tempfile.TemporaryDirectory(prefix="lanekit-bench-net-") as tmp:
            home = Path(tmp)
            cases = {
                PROXIED: Sandbox("shell", home=home, network="allow-all"),
                PLAIN: UnproxiedSandbox("shell", home=home),
            }

            async def measure(name: str, sandbox: Sandbox) -> None:
                async with sandbox.boot() as machine:
                    await _guest_seconds(machine, download)  # warm up
                    for _ in range(repeats):
                        seconds = await _guest_seconds(machine, download)
                        report.add("bulk download guest <- origin", name, size / seconds / 1e6)
                        seconds = await _guest_seconds(machine, loop)
                        report.add(
                            "connection round trip (mean)", name, 1000 * seconds / connections
                        )

            for name, sandbox in cases.items():
                trio.run(measure, name, sandbox)
            for _ in range(repeats):
                report.add(
                    "bulk download guest <- origin", LOOPBACK, _loopback_mbs(http_port, size)
                )
    finally:
        http_server.shutdown()
        echo_server.shutdown()
    report.notes.append(
        f"shell image (busybox wget and nc), 1 vCPU, 512 MiB, TCG unless KVM works; "
        f"{size >> 20} MiB per download, {connections} connections per loop, {repeats} "
        "repeats. Goals: bulk at least 0.8x unproxied; the added round trip at most 2 ms."
    )
    return report
