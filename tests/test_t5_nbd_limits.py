"""The NBD server under hostile or stalled clients: bounded bytes in flight (the server's RSS
stays bounded while clients stop reading replies, others are served), one log line for a
client that vanished with requests in flight, a handshake timeout and a connection cap."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import blockstore
from blockstore import MemoryObjectStore, create_disk, open_disk
from blockstore.serve import NBDLimits, NBDServer, open_listener, serve_device
from blockstore.serve import nbd as P
from blockstore.serve.limits import ByteBudget
from tests.nbdclient import RawClient, serve_disk

MiB = 1 << 20
LOGGER = "blockstore.serve.nbd"


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(field)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def settle(pid: int) -> None:
    """Wait until the server has done all it can (no CPU used for a while): whatever a
    stalled client's requests could pin, they have pinned by then."""
    deadline = time.monotonic() + 60
    last = cpu_ticks(pid)
    quiet = 0
    while quiet < 3:
        assert time.monotonic() < deadline, "the server never went idle"
        time.sleep(0.2)
        now = cpu_ticks(pid)
        quiet = quiet + 1 if now == last else 0
        last = now


def read_checked(c: RawClient, expected: bytes, piece: int = MiB, depth: int = 8) -> None:
    """Read ``expected`` from offset 0 in pieces, ``depth`` requests in flight."""
    pieces = len(expected) // piece
    got: dict[int, bytes] = {}
    sent = 0
    while len(got) < pieces:
        while sent < pieces and sent - len(got) < depth:
            c.request(P.CMD_READ, sent * piece, piece, handle=sent)
            sent += 1
        handle, err, data = c.reply()
        assert err == 0
        got[handle] = data
    assert b"".join(got[i] for i in range(pieces)) == expected


@pytest.fixture
def pattern_disk(tmp_path: Path) -> tuple[str, bytes]:
    """A 64 MiB file:// disk whose first 16 MiB hold random data."""
    url = f"file://{tmp_path}/store/vol"
    data = os.urandom(16 * MiB)

    async def make() -> None:
        await blockstore.create(url, 64 * MiB)
        async with blockstore.open_disk(url) as disk:
            await disk.write(0, data)
            await disk.flush()

    trio.run(make)
    return url, data


# ------------------------------------------------------- `lanekit disk serve` subprocess


@pytest.mark.slow
@pytest.mark.parametrize("stalled", [1, 2])
def test_stalled_clients_pin_one_budget_each_and_others_are_served(
    pattern_disk: tuple[str, bytes], tmp_path: Path, stalled: int
) -> None:
    """Clients that send 100 reads of 32 MiB (the maximum) and never read a reply pin at
    most 32 MiB each (the connection budget), plus 24 MiB in all for the 16 MiB cache and
    allocator slack (measured: 42 MiB for one, 74 for two); with another client served
    meanwhile, the peak stays under 32 MiB per stalled client + 48 MiB (measured: 55, 87).
    Before the budget the peak grew 2,071 MiB with one stalled client, 4,128 with two."""
    url, data = pattern_disk
    sock = tmp_path / "nbd.sock"
    with serve_disk(url, sock, tmp_path / "serve.log", "--read-only", "--cache", "16M") as proc:
        warm = RawClient(str(sock))
        warm.go()
        read_checked(warm, data[: 4 * MiB])
        warm.close()
        settle(proc.pid)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        baseline = proc_status(proc.pid, "VmRSS")

        hogs = []
        for _ in range(stalled):
            hog = RawClient(str(sock))
            hog.go()
            hog.pipeline((P.CMD_READ, 0, 32 * MiB, h) for h in range(100))
            hogs.append(hog)
        settle(proc.pid)
        pinned = proc_status(proc.pid, "VmHWM") - baseline
        bound = stalled * 32 * MiB + 24 * MiB
        assert pinned <= bound, (
            f"stalled clients pinned {pinned / MiB:.0f} MiB, bound {bound / MiB:.0f}"
        )
        # Served meanwhile, correctly, with its own requests pipelined.
        other = RawClient(str(sock))
        other.go()
        read_checked(other, data)
        other.request(P.CMD_BLOCK_STATUS, 0, 64 * MiB, handle=7)
        assert other.reply()[:2] == (7, 0)
        other.request(P.CMD_DISC, 0, 0)
        other.close()
        settle(proc.pid)

        grown = proc_status(proc.pid, "VmHWM") - baseline
        bound = stalled * 32 * MiB + 48 * MiB
        assert grown <= bound, f"peak RSS grew {grown / MiB:.0f} MiB, bound {bound / MiB:.0f}"
        # A stalled client that starts reading again gets its replies, in full.
        handle, err, payload = hogs[0].reply()
        assert (handle, err) == (0, 0) and payload[: len(data)] == data
        for hog in hogs:
            hog.close()


