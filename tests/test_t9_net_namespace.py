"""A sandbox network without a VM: clients run in the sandbox's namespace itself (where
qemu's sockets would be), against the test internet. Fast, and it reaches the paths a
busybox guest cannot: DNS over TCP, the resolver's TCP fallback, the live audit stream,
the connection cap and setup failures."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dnslib import QTYPE, RCODE, DNSRecord  # type: ignore[import-untyped]

from blockstore.concurrency import Services
from tests.netorigins import HELLO, assert_namespace_gone, internet_namespace
from vm.launcher import Sandbox
from vm.net import AuditEvent, NetworkConfig, NetworkSetupError, Rule, open_network

REPO = Path(__file__).resolve().parent.parent
ANYWHERE = ("192.0.2.1", 53)  # every port-53 query in the namespace reaches our listener


@pytest.fixture(scope="module")
def internet() -> Iterator[str]:
    with internet_namespace(str(REPO)) as path:
        yield path


def dns_udp(name: str) -> DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(DNSRecord.question(name).pack(), ANYWHERE)
        return DNSRecord.parse(sock.recv(4096))


def send_garbage() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in (b"", b"\x00" * 3, b"\xff" * 40, DNSRecord.question("x.test").pack()[:-3]):
            sock.sendto(packet, ANYWHERE)


def dns_tcp(name: str) -> DNSRecord:
    packet = DNSRecord.question(name).pack()
    with socket.create_connection(ANYWHERE, timeout=10) as sock:
        sock.sendall(len(packet).to_bytes(2, "big") + packet)
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    return DNSRecord.parse(data[2:])


def http_get(ip: str) -> bytes:
    with socket.create_connection((ip, 80), timeout=10) as sock:
        sock.sendall(b"GET /hello HTTP/1.0\r\nHost: origin.test\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_dns_and_flows_in_the_namespace(internet: str) -> None:
    config = NetworkConfig(
        preset="deny",
        rules=(Rule("allow", "big.test", protocol="dns"), Rule("allow", "origin.test", ports="80")),
        dns=("203.0.113.53",),
        egress_netns=internet,
        max_connections=1,
    )
    events: list[AuditEvent] = []

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            services = Services(nursery)
            async with open_network(config, "t", services) as network:
                watcher = network.watch()

                async def watch() -> None:
                    async for event in watcher:
                        events.append(event)

                nursery.start_soon(watch)
                run = network._namespace.thread.run
                await run(send_garbage)  # dropped; the listener goes on
                answer = await run(dns_udp, "origin.test")
                assert [str(r.rdata) for r in answer.rr] == ["203.0.113.10"]
                # Too big for UDP: the resolver is asked again over TCP, the guest is told
                # to come back over TCP, and there it gets all 60 addresses.
                assert (await run(dns_udp, "big.test")).header.tc == 1
                assert len((await run(dns_tcp, "big.test")).rr) == 60
                assert (await run(dns_tcp, "echo.test")).header.rcode == RCODE.REFUSED
                aaaa = await run(lambda: dns_udp_type("origin.test", "AAAA"))
                assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr
                assert HELLO in await run(http_get, "203.0.113.10")
                with pytest.raises(ConnectionResetError):
                    await run(http_get, "203.0.113.100")  # big.test's, but DNS only
                inode = network.namespace_inode
            services.close()
        return inode

    inode = trio.run(main)
    assert_namespace_gone(inode)
    verdicts = [(e.kind, e.hostname, e.verdict) for e in events]
    assert ("dns", "echo.test", "deny") in verdicts
    assert ("tcp", "origin.test", "allow") in verdicts
    assert ("tcp", "big.test", "deny") in verdicts
    allowed = next(e for e in events if e.kind == "tcp" and e.verdict == "allow")
    assert allowed.bytes_down > len(HELLO) and allowed.dst == "203.0.113.10:80"


def dns_udp_type(name: str, qtype: str) -> DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(DNSRecord.question(name, qtype).pack(), ANYWHERE)
        reply = DNSRecord.parse(sock.recv(4096))
    assert reply.q.qtype == getattr(QTYPE, qtype)
    return reply


def test_connection_cap(internet: str) -> None:
    """Past max_connections a new flow is reset at once, while the others go on."""
    config = NetworkConfig(preset="allow-all", egress_netns=internet, max_connections=2)

    def hold_two_then_third() -> None:
        held = [socket.create_connection(("198.51.100.20", 7), timeout=10) for _ in range(2)]
        try:
            for sock in held:  # both are through to the echo
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
            third = ("198.51.100.20", 7)
            # Reset at connect or at the first read, whichever the race gives.
            with pytest.raises(ConnectionResetError), socket.create_connection(third, 10) as sock:
                sock.sendall(b"y")
                if not sock.recv(1):
                    raise ConnectionResetError
        finally:
            for sock in held:
                sock.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            services = Services(nursery)
            async with open_network(config, "t", services) as network:
                await network._namespace.thread.run(hold_two_then_third)
                assert network.counts.get("tcp:deny") == 1
            services.close()

    trio.run(main)


@pytest.mark.vm
def test_a_bad_egress_namespace_fails_the_boot(vm_home: Path) -> None:
    config = NetworkConfig(preset="deny", egress_netns="/nonexistent/netns")
    sandbox = Sandbox("shell", home=vm_home, network=config)
    bad = "egress network namespace /nonexistent/netns"
    with pytest.raises(NetworkSetupError, match=bad), sandbox.run():
        pass
