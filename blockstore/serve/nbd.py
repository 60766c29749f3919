"""An NBD server (fixed newstyle handshake, structured replies, base:allocation).

Protocol only: it serves any :class:`BlockDevice` (nbdkit's plugin surface: read, write,
write_zeroes, trim, flush, extents), and maps storage errors to NBD errors here, once.
Requests are processed concurrently and answered out of order; FLUSH and FUA are answered
only after the device's durable flush. The spec is ``doc/proto.md`` of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import BlockStoreError, OutOfRange, ReadOnly

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
                raise _Disconnect("client closed the connection mid-message")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class ServerStats:
    connections: int = 0
    requests: int = 0
    errors: int = 0
    dropped: int = 0


class NBDServer:
    """Serve one device under one export name to any number of connections."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        name: str = "",
        description: str = "lanekit disk",
        max_request: int = 32 << 20,
        max_in_flight: int = 64,
    ) -> None:
        self.device = device
        self.name = name
        self.description = description
        self.max_request = max_request
        self.max_in_flight = max_in_flight
        self.read_only = device.read_only
        self._writer_active = False
        self.stats = ServerStats()

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
        claimed = False
        try:
            async with stream:
                conn = _Connection(self, stream)
                try:
                    await conn.handshake()
                    if not self.read_only:
                        if self._writer_active:
                            raise _Disconnect("second client on a read-write export")
                        self._writer_active = claimed = True
                    await conn.transmission()
                except _Disconnect as e:
                    self.stats.dropped += 1
                    log.info("NBD connection dropped: %s", e)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    log.info("NBD connection lost: %s", e)
        finally:
            if claimed:
                self._writer_active = False


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
        self.in_flight = trio.Semaphore(server.max_in_flight)

    async def send(self, *parts: bytes) -> None:
        """Send one message whole. Replies that become ready while a send is under way
        go out together in the next one: one system call for many small replies."""
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
        preferred = min(max(device.block_size, 4096), self.server.max_request)
        await self.reply(
            option,
            REP_INFO,
            struct.pack(">HIII", INFO_BLOCK_SIZE, 1, preferred, self.server.max_request),
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
            try:
                await self._receive_requests(nursery)
            except _Disconnect as e:
                dropped = e
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                dropped = _Disconnect(f"connection lost: {e}")
        if dropped is not None:
            raise dropped

    async def _receive_requests(self, nursery: trio.Nursery) -> None:
        while True:
            header = await self.reader.exactly(_REQUEST.size)
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack(header)
            if magic != REQUEST_MAGIC:
                raise _Disconnect(f"bad request magic {magic:#x}")
            self.server.stats.requests += 1
            payload = b""
            if cmd == CMD_WRITE:
                if length > self.server.max_request:
                    # The payload cannot be skipped safely: drop the connection.
                    raise _Disconnect(f"write of {length} bytes exceeds the maximum")
                payload = await self.reader.exactly(length)
            if cmd == CMD_DISC:
                return  # the nursery waits for requests in flight
            await self.in_flight.acquire()
            nursery.start_soon(self.run_request, flags, cmd, handle, offset, length, payload)

    async def run_request(
        self, flags: int, cmd: int, handle: int, offset: int, length: int, payload: bytes
    ) -> None:
        try:
            err, message = self.validate(flags, cmd, offset, length)
            if err:
                await self.send_error(cmd, handle, err, message)
                return
            device = self.server.device
            try:
                if cmd == CMD_READ:
                    data = await device.read(offset, length)
                    await self.send_read(handle, offset, data)
                    return
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
                    await self.send_block_status(flags, handle, offset, length)
                    return
            except Exception as e:
                code = nbd_errno(e)
                if not isinstance(e, BlockStoreError):
                    log.exception("unexpected error serving NBD command %d", cmd)
                else:
                    log.warning("NBD command %d at %d+%d failed: %s", cmd, offset, length, e)
                self.server.stats.errors += 1
                await self.send_error(cmd, handle, code, str(e))
                return
            await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.in_flight.release()

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
        if cmd == CMD_READ and length > self.server.max_request:
            return errno.EINVAL, f"read of {length} bytes exceeds the maximum"
        return 0, ""

    async def send_read(self, handle: int, offset: int, data: bytes) -> None:
        if not self.structured:
            await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle), data)
            return
        head = struct.pack(
            ">IHHQIQ",
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            handle,
            8 + len(data),
            offset,
        )
        await self.send(head, data)

    async def send_block_status(self, flags: int, handle: int, offset: int, length: int) -> None:
        runs = await self.server.device.extents(offset, length) if length else [(0, 0)]
        if not length:
            runs = []
        if flags & CMD_FLAG_REQ_ONE:
            runs = runs[:1]
        runs = runs[: 1 << 20]
        if not runs:
            await self.send_error(CMD_BLOCK_STATUS, handle, errno.EINVAL, "empty range")
            return
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
        await self.send(head, body)

    async def send_error(self, cmd: int, handle: int, code: int, message: str) -> None:
        if not self.structured:
            await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, code, handle))
            return
        msg = message.encode()[:4096]
        body = struct.pack(">IH", code, len(msg)) + msg
        head = struct.pack(
            ">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(body)
        )
        await self.send(head, body)


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
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        return trio.SocketListener(sock)
    listeners = await trio.open_tcp_listeners(int(where), host=host)
    return listeners[0]


async def serve_device(
    device: BlockDevice,
    address: str,
    *,
    name: str = "",
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
    task_status: trio.TaskStatus[NBDServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; unix socket files are removed on the way out."""
    listener = await open_listener(address)
    server = NBDServer(device, name=name)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            task_status.started(server)
            if on_ready is not None:
                result = on_ready(address)
                if result is not None:
                    await result
    finally:
        kind, where = parse_address(address)
        if kind == "unix":
            try:
                os.unlink(str(where))
            except FileNotFoundError:
                pass
