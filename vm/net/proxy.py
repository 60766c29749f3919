"""The TCP proxy: every TCP flow the guest opens arrives here as a :class:`Flow`; the policy
decides it; an allowed flow is dialled upstream from the egress namespace and its bytes
are copied both ways; a denied one is reset at once (the guest sees its connection reset,
never a hang).

Where flows come from is a :class:`FlowSource`. Today it is :class:`RedirectedFlows`: a
listener in the sandbox's namespace that nftables redirects every TCP flow to, reading the
original destination with ``SO_ORIGINAL_DST``. A userspace TCP/IP stack behind qemu's
``-netdev stream`` could be another source with the same interface.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from . import serving
from .addresses import Endpoint
from .audit import Audit
from .decide import Connection, Decider, HttpGrant, RawGrant
from .namespace import Egress
from .pins import Pins

SO_ORIGINAL_DST = 80
CONNECT_TIMEOUT = 10.0
COPY_CHUNK = 256 * 1024


@dataclasses.dataclass
class Flow:
    """One TCP flow from the guest: a stream to it, and where the guest meant to go."""

    stream: trio.SocketStream
    src: Endpoint
    dst: Endpoint

    def refuse(self) -> None:
        """Reset the guest's connection (RST, not a polite close)."""
        sock = self.stream.socket
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()


FlowHandler = Callable[[Flow], Awaitable[None]]


class FlowSource(Protocol):
    async def serve(self, handler: FlowHandler) -> None:
        """Call ``handler`` in a task of its own for every flow, until cancelled."""


class RedirectedFlows:
    """Flows redirected by nftables to ``listener`` (in the sandbox's namespace)."""

    def __init__(self, listener: trio.socket.SocketType, guest: Endpoint) -> None:
        self._listener = listener
        self._guest = guest

    async def serve(self, handler: FlowHandler) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await serving.accept(self._listener)
                try:
                    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                except OSError:
                    sock.close()
                    continue
                port, packed = struct.unpack_from("!2xH4s", raw)
                dst = Endpoint(socket.inet_ntoa(packed), port)
                flow = Flow(trio.SocketStream(sock), self._guest, dst)
                nursery.start_soon(
                    functools.partial(
                        serving.guarded, f"TCP flow to {dst}", handler, flow, on_failure=flow.refuse
                    )
                )


class Interceptor(Protocol):
    async def handle(self, flow: Flow, grant: HttpGrant, reason: str) -> bool:
        """Serve an intercepted flow to its end (auditing each request); False, having
        read nothing, if it is to go through raw instead."""


class TcpProxy:
    def __init__(
        self,
        decider: Decider,
        pins: Pins,
        audit: Audit,
        egress: Egress,
        interceptor: Interceptor | None = None,
    ) -> None:
        self._decider = decider
        self._pins = pins
        self._audit = audit
        self._egress = egress
        self._interceptor = interceptor
        self._slots = trio.Semaphore(decider.config.max_connections)

    async def handle(self, flow: Flow) -> None:
        hostnames = self._pins.names_for(flow.dst.ip)
        hostname = hostnames[0] if len(hostnames) == 1 else None
        src, dst = str(flow.src.ip), str(flow.dst)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            flow.refuse()
            self._audit.record("tcp", src, dst, hostname, "deny", "too many connections")
            return
        try:
            conn = Connection("tcp", flow.src, flow.dst, hostnames)
            decision = await self._decider.decide_flow(conn)
            if isinstance(decision.grant, HttpGrant):
                if self._interceptor is None:  # cannot happen: the config says it may
                    flow.refuse()
                    self._audit.record("tcp", src, dst, hostname, "deny", "no interception")
                    return
                if await self._interceptor.handle(flow, decision.grant, decision.reason):
                    return
            elif not isinstance(decision.grant, RawGrant):
                flow.refuse()
                self._audit.record("tcp", src, dst, hostname, "deny", decision.reason)
                return
            try:
                upstream = await self._egress.connect(flow.dst.ip, flow.dst.port, CONNECT_TIMEOUT)
            except (OSError, trio.TooSlowError) as exc:
                flow.refuse()
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
                self._audit.record(
                    "tcp", src, dst, hostname, "error", f"{decision.reason}; upstream: {why}"
                )
                return
            counts = [0, 0]
            try:
                await copy_both_ways(flow.stream, upstream, counts)
            finally:
                self._audit.record(
                    "tcp", src, dst, hostname, "allow", decision.reason, counts[0], counts[1]
                )
        finally:
            self._slots.release()


async def copy_both_ways(
    near: trio.SocketStream, far: trio.SocketStream, counts: list[int]
) -> None:
    """Copy until both directions end; ``counts``: bytes near to far, far to near."""
    async with near, far, trio.open_nursery() as nursery:
        nursery.start_soon(_copy, near, far, counts, 0)
        nursery.start_soon(_copy, far, near, counts, 1)


async def _copy(
    source: trio.SocketStream, sink: trio.SocketStream, counts: list[int], index: int
) -> None:
    """Copy until EOF, then half-close ``sink`` (the other direction goes on)."""
    try:
        while chunk := await source.receive_some(COPY_CHUNK):
            await sink.send_all(chunk)
            counts[index] += len(chunk)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        # One side broke: end both directions.
        for stream in (source, sink):
            try:
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
            await stream.aclose()
