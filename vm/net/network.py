"""One boot's network: a namespace of its own that qemu's user networking runs in, nftables
rules that send every TCP flow to the proxy and every DNS query to the DNS listener and
drop everything else, and the listeners, serving in the launcher's trio loop.

Fail closed, by order: the namespace, its rules and both listeners exist before qemu is
started, and qemu is started *in* the namespace (it joins it before it execs), so the guest
never has a moment with another way out. The namespace has no name: it is held by a thread
of this process and by qemu, so when both are gone — kill -9 of the launcher included, qemu
dies with it — the kernel frees it with its rules and sockets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from blockstore.concurrency import Services

from .addresses import Endpoint
from .audit import Audit, AuditStream
from .config import NetworkConfig
from .decide import Decider
from .dns import DnsService
from .errors import NetworkSetupError
from .guest_trust import GuestFiles, GuestRunner, install_ca, trust_env
from .http import HttpInterceptor
from .namespace import Egress, SandboxNamespace
from .pins import Pins
from .ports import FORWARD_MARK, PublishedPort, free_ports
from .proxy import RedirectedFlows, TcpProxy
from .request import SecretBook
from .tls import upstream_context

if TYPE_CHECKING:
    from .ca import SandboxCA

log = logging.getLogger(__name__)

GUEST_ADDRESS = Endpoint("10.0.2.15", 0)
"""Where the guest is, behind qemu's user networking (its ports are not visible)."""
GUEST_DNS = Endpoint("10.0.2.3", 53)
LISTEN_BACKLOG = 1024
NAMESPACE_ADDRESS = "10.255.255.254"
"""The sandbox namespace's own address: qemu's sockets leave from it, to the listeners."""


def ruleset(proxy_port: int, dns_port: int) -> str:
    """nftables for the sandbox's namespace: TCP to the proxy, port 53 to the DNS listener
    (both bound to 127.0.0.1, so replies are translated back), nothing else, no IPv6 —
    but for lanekit's own sockets to qemu's published-port listeners (marked)."""
    return f"""
table ip lanekit {{
    chain to_listeners {{
        type nat hook output priority -100; policy accept;
        meta mark {FORWARD_MARK} accept
        udp dport 53 redirect to :{dns_port}
        tcp dport 53 redirect to :{dns_port}
        meta l4proto tcp redirect to :{proxy_port}
    }}
    chain nothing_else {{
        type filter hook output priority 0; policy drop;
        ct state established,related accept
        meta mark {FORWARD_MARK} ip daddr 127.0.0.1 accept
        ip daddr 127.0.0.1 tcp dport {{ {proxy_port}, {dns_port} }} accept
        ip daddr 127.0.0.1 udp dport {dns_port} accept
    }}
}}
table ip6 lanekit {{
    chain nothing {{
        type filter hook output priority 0; policy drop;
    }}
}}
"""


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The host's IPv4 name servers (what the guest's queries go to by default)."""
    found = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(f"{ipaddress.IPv4Address(parts[1])}:53")
    return tuple(found)


class Network:
    """A running sandbox network: what qemu needs to join it, and its audit trail."""

    def __init__(
        self,
        config: NetworkConfig,
        namespace: SandboxNamespace,
        audit: Audit,
        ports: list[PublishedPort],
        ca: SandboxCA | None,
        secrets: SecretBook,
    ) -> None:
        self.config = config
        self._namespace = namespace
        self._audit = audit
        self._ports = ports
        self.pins = Pins()
        self.ca = ca
        """The sandbox's CA, if HTTPS may be intercepted (its key stays in this process)."""
        self._secrets = secrets
        self._terminated = trio.Event()
        self.terminated: str | None = None
        """Why the sandbox must end now (a block-and-terminate secret violation), if so."""
        self._stop_serving: Callable[[], None] = lambda: None

    def terminate(self, reason: str) -> None:
        """End every flow and stop answering at once; the launcher's watcher then kills the
        sandbox (so the guest gets nothing more out in between)."""
        if self.terminated is None:
            self.terminated = reason
        self._stop_serving()
        self._terminated.set()

    async def wait_terminated(self) -> str:
        """Once :meth:`terminate` is called: its reason."""
        await self._terminated.wait()
        assert self.terminated is not None
        return self.terminated

    def guest_env(self) -> dict[str, str]:
        """Environment for every command: the secrets' placeholders, and where the CA is."""
        env = trust_env() if self.ca is not None else {}
        env.update(self._secrets.guest_env())
        return env

    async def prepare_guest(self, fs: GuestFiles, run: GuestRunner) -> None:
        """Once the agent answers: make the guest trust the sandbox CA (fails the boot if
        it cannot, so no intercepted flow meets an untrusting guest unexplained)."""
        if self.ca is not None:
            await install_ca(fs, run, self.ca.certificate_pem)

    @property
    def namespace_inode(self) -> int:
        """The inode of the sandbox's namespace (``/proc/PID/ns/net`` links to it)."""
        return self._namespace.inode

    def qemu_args(self) -> list[str]:
        netdev = ",".join(["user,id=net0,ipv6=off", *(p.hostfwd() for p in self._ports)])
        return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]

    def join_hook(self) -> Callable[[], None]:
        """qemu's ``preexec_fn``: start it in the sandbox's namespace."""
        return self._namespace.join_hook()

    def watch(self) -> AuditStream:
        """Audit events from now on, as they happen (``async for event in ...``)."""
        return self._audit.watch()

    @property
    def counts(self) -> dict[str, int]:
        """Decisions so far, by ``kind:verdict``."""
        return dict(self._audit.counts)