def test_client_gone_with_reads_in_flight_logs_one_line(
    pattern_disk: tuple[str, bytes], tmp_path: Path
) -> None:
    """100 reads sent, then the client disconnects: one log line for the connection (it
    was a traceback per request, 300-455 KB of log)."""
    url, data = pattern_disk
    sock, log = tmp_path / "nbd.sock", tmp_path / "serve.log"
    with serve_disk(url, sock, log, "--read-only") as proc:
        before = log.read_text()
        c = RawClient(str(sock))
        c.go()
        c.pipeline((P.CMD_READ, (h % 16) * MiB, MiB, h) for h in range(100))
        c.close()
        deadline = time.monotonic() + 30
        while not any(word in log.read_text() for word in ("undelivered", "Traceback")):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        settle(proc.pid)
        added = log.read_text()[len(before) :].splitlines()
        assert len(added) == 1, added[:5]
        assert re.fullmatch(
            r"lanekit: WARNING: NBD connection \d+: client gone with \d+ replies undelivered "
            r"\(.*(Broken pipe|Connection reset).*\)",
            added[0],
        ), added[0]
        # The server goes on serving.
        c = RawClient(str(sock))
        c.go()
        read_checked(c, data[: 2 * MiB])
        c.close()


# ------------------------------------------------------------------ in-process server


@contextlib.asynccontextmanager
async def limited_server(
    tmp_path: Path, limits: NBDLimits, data: bytes = b""
) -> AsyncIterator[tuple[str, NBDServer]]:
    """A read-only export of a 4 MiB disk starting with ``data``, served with ``limits``."""
    objects = MemoryObjectStore()
    create_disk(objects, "d", 4 * MiB, block_size=4096)
    if data:
        async with open_disk((objects, "d")) as disk:
            await disk.write(0, data)
    sock = str(tmp_path / "s.sock")
    async with open_disk((objects, "d"), writable=False) as disk, trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_device(
                disk, f"unix:{sock}", limits=limits, task_status=task_status
            )
        )
        yield sock, server
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(30):
        while not condition():
            await trio.sleep(0.01)


def connected(sock: str) -> RawClient:
    c = RawClient(sock)
    c.go()
    return c


async def test_handshake_timeout_drops_silent_clients_not_idle_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with limited_server(tmp_path, NBDLimits(handshake_timeout=0.5)) as (sock, server):
        idle = await trio.to_thread.run_sync(connected, sock)

        def silent_clients() -> None:
            mute = RawClient(sock)  # reads the greeting, sends nothing
            mute.recv(18)
            halfway = RawClient(sock)  # stops in the middle of an option
            halfway.greeting()
            halfway.sock.sendall(struct.pack(">QI", P.IHAVEOPT, P.OPT_GO))
            for c in (mute, halfway):
                with pytest.raises(ConnectionError):
                    c.recv(1)
                c.close()

        await trio.to_thread.run_sync(silent_clients)
        assert server.stats.dropped == 2
        dropped = [r.getMessage() for r in caplog.records if "no handshake" in r.getMessage()]
        assert len(dropped) == 2 and "no handshake within 0.5 s" in dropped[0]
        # No timeout once transmission starts: the idle client still works.
        await trio.sleep(1.5)

        def still_served() -> None:
            idle.request(P.CMD_READ, 0, 4096, handle=3)
            assert idle.reply() == (3, 0, bytes(4096))
            idle.close()

        await trio.to_thread.run_sync(still_served)


async def test_connections_past_the_cap_are_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = os.urandom(64 << 10)
    async with limited_server(tmp_path, NBDLimits(max_connections=3), data) as (sock, server):
        first = await trio.to_thread.run_sync(connected, sock)
        second = await trio.to_thread.run_sync(connected, sock)
        in_handshake = RawClient(sock)
        await until(lambda: server.open_connections == 3)

        def refused_twice() -> None:
            for _ in range(2):
                c = RawClient(sock)
                with pytest.raises((ConnectionError, OSError)):
                    c.recv(18)
                c.close()
            for c in (first, second):  # existing connections keep working
                read_checked(c, data, piece=4096)

        await trio.to_thread.run_sync(refused_twice)
        assert server.stats.refused == 2
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
        assert refusals[0].getMessage() == (
            "NBD connection refused: 3 connections are open, the most allowed (max_connections=3)"
        )
        in_handshake.close()
        await until(lambda: server.open_connections == 2)
        assert caplog.records[-1].getMessage() == "NBD refused 1 more connections at the cap"

        def admitted_again() -> None:
            third = connected(sock)
            read_checked(third, data, piece=4096)
            for c in (first, second, third):
                c.close()

        await trio.to_thread.run_sync(admitted_again)


