"""The sandbox's DNS: every query the guest sends (UDP or TCP, port 53, to any address)
reaches this listener, which asks the policy, forwards allowed A queries to the chosen
resolver from the egress namespace, refuses rebinding answers and records pins.

AAAA queries get an empty answer (the sandbox has no IPv6); other types are refused. The
wire format is dnslib's; nothing here parses DNS by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Any

import trio
from dnslib import QTYPE, RCODE, RR, DNSError, DNSHeader, DNSRecord  # type: ignore[import-untyped]

from . import serving
from .addresses import Endpoint, groups_of
from .audit import Audit
from .config import REBINDING_GROUPS, resolver_address
from .decide import Connection, Decider, DnsGrant, DnsQuestion
from .namespace import Egress
from .pins import Pins

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT = 3.0
MAX_TCP_QUERY = 65535
MAX_INFLIGHT = 64
MAX_TCP_CONNECTIONS = 64
"""DNS-over-TCP connections served at once (each may stay 10 s): more wait to be accepted."""


class DnsService:
    def __init__(
        self,
        decider: Decider,
        pins: Pins,
        audit: Audit,
        egress: Egress,
        resolvers: tuple[str, ...],
        guest: Endpoint,
        server: Endpoint,
    ) -> None:
        self._decider = decider
        self._pins = pins
        self._audit = audit
        self._egress = egress
        self._resolvers = resolvers
        self._guest = guest
        self._server = server
        self._rebind = decider.config.rebind_protection
        self._inflight = trio.Semaphore(MAX_INFLIGHT)
        self._tcp_slots = trio.Semaphore(MAX_TCP_CONNECTIONS)

    async def serve_udp(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                data, peer = await sock.recvfrom(4096)
                await self._inflight.acquire()
                nursery.start_soon(self._answer_udp, sock, data, peer)

    async def _answer_udp(
        self, sock: trio.socket.SocketType, data: bytes, peer: tuple[str, int]
    ) -> None:
        try:
            reply = await self.answer(data, "udp")
            if reply is not None:
                if len(reply) > 512:  # a classic client: tell it to come back over TCP
                    reply = _truncated(data)
                await sock.sendto(reply, peer)
        except OSError:
            pass
        except Exception:  # one bad packet must not take the sandbox's DNS down
            log.exception("DNS query dropped")
        finally:
            self._inflight.release()

    async def serve_tcp(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self._tcp_slots.acquire()  # more wait in the kernel's backlog
                try:
                    conn, _ = await serving.accept(listener)
                except BaseException:
                    self._tcp_slots.release()
                    raise
                nursery.start_soon(self._answer_tcp, trio.SocketStream(conn))

    async def _answer_tcp(self, stream: trio.SocketStream) -> None:
        try:
            await self._answer_tcp_held(stream)
        finally:
            self._tcp_slots.release()

    async def _answer_tcp_held(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(10):
                    while True:
                        head = await _receive_exactly(stream, 2)
                        if head is None:
                            return
                        query = await _receive_exactly(stream, struct.unpack("!H", head)[0])
                        if query is None:
                            return
                        reply = await self.answer(query, "tcp")
                        if reply is None:
                            return
                        await stream.send_all(struct.pack("!H", len(reply)) + reply)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                pass
            except Exception:
                log.exception("DNS query over TCP dropped")

    async def answer(self, data: bytes, transport: str) -> bytes | None:
        """The reply to one query (None: unreadable, dropped)."""
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises several kinds on garbage
            return None
        if not query.questions:
            return None
        question = query.questions[0]
        name = str(question.qname).rstrip(".").lower()
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        conn = Connection(
            "dns", self._guest, self._server, dns=DnsQuestion(name, str(qtype), transport)
        )
        decision = await self._decider.decide_query(conn)
        if not isinstance(decision.grant, DnsGrant):
            self._record(name, "deny", decision.reason, qtype=qtype)
            return _reply(query, RCODE.REFUSED)
        if qtype == "AAAA":
            self._record(name, "allow", decision.reason, qtype=qtype, answers=[])
            return _reply(query, RCODE.NOERROR)
        if qtype != "A":
            self._record(name, "deny", f"{qtype} queries are not answered", qtype=qtype)
            return _reply(query, RCODE.REFUSED)
        resolvers = decision.grant.resolvers or self._resolvers
        upstream = await self._forward(query, resolvers)
        if upstream is None:
            self._record(name, "error", "no resolver answered", qtype=qtype)
            return _reply(query, RCODE.SERVFAIL)
        if upstream.header.rcode != RCODE.NOERROR:
            rcode = upstream.header.rcode
            self._record(name, "allow", decision.reason, qtype=qtype, rcode=RCODE.get(rcode))
            return _reply(query, rcode)
        records = [rr for rr in upstream.rr if rr.rtype in (QTYPE.A, QTYPE.CNAME)]
        ips = [str(rr.rdata) for rr in records if rr.rtype == QTYPE.A]
        if self._rebind and not decision.grant.allow_private:
            bad = [
                ip
                for ip in ips
                if groups_of(ip) & REBINDING_GROUPS and not self._decider.vouched(name, ip)
            ]
            if bad:
                self._record(name, "deny", "DNS rebinding protection", qtype=qtype, answers=bad)
                return _reply(query, RCODE.NXDOMAIN)
        ttl = min((rr.ttl for rr in records), default=0)
        if ips:
            self._pins.add([name], ips, ttl)
        self._record(name, "allow", decision.reason, qtype=qtype, answers=ips)
        reply = query.reply()
        for rr in records:
            reply.add_answer(RR(rr.rname, rr.rtype, rdata=rr.rdata, ttl=rr.ttl))
        return bytes(reply.pack())

    async def _forward(self, query: DNSRecord, resolvers: tuple[str, ...]) -> DNSRecord | None:
        header = DNSHeader(id=int.from_bytes(os.urandom(2), "big"), rd=query.header.rd)
        outgoing = DNSRecord(header, q=query.q)
        packet = bytes(outgoing.pack())
        for spec in resolvers:
            address = resolver_address(spec)
            try:
                data = await self._udp(packet, address)
                reply = DNSRecord.parse(data)
                if reply.header.tc:
                    reply = DNSRecord.parse(await self._tcp(packet, address))
            except (OSError, trio.TooSlowError, DNSError, trio.BrokenResourceError) as exc:
                log.debug("resolver %s: %r", spec, exc)
                continue
            if reply.header.id == outgoing.header.id:
                return reply
        return None

    async def _udp(self, packet: bytes, address: tuple[str, int]) -> bytes:
        sock = await self._egress.socket(socket.SOCK_DGRAM)
        with sock, trio.fail_after(UPSTREAM_TIMEOUT):
            await sock.connect(address)
            await sock.send(packet)
            return await sock.recv(65535)

    async def _tcp(self, packet: bytes, address: tuple[str, int]) -> bytes:
        stream = await self._egress.connect(*address, timeout=UPSTREAM_TIMEOUT)
        async with stream:
            with trio.fail_after(UPSTREAM_TIMEOUT):
                await stream.send_all(struct.pack("!H", len(packet)) + packet)
                head = await _receive_exactly(stream, 2)
                body = (
                    None
                    if head is None
                    else await _receive_exactly(stream, *struct.unpack("!H", head))
                )
        if body is None:
            raise OSError("the resolver closed the TCP connection")
        return body

    def _record(self, name: str, verdict: str, reason: str, **detail: Any) -> None:
        self._audit.record("dns", self._guest.ip, str(self._server), name, verdict, reason,
                           detail=detail)  # fmt: skip


def _reply(query: DNSRecord, rcode: int) -> bytes:
    reply = query.reply()
    reply.header.rcode = rcode
    return bytes(reply.pack())


def _truncated(data: bytes) -> bytes:
    reply = DNSRecord.parse(data).reply()
    reply.header.tc = 1
    return bytes(reply.pack())


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
