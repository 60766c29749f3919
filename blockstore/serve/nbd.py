"""An NBD server (fixed newstyle handshake, structured replies, base:allocation).

Protocol only: it serves any :class:`BlockDevice` (nbdkit's plugin surface: read, write,
write_zeroes, trim, flush, extents), and maps storage errors to NBD errors here, once.
Requests are processed concurrently and answered out of order; FLUSH and FUA are answered
only after the device's durable flush. The spec is ``doc/proto.md`` of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import BlockStoreError, OutOfRange, ReadOnly
from .limits import ByteBudget, NBDLimits

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

BASE_ALLOCATION = b"base:allocation"
BASE_ALLOCATION_ID = 1

_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

_REQUEST = struct.Struct(">IHHQQI")
MAX_OPTION_DATA = 64 << 10
MAX_EXTENT_RUNS = 1 << 20
_EXTENT_RUN = 8

# TCP keepalive on accepted TCP connections: a peer that vanished without a FIN or RST is
# found after about two minutes of silence.
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


class BlockDevice(Protocol):
    """What the server serves; :class:`blockstore.Disk` is one."""

    size: int
    block_size: int
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]: ...


def nbd_errno(exc: BaseException) -> int:
    """The one place storage errors become NBD error codes."""
    if isinstance(exc, ReadOnly):
        return errno.EPERM
    if isinstance(exc, OutOfRange):
        return errno.EINVAL
    return errno.EIO  # corruption, fencing, an unreachable store, anything unexpected


class _Disconnect(Exception):
    """Drop this connection (protocol violation or client gone); others are unaffected."""


class _Reader:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self.buf)))
            if not chunk:
                where = "mid-message" if self.buf else "between messages"
                raise _Disconnect(f"client closed the connection {where}")
            self.buf += chunk
        with memoryview(self.buf) as view:
            out = bytes(view[:n])
        del self.buf[:n]
        return out


@dataclass
class ServerStats:
    connections: int = 0
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    refused: int = 0
    undelivered: int = 0


class NBDServer:
    """Serve one device under one export name to up to ``limits.max_connections`` clients."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        name: str = "",
        description: str = "lanekit disk",
        limits: NBDLimits | None = None,
    ) -> None:
        self.device = device
        self.name = name
        self.description = description
        self.limits = limits = limits or NBDLimits()
        self.read_only = device.read_only
        self.budget = ByteBudget(limits.server_bytes)
        self.stats = ServerStats()
        self._writer_active = False
        self._open = 0
        self._refusing = False
        self._refused_quietly = 0

    @property
    def open_connections(self) -> int:
        """Connections in handshake or transmission now (refused ones are not counted)."""
        return self._open

    def _matches(self, name: bytes) -> bool:
        return name in (b"", self.name.encode())

    def transmission_flags(self) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF
        if self.read_only:
            flags |= TF_READ_ONLY | TF_CAN_MULTI_CONN
        else:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]],
    ) -> None:
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.stats.connections += 1
        number = self.stats.connections
        if self._open >= self.limits.max_connections:
            self._refuse()
            await stream.aclose()
            return
        self._open += 1
        try:
            await self._serve_connection(stream, number)
        finally:
            self._open -= 1
            if self._refusing:
                self._refusing = False
                if self._refused_quietly:
                    log.warning("NBD refused %d more connections at the cap", self._refused_quietly)

    def _refuse(self) -> None:
        """One log line when refusing starts, one with the count when a slot frees: a client
        retrying in a loop must not flood the log."""
        self.stats.refused += 1
        if self._refusing:
            self._refused_quietly += 1
            return
        self._refusing, self._refused_quietly = True, 0
        log.warning(
            "NBD connection refused: %d connections are open, the most allowed "
            "(max_connections=%d)",
            self._open,
            self.limits.max_connections,
        )

    async def _serve_connection(self, stream: trio.abc.Stream, number: int) -> None:
        """Serve one connection; however it ends, it logs at most one line."""
        claimed = False
        conn = _Connection(self, stream)
        reason = ""
        try:
            async with stream:
                _keep_alive(stream)
                try:
                    timeout = self.limits.handshake_timeout
                    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                        await conn.handshake()
                    if scope.cancelled_caught:
                        raise _Disconnect(f"no handshake within {timeout:g} s")
                    if not self.read_only:
                        if self._writer_active:
                            raise _Disconnect("second client on a read-write export")
                        self._writer_active = claimed = True
                    await conn.transmission()
                except _Disconnect as e:
                    self.stats.dropped += 1
                    reason = str(e)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    reason = f"connection lost: {e}"
        finally:
            if claimed:
                self._writer_active = False
        if conn.undelivered:
            self.stats.undelivered += conn.undelivered
            log.warning(
                "NBD connection %d: client gone with %d replies undelivered (%s)",
                number,
                conn.undelivered,
                conn.send_failure,
            )
        elif reason:
            log.info("NBD connection %d dropped: %s", number, reason)


