"""Published ports: a host listener per :class:`~vm.net.config.Publish` that forwards each
connection into the guest.

The host end listens in the launcher's namespace. Each connection is carried on by a socket
made in the sandbox's namespace, to qemu's ``hostfwd`` listener there (which hands it to the
guest port); that socket carries :data:`FORWARD_MARK`, which the namespace's rules let by
instead of redirecting it to the proxy. Inbound connections are audited (``inbound``).
"""

from __future__ import annotations

import functools
import socket

import trio

from . import serving
from .audit import Audit
from .config import Publish
from .errors import NetworkSetupError
from .namespace import SandboxNamespace
from .proxy import copy_both_ways

FORWARD_MARK = 0x4C4B
"""``SO_MARK`` of the sockets that carry published ports inside the namespace."""


async def free_ports(namespace: SandboxNamespace, count: int) -> list[int]:
    """``count`` different ports free on 127.0.0.1 in the namespace (only lanekit binds
    there), for qemu's listeners."""
    probes = [
        await namespace.socket(socket.SOCK_STREAM, bind=("127.0.0.1", 0)) for _ in range(count)
    ]
    ports = [int(p.getsockname()[1]) for p in probes]
    for probe in probes:
        probe.close()
    return ports


class PublishedPort:
    def __init__(
        self, publish: Publish, inner_port: int, namespace: SandboxNamespace, audit: Audit
    ) -> None:
        self.publish = publish
        self.inner_port = inner_port
        self._namespace = namespace
        self._audit = audit
        self._listener: trio.SocketListener | None = None

    def hostfwd(self) -> str:
        """qemu's user networking option for this port."""
        return f"hostfwd=tcp:127.0.0.1:{self.inner_port}-:{self.publish.guest_port}"

    async def listen(self) -> None:
        """Bind the host port now, so a port in use fails the boot, not a later connect."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((self.publish.address, self.publish.host_port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            where = f"{self.publish.address}:{self.publish.host_port}"
            raise NetworkSetupError(f"cannot publish {where}: {exc.strerror or exc}") from None
        self._listener = trio.SocketListener(sock)

    async def serve(self) -> None:
        assert self._listener is not None
        async with self._listener, trio.open_nursery() as nursery:
            while True:
                stream = await serving.accept(self._listener)
                nursery.start_soon(
                    functools.partial(
                        serving.guarded, "inbound connection", self._forward, stream,
                        on_failure=stream.socket.close,
                    )
                )  # fmt: skip

    def close(self) -> None:
        if self._listener is not None:
            self._listener.socket.close()

    async def _forward(self, client: trio.SocketStream) -> None:
        peer = client.socket.getpeername()
        src = f"{peer[0]}:{peer[1]}"
        dst = f"guest:{self.publish.guest_port}"
        inner = await self._namespace.socket(socket.SOCK_STREAM, mark=FORWARD_MARK)
        try:
            with trio.fail_after(10):
                await inner.connect(("127.0.0.1", self.inner_port))
        except (OSError, trio.TooSlowError) as exc:
            inner.close()
            await client.aclose()
            self._audit.record("inbound", src, dst, None, "error", f"qemu's forward: {exc}")
            return
        counts = [0, 0]
        try:
            await copy_both_ways(client, trio.SocketStream(inner), counts)
        finally:
            self._audit.record(
                "inbound", src, dst, None, "allow", "published port", counts[0], counts[1]
            )