@contextlib.asynccontextmanager
async def open_network(
    config: NetworkConfig, sandbox: str, services: Services
) -> AsyncIterator[Network]:
    """Set up one boot's network (see the module's docstring); torn down on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        namespace = await trio.to_thread.run_sync(SandboxNamespace)
        stack.callback(namespace.close)
        egress = await trio.to_thread.run_sync(Egress, config.egress_netns)
        stack.callback(egress.close)
        # Without a route, connects fail with ENETUNREACH before nftables sees them; without
        # a source address on it, packets leave from 0.0.0.0 and no reply finds its way back.
        await namespace.run_tool(["ip", "link", "set", "lo", "up"])
        await namespace.run_tool(["ip", "addr", "add", f"{NAMESPACE_ADDRESS}/32", "dev", "lo"])
        await namespace.run_tool(
            ["ip", "route", "add", "default", "dev", "lo", "src", NAMESPACE_ADDRESS]
        )
        listener = await namespace.socket(socket.SOCK_STREAM, bind=("127.0.0.1", 0))
        stack.callback(listener.close)
        listener.listen(LISTEN_BACKLOG)
        dns_udp, dns_tcp = await _dns_sockets(namespace)
        stack.callback(dns_udp.close)
        stack.callback(dns_tcp.close)
        proxy_port = listener.getsockname()[1]
        dns_port = dns_udp.getsockname()[1]
        await namespace.run_tool(["nft", "-f", "-"], stdin=ruleset(proxy_port, dns_port))

        audit = Audit(sandbox, Path(config.log_path) if config.log_path else None)
        stack.callback(audit.close)
        inner_ports = await free_ports(namespace, len(config.publish))
        ports = [
            PublishedPort(p, inner, namespace, audit)
            for p, inner in zip(config.publish, inner_ports, strict=True)
        ]
        for port in ports:
            await port.listen()
            stack.callback(port.close)
        ca = None
        if config.may_intercept:
            from .ca import SandboxCA

            ca = await trio.to_thread.run_sync(SandboxCA)
        secrets = SecretBook(config.secrets)
        network = Network(config, namespace, audit, ports, ca, secrets)
        decider = Decider(config)
        resolvers = config.dns or host_resolvers()
        dns = DnsService(decider, network.pins, audit, egress, resolvers, GUEST_ADDRESS, GUEST_DNS)
        interceptor = None
        if ca is not None:
            try:
                upstream = await trio.to_thread.run_sync(upstream_context, config.upstream_ca_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise NetworkSetupError(
                    f"upstream CA file {config.upstream_ca_file}: {exc}"
                ) from None
            interceptor = HttpInterceptor(
                ca, upstream, egress, audit, secrets, config.callback_timeout, network.terminate
            )
        proxy = TcpProxy(decider, network.pins, audit, egress, interceptor)
        flows = RedirectedFlows(listener, GUEST_ADDRESS)

        written = trio.Event()
        done = trio.Event()
        scope = trio.CancelScope()
        network._stop_serving = scope.cancel

        async def write(task_status: trio.TaskStatus[None]) -> None:
            try:
                await audit.write_file(task_status=task_status)
            finally:
                written.set()

        async def serve() -> None:
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(flows.serve, proxy.handle)
                        nursery.start_soon(dns.serve_udp, dns_udp)
                        nursery.start_soon(dns.serve_tcp, dns_tcp)
                        for port in ports:
                            nursery.start_soon(port.serve)
            finally:
                done.set()

        await services.start(write)
        services.start_soon(serve)

        async def stop() -> None:
            """The flows end first (each records its verdict), then the log is written out."""
            scope.cancel()
            with trio.CancelScope(shield=True):
                await done.wait()
                audit.close()
                await written.wait()

        stack.push_async_callback(stop)
        yield network


async def _dns_sockets(
    namespace: SandboxNamespace,
) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A UDP and a TCP socket on the same port of 127.0.0.1 in the namespace."""
    for _ in range(20):
        udp = await namespace.socket(socket.SOCK_DGRAM, bind=("127.0.0.1", 0))
        port = udp.getsockname()[1]
        try:
            tcp = await namespace.socket(socket.SOCK_STREAM, bind=("127.0.0.1", port))
        except OSError:
            udp.close()
            continue
        tcp.listen(LISTEN_BACKLOG)
        return udp, tcp
    raise NetworkSetupError("no free port for the DNS listener in the sandbox's namespace")