def _keep_alive(stream: trio.abc.Stream) -> None:
    if not isinstance(stream, trio.SocketStream):
        return
    sock = stream.socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE:
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _Connection:
    def __init__(self, server: NBDServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.reader = _Reader(stream)
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._queued: list[tuple[tuple[bytes, ...], trio.Event]] = []
        self._sending = False
        self._send_failed: BaseException | None = None
        self.no_zeroes = False
        self.structured = False
        self.meta_selected = False
        self.in_flight = trio.Semaphore(server.limits.max_in_flight)
        self.budget = ByteBudget(server.limits.connection_bytes, parent=server.budget)
        self._receiving: trio.CancelScope | None = None
        self.undelivered = 0
        self.send_failure = ""

    async def send(self, *parts: bytes) -> None:
        """Send one message whole. Replies that become ready in the same turn of the
        scheduler, or while a send is under way, go out together: a client with sixteen
        4 KiB writes in flight gets their replies in one system call, not sixteen."""
        done = trio.Event()
        self._queued.append((parts, done))
        if self._sending:
            await done.wait()
            if self._send_failed is not None:
                raise trio.BrokenResourceError("the connection failed") from self._send_failed
            return
        self._sending = True
        batch: list[tuple[tuple[bytes, ...], trio.Event]] = []
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()  # the other replies of this turn
            while self._queued:
                batch, self._queued = self._queued, []
                await self._send_all([p for message, _ in batch for p in message])
                for _, event in batch:
                    event.set()
        except BaseException as e:
            self._send_failed = e
            for _, event in batch + self._queued:
                event.set()
            self._queued = []
            if self._receiving is not None:
                # No reply can reach this client: read no more of its requests, even
                # while waiting for budget that stalled clients hold.
                self._receiving.cancel()
            raise
        finally:
            self._sending = False

    async def _send_all(self, parts: list[bytes]) -> None:
        if self.socket is None or sum(map(len, parts)) < 65536:
            await self.stream.send_all(b"".join(parts))
        else:
            await self._send_gathered(self.socket, parts)

    @staticmethod
    async def _send_gathered(sock: trio.socket.SocketType, parts: Sequence[bytes]) -> None:
        """Send a reply header and its data with sendmsg, without joining them into one
        more copy of the data."""
        views = [memoryview(p) for p in parts if p]
        try:
            while views:
                sent = await sock.sendmsg(views)
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0], sent = views[0][sent:], 0
        except OSError as e:
            raise trio.BrokenResourceError(f"sending failed: {e}") from e

    # ------------------------------------------------------------- handshake

    async def reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">QIII", REPLY_MAGIC, option, rtype, len(data)), data)

    async def error(self, option: int, rtype: int, message: str) -> None:
        await self.reply(option, rtype, message.encode())

    async def handshake(self) -> None:
        """Option haggling until GO or EXPORT_NAME (returns) or abort/violation (raises)."""
        await self.send(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        (client_flags,) = struct.unpack(">I", await self.reader.exactly(4))
        if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise _Disconnect(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", await self.reader.exactly(16))
            if magic != IHAVEOPT:
                raise _Disconnect(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise _Disconnect(f"option {option} data of {length} bytes is too big")
            data = await self.reader.exactly(length)
            if option == OPT_EXPORT_NAME:
                if not self.server._matches(data):
                    raise _Disconnect(f"unknown export {data!r}")
                tail = b"" if self.no_zeroes else bytes(124)
                await self.send(
                    struct.pack(">QH", self.server.device.size, self.server.transmission_flags()),
                    tail,
                )
                return
            if option == OPT_ABORT:
                await self.reply(option, REP_ACK)
                raise _Disconnect("client aborted")
            if option == OPT_LIST:
                if length:
                    await self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                name = self.server.name.encode()
                await self.reply(option, REP_SERVER, struct.pack(">I", len(name)) + name)
                await self.reply(option, REP_ACK)
            elif option in (OPT_INFO, OPT_GO):
                if await self.info(option, data) and option == OPT_GO:
                    return
            elif option == OPT_STRUCTURED_REPLY:
                if length:
                    await self.error(option, REP_ERR_INVALID, "takes no data")
                    continue
                self.structured = True
                await self.reply(option, REP_ACK)
            elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                await self.meta_context(option, data)
            elif option == OPT_STARTTLS:
                await self.error(option, REP_ERR_POLICY, "TLS is not supported; use a unix socket")
            else:
                await self.error(option, REP_ERR_UNSUP, f"option {option} is not supported")

    async def info(self, option: int, data: bytes) -> bool:
        try:
            (n,) = struct.unpack_from(">I", data, 0)
            name = data[4 : 4 + n]
            if len(name) != n:
                raise ValueError
            (count,) = struct.unpack_from(">H", data, 4 + n)
            if len(data) != 6 + n + 2 * count:
                raise ValueError
            requests = struct.unpack_from(f">{count}H", data, 6 + n)
        except (struct.error, ValueError):
            await self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return False
        if not self.server._matches(name):
            await self.error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        if option == OPT_GO and not self.server.read_only and self.server._writer_active:
            await self.error(
                option,
                REP_ERR_POLICY,
                "export is in use: a read-write export serves one client at a time",
            )
            return False
        device = self.server.device
        await self.reply(
            option,
            REP_INFO,
            struct.pack(">HQH", INFO_EXPORT, device.size, self.server.transmission_flags()),
        )
        if INFO_NAME in requests:
            await self.reply(
                option, REP_INFO, struct.pack(">H", INFO_NAME) + self.server.name.encode()
            )
        if INFO_DESCRIPTION in requests:
            await self.reply(
                option,
                REP_INFO,
                struct.pack(">H", INFO_DESCRIPTION) + self.server.description.encode(),
            )
        preferred = min(max(device.block_size, 4096), self.server.limits.max_request)
        await self.reply(
            option,
            REP_INFO,
            struct.pack(">HIII", INFO_BLOCK_SIZE, 1, preferred, self.server.limits.max_request),
        )
        await self.reply(option, REP_ACK)
        return True

    async def meta_context(self, option: int, data: bytes) -> None:
        try:
            (n,) = struct.unpack_from(">I", data, 0)
            name = data[4 : 4 + n]
            if len(name) != n:
                raise ValueError
            (count,) = struct.unpack_from(">I", data, 4 + n)
            pos = 8 + n
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                q = data[pos + 4 : pos + 4 + qlen]
                if len(q) != qlen:
                    raise ValueError
                queries.append(q)
                pos += 4 + qlen
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError):
            await self.error(option, REP_ERR_INVALID, "malformed meta context request")
            return
        if option == OPT_SET_META_CONTEXT and not self.structured:
            await self.error(option, REP_ERR_INVALID, "negotiate structured replies first")
            return
        if not self.server._matches(name):
            await self.error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if option == OPT_LIST_META_CONTEXT:
            match = not queries or any(q in (b"base:", BASE_ALLOCATION) for q in queries)
        else:
            match = BASE_ALLOCATION in queries
            self.meta_selected = match
        if match:
            await self.reply(
                option, REP_META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION
            )
        await self.reply(option, REP_ACK)

    # ------------------------------------------------------------- transmission

    async def transmission(self) -> None:
        """Receive requests and run each in its own task; a protocol violation ends the
        connection after the requests already in flight are answered."""
        dropped: _Disconnect | None = None
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as self._receiving:
                try:
                    await self._receive_requests(nursery)
                except _Disconnect as e:
                    dropped = e
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    dropped = _Disconnect(f"connection lost: {e}")
            if self._receiving.cancelled_caught:
                dropped = _Disconnect("client gone: its replies cannot be sent")
        if dropped is not None:
            raise dropped

    async def _receive_requests(self, nursery: trio.Nursery) -> None:
        """Read requests while this connection's and the server's byte budgets allow: a
        client that does not consume its replies stops being read."""
        limits = self.server.limits
        while True:
            header = await self.reader.exactly(_REQUEST.size)
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack(header)
            if magic != REQUEST_MAGIC:
                raise _Disconnect(f"bad request magic {magic:#x}")
            self.server.stats.requests += 1
            if cmd == CMD_DISC:
                return  # the nursery waits for requests in flight
            if cmd == CMD_WRITE and length > limits.max_request:
                # The payload cannot be skipped safely: drop the connection.
                raise _Disconnect(f"write of {length} bytes exceeds the maximum")
            if cmd <= CMD_WRITE and length <= limits.max_request:
                cost = length  # a read's reply data, a write's payload
            else:
                cost = self._reply_cost(cmd, length)
            try:  # requests already read are all started before this task yields
                self.in_flight.acquire_nowait()
            except trio.WouldBlock:
                await self.in_flight.acquire()
            if not self.budget.try_acquire(cost):
                await self.budget.acquire(cost)
            try:
                payload = await self.reader.exactly(length) if cmd == CMD_WRITE else b""
            except BaseException:
                self._release(cost)
                raise
            nursery.start_soon(self.run_request, flags, cmd, handle, offset, length, payload, cost)

    def _reply_cost(self, cmd: int, length: int) -> int:
        """The bytes other requests hold until their replies are sent: a block status
        reply's runs (at most one per block), nothing for the rest."""
        if cmd != CMD_BLOCK_STATUS:
            return 0
        block = max(self.server.device.block_size, 1)
        runs = min(length // block + 2, MAX_EXTENT_RUNS)
        return min(4 + _EXTENT_RUN * runs, self.server.limits.connection_bytes)

    def _release(self, cost: int) -> None:
        self.in_flight.release()
        self.budget.release(cost)

    async def run_request(
        self,
        flags: int,
        cmd: int,
        handle: int,
        offset: int,
        length: int,
        payload: bytes,
        cost: int,
    ) -> None:
        try:
            reply = await self.answer(flags, cmd, handle, offset, length, payload)
            del payload
            await self.send(*reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            # Counted, and logged once for the connection: a client that vanished with
            # many requests in flight must not cost a log line each.
            self.undelivered += 1
            self.send_failure = self.send_failure or str(e.__cause__ or e)
        finally:
            self.in_flight.release()
            self.budget.release(cost)

    async def answer(
        self, flags: int, cmd: int, handle: int, offset: int, length: int, payload: bytes
    ) -> tuple[bytes, ...]:
        """Carry out one request; the reply's parts (the device's failures become NBD
        errors here, never failures to send)."""
        err, message = self.validate(flags, cmd, offset, length)
        if err:
            return self.error_reply(handle, err, message)
        device = self.server.device
        try:
            if cmd == CMD_READ:
                return self.read_reply(handle, offset, await device.read(offset, length))
            if cmd == CMD_WRITE:
                await device.write(offset, payload, fua=bool(flags & CMD_FLAG_FUA))
            elif cmd == CMD_FLUSH:
                await device.flush()
            elif cmd == CMD_TRIM:
                await device.trim(offset, length)
                if flags & CMD_FLAG_FUA:
                    await device.flush()
            elif cmd == CMD_WRITE_ZEROES:
                await device.write_zeroes(offset, length, fua=bool(flags & CMD_FLAG_FUA))
            elif cmd == CMD_BLOCK_STATUS:
                return await self.block_status_reply(flags, handle, offset, length)
        except Exception as e:
            code = nbd_errno(e)
            if not isinstance(e, BlockStoreError):
                log.exception("unexpected error serving NBD command %d", cmd)
            else:
                log.warning("NBD command %d at %d+%d failed: %s", cmd, offset, length, e)
            self.server.stats.errors += 1
            return self.error_reply(handle, code, str(e))
        return (struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle),)

    def validate(self, flags: int, cmd: int, offset: int, length: int) -> tuple[int, str]:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return errno.EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return errno.EINVAL, f"flags {flags:#x} are not valid for command {cmd}"
        size = self.server.device.size
        if cmd == CMD_FLUSH:
            return (errno.EINVAL, "flush takes no range") if offset or length else (0, "")
        if self.server.read_only and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return errno.EPERM, "the export is read-only"
        if cmd == CMD_BLOCK_STATUS and not self.meta_selected:
            return errno.EINVAL, "no metadata context was negotiated"
        if offset + length > size:
            code = errno.ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else errno.EINVAL
            return code, f"range {offset}+{length} is beyond the end of the export ({size})"
        if cmd == CMD_READ and length > self.server.limits.max_request:
            return errno.EINVAL, f"read of {length} bytes exceeds the maximum"
        return 0, ""

    def read_reply(self, handle: int, offset: int, data: bytes) -> tuple[bytes, ...]:
        if not self.structured:
            return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle), data
        head = struct.pack(
            ">IHHQIQ",
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            handle,
            8 + len(data),
            offset,
        )
        return head, data

    async def block_status_reply(
        self, flags: int, handle: int, offset: int, length: int
    ) -> tuple[bytes, ...]:
        runs = await self.server.device.extents(offset, length) if length else []
        if flags & CMD_FLAG_REQ_ONE:
            runs = runs[:1]
        runs = runs[:MAX_EXTENT_RUNS]
        if not runs:
            return self.error_reply(handle, errno.EINVAL, "empty range")
        body = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", n, f) for n, f in runs
        )
        head = struct.pack(
            ">IHHQI",
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            len(body),
        )
        return head, body

    def error_reply(self, handle: int, code: int, message: str) -> tuple[bytes, ...]:
        if not self.structured:
            return (struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, code, handle),)
        msg = message.encode()[:4096]
        body = struct.pack(">IH", code, len(msg)) + msg
        head = struct.pack(
            ">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(body)
        )
        return head, body