async def test_server_budget_bounds_all_connections_together(tmp_path: Path) -> None:
    """Three clients that stop reading, each allowed 2 MiB, the server 4 MiB in all: the
    server holds 4 MiB, never more; a client that leaves frees its share."""
    limits = NBDLimits(max_request=MiB, connection_bytes=2 * MiB, server_bytes=4 * MiB)
    data = os.urandom(MiB)
    async with limited_server(tmp_path, limits, data) as (sock, server):

        def stalled() -> RawClient:
            c = connected(sock)
            c.pipeline((P.CMD_READ, 0, MiB, h) for h in range(50))
            return c

        hogs = [await trio.to_thread.run_sync(stalled) for _ in range(3)]
        await until(lambda: server.budget.used == 4 * MiB)
        await trio.sleep(0.3)  # time to overshoot, were anything not counted
        assert server.budget.used == server.budget.peak == 4 * MiB
        hogs[0].close()
        # Its connection ends although the server's budget is held by the others.
        await until(lambda: server.open_connections == 2 and server.budget.used == 4 * MiB)
        for hog in hogs[1:]:
            hog.close()
        await until(lambda: server.open_connections == 0)
        assert server.budget.used == 0 and server.budget.peak == 4 * MiB
        assert server.stats.undelivered > 0

        def served() -> None:
            c = connected(sock)
            read_checked(c, data, piece=256 << 10)
            c.close()

        await trio.to_thread.run_sync(served)


async def test_tcp_connections_get_keepalive(tmp_path: Path) -> None:
    """Half-open TCP sessions (a peer that vanished) are found by keepalive probes."""
    objects = MemoryObjectStore()
    create_disk(objects, "d", MiB, block_size=4096)
    async with open_disk((objects, "d"), writable=False) as disk, trio.open_nursery() as nursery:
        listener = await open_listener("tcp:127.0.0.1:0")
        port = listener.socket.getsockname()[1]
        await nursery.start(NBDServer(disk).serve, [listener])

        def greeted() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            assert len(s.recv(18)) > 0
            return s

        client = await trio.to_thread.run_sync(greeted)
        ss = await trio.run_process(
            ["ss", "-tnoH", "state", "established", f"sport = :{port}"], capture_stdout=True
        )
        assert "keepalive" in ss.stdout.decode(), ss.stdout
        client.close()
        nursery.cancel_scope.cancel()


def test_limits_must_admit_one_request() -> None:
    with pytest.raises(ValueError, match="must admit one request"):
        NBDLimits(connection_bytes=MiB)
    with pytest.raises(ValueError, match="server_bytes"):
        NBDLimits(server_bytes=16 * MiB)
    with pytest.raises(ValueError, match="handshake_timeout"):
        NBDLimits(handshake_timeout=0)
    assert NBDLimits(handshake_timeout=None).handshake_timeout is None


async def test_byte_budget_is_first_come_first_served_and_cancel_safe() -> None:
    server = ByteBudget(10)
    conn_a, conn_b = ByteBudget(8, parent=server), ByteBudget(8, parent=server)
    assert conn_a.try_acquire(8) and not conn_b.try_acquire(4)
    order: list[str] = []

    async def take(budget: ByteBudget, n: int, name: str) -> None:
        await budget.acquire(n)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, conn_b, 4, "b4")  # waits in the server budget
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, server, 1, "s1")  # fits now, but b4 came first
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and (server.used, conn_b.used) == (8, 4)  # s1 waits behind b4
        conn_a.release(8)
    assert sorted(order) == ["b4", "s1"] and server.used == 5 and server.peak == 8
    # Cancelled while waiting for the server's share: nothing stays taken.
    with trio.move_on_after(0.05):
        await conn_a.acquire(6)
    assert (conn_a.used, server.used) == (0, 5)
    with pytest.raises(ValueError):
        await conn_a.acquire(9)