def parse_address(spec: str) -> tuple[str, str | int]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (loopback only)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", os.path.abspath(rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            port_num = int(port)
        except ValueError:
            loopback, port_num = False, -1
        if not loopback or not 0 <= port_num < 65536:
            raise ValueError(
                f"NBD address {spec!r}: TCP is allowed on loopback only (tcp:127.0.0.1:PORT)"
            )
        return host, port_num
    raise ValueError(f"NBD address {spec!r}: use unix:PATH or tcp:127.0.0.1:PORT")


async def open_listener(spec: str) -> trio.SocketListener:
    """A listening socket; unix sockets are created mode 0600 before they accept anything."""
    try:
        return await _open_listener(spec)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {spec}: {exc.strerror or exc}") from None


async def _open_listener(spec: str) -> trio.SocketListener:
    host, where = parse_address(spec)
    if host == "unix":
        path = str(where)
        await _take_socket_path(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        return trio.SocketListener(sock)
    listeners = await trio.open_tcp_listeners(int(where), host=host)
    return listeners[0]


async def _take_socket_path(path: str) -> None:
    """Remove a socket file left by a server that is gone; refuse one a server answers on
    (taking it would cut that server's clients off from every new connection)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # bind fails with a clear "address in use"
    except FileNotFoundError:
        return
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(5):
                await probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except (OSError, trio.TooSlowError):
            pass  # a server, busy or not ours to judge: leave it
    raise OSError(
        errno.EADDRINUSE,
        "another server is listening there: stop it, or choose another socket path",
    )


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


async def serve_device(
    device: BlockDevice,
    address: str,
    *,
    name: str = "",
    limits: NBDLimits | None = None,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
    task_status: trio.TaskStatus[NBDServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; a unix socket file is removed on the way out, if it is
    still the one this server made."""
    listener = await open_listener(address)
    kind, where = parse_address(address)
    ours = _identity(str(where)) if kind == "unix" else None
    server = NBDServer(device, name=name, limits=limits)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            task_status.started(server)
            if on_ready is not None:
                result = on_ready(address)
                if result is not None:
                    await result
    finally:
        # Only the socket this server bound: another may have taken the path since.
        if ours is not None and _identity(str(where)) == ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(where))
