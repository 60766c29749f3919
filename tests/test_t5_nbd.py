"""The NBD server against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh),
malformed input, a fuzzer, and SIGTERM handling of `lanekit disk serve`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import blockstore
from blockstore import MemoryObjectStore, create_disk, open_disk
from blockstore.serve import nbd as P
from blockstore.serve import serve_device
from tests.nbdclient import RawClient

MiB = 1 << 20


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"{argv}: {proc.stdout}\n{proc.stderr}"
    return proc


@contextlib.contextmanager
def served(url: str, sock: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`lanekit disk serve` in a subprocess; SIGTERM at the end must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "disk", "serve", url, "--nbd", f"unix:{sock}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + (proc.stderr.read() if proc.stderr else "")
        yield proc
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "flushed and released" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@pytest.fixture
def disk_url(tmp_path: Path) -> str:
    url = f"file://{tmp_path}/store/vol"
    trio.run(lambda: blockstore.create(url, 64 * MiB))
    return url


def test_nbdinfo_and_qemu_img_info(disk_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with served(disk_url, sock):
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        info = json.loads(run("nbdinfo", "--json", uri(sock)).stdout)
        export = info["exports"][0]
        assert export["export-size"] == 64 * MiB
        assert "base:allocation" in export["contexts"]
        assert export["can_flush"] and export["can_fua"] and export["can_trim"]
        assert export["can_zero"] and not export["is_read_only"]
        listed = run("nbdinfo", "--list", "--json", uri(sock)).stdout
        assert json.loads(listed)["exports"][0]["export-name"] == "vol"
        qinfo = json.loads(run("qemu-img", "info", "--output=json", uri(sock)).stdout)
        assert qinfo["virtual-size"] == 64 * MiB
    assert not sock.exists()


def test_qemu_io_patterns_map_and_durability(disk_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with served(disk_url, sock):
        run(
            "qemu-io", "-f", "raw",
            "-c", "write -P 0xab 0 3M",
            "-c", "write -P 0xcd -f 5M 1M",
            "-c", "write -z 1M 1M",
            "-c", "discard 2M 512K",
            "-c", "aio_write -P 0x11 10M 64K",
            "-c", "aio_write -P 0x22 11M 64K",
            "-c", "aio_flush",
            "-c", "read -P 0xab 0 1M",
            "-c", "read -P 0 1M 1M",
            "-c", "read -P 0 2M 512K",
            "-c", "read -P 0xab 2621440 512K",
            "-c", "read -P 0xcd 5M 1M",
            "-c", "flush",
            uri(sock),
        )  # fmt: skip
        mapping = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri(sock)).stdout)
        data = [(m["start"], m["length"]) for m in mapping if m["data"]]
        assert data[0] == (0, MiB)
        zero_bytes = sum(m["length"] for m in mapping if m["zero"])
        assert zero_bytes >= 64 * MiB - 6 * MiB
        nbdmap = run("nbdinfo", "--map", uri(sock)).stdout
        assert "hole,zero" in nbdmap
    # After SIGTERM (flush + release), the data is durable and the lease free.
    with served(disk_url, sock, "--read-only"):
        run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x22 11M 64K", "-c",
            "read -P 0xab 0 1M", uri(sock))  # fmt: skip
        proc = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock), check=False)
        assert proc.returncode != 0 or "failed" in proc.stdout + proc.stderr


def test_qemu_img_convert_compare_and_nbdcopy(disk_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(5)
    with open(src, "wb") as f:
        for i in range(64):
            f.write(rng.randbytes(MiB) if i % 3 else bytes(MiB))
    sock = tmp_path / "nbd.sock"
    with served(disk_url, sock):
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(sock))
        out = tmp_path / "out.raw"
        run("nbdcopy", uri(sock), str(out))
        assert out.read_bytes() == src.read_bytes()
        back = tmp_path / "back.raw"
        back.write_bytes(os.urandom(64 * MiB))
        run("nbdcopy", str(back), uri(sock))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(back), uri(sock))


def test_nbdsh_script(disk_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    script = f"""
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri({uri(sock)!r})
assert h.get_size() == {64 * MiB}
h.pwrite(b"x" * 8192, 4096, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(8192, 4096) == b"x" * 8192
h.zero(4096, 4096)
assert h.pread(4096, 4096) == bytes(4096)
h.trim(65536, 65536)
seen = []
def cb(metacontext, offset, entries, err):
    seen.extend(entries)
h.block_status({4 * MiB}, 0, cb)
assert seen[0] == 65536 and seen[1] == 0, seen
assert seen[3] == 3, seen
h.shutdown()
print("nbdsh ok")
"""
    with served(disk_url, sock):
        # nbdsh runs on the system python3, where python3-libnbd lives.
        proc = subprocess.run(
            ["nbdsh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PATH="/usr/bin:/bin"),
        )
        assert proc.returncode == 0, proc.stderr
        assert "nbdsh ok" in proc.stdout


def test_second_client_on_read_write_export_is_refused(disk_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with served(disk_url, sock):
        first = RawClient(str(sock))
        first.go()
        second = RawClient(str(sock))
        second.greeting()
        replies = second.option(P.OPT_GO, struct.pack(">IH", 0, 0))
        assert replies[-1][0] == P.REP_ERR_POLICY
        assert b"in use" in replies[-1][1]
        # The first client is unaffected.
        first.request(P.CMD_WRITE, 0, 4, b"abcd", handle=7)
        assert first.reply() == (7, 0, b"")
        first.request(P.CMD_DISC, 0, 0)
        first.close()
        second.close()
        # After the first left, a new client gets in.
        third = RawClient(str(sock))
        third.go()
        third.request(P.CMD_READ, 0, 4, handle=9)
        assert third.reply() == (9, 0, b"abcd")
        third.close()


# ---------------------------------------------------------------- in-process server


async def _with_server(fn: object, tmp_path: Path, size: int = 4 * MiB) -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", size, block_size=4096)
    sock = str(tmp_path / "s.sock")
    async with open_disk((objects, "d")) as disk, trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_device(disk, f"unix:{sock}", task_status=task_status)
        )
        await fn(sock, disk, server)  # type: ignore[operator]
        nursery.cancel_scope.cancel()


def _client_call(sock: str, steps: object) -> object:
    return steps(sock)  # type: ignore[operator]


async def test_malformed_input_is_answered_or_dropped(tmp_path: Path) -> None:
    async def scenario(sock: str, disk: blockstore.Disk, server: P.NBDServer) -> None:
        def steps(sock: str) -> None:
            # Wrong client flags: dropped.
            c = RawClient(sock)
            c.recv(18)
            c.sock.sendall(struct.pack(">I", 0xFF))
            with pytest.raises(ConnectionError):
                c.recv(1)
            # Wrong option magic: dropped.
            c = RawClient(sock)
            c.greeting()
            c.sock.sendall(struct.pack(">QII", 0xDEADBEEF, 1, 0))
            with pytest.raises(ConnectionError):
                c.recv(1)
            # Unknown option, malformed GO, unknown export, meta before structured.
            c = RawClient(sock)
            c.greeting()
            assert c.option(99)[-1][0] == P.REP_ERR_UNSUP
            assert c.option(P.OPT_GO, b"\0\0")[-1][0] == P.REP_ERR_INVALID
            name = b"nope"
            go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            assert c.option(P.OPT_GO, go)[-1][0] == P.REP_ERR_UNKNOWN
            q = P.BASE_ALLOCATION
            meta = struct.pack(">III", 0, 1, len(q)) + q
            assert c.option(P.OPT_SET_META_CONTEXT, meta)[-1][0] == P.REP_ERR_INVALID
            assert c.option(P.OPT_STRUCTURED_REPLY, b"x")[-1][0] == P.REP_ERR_INVALID
            assert c.option(P.OPT_LIST_META_CONTEXT, meta[:-3])[-1][0] == P.REP_ERR_INVALID
            c.close()
            # Transmission: errors per request, connection survives.
            c = RawClient(sock)
            size = c.go()
            cases = [
                (P.CMD_READ, size, 1, 0, errno.EINVAL),
                (P.CMD_READ, 2**64 - 1, 2, 0, errno.EINVAL),
                (P.CMD_READ, 0, 64 * MiB, 0, errno.EINVAL),
                (P.CMD_TRIM, size - 1, 2, 0, errno.EINVAL),
                (P.CMD_WRITE_ZEROES, size, 1, 0, errno.ENOSPC),
                (42, 0, 0, 0, errno.EINVAL),
                (P.CMD_READ, 0, 1, 1 << 9, errno.EINVAL),
                (P.CMD_FLUSH, 5, 0, 0, errno.EINVAL),
            ]
            for i, (cmd, off, length, flags, expected) in enumerate(cases):
                c.request(cmd, off, length, flags=flags, handle=100 + i)
                handle, err, _ = c.reply()
                assert (handle, err) == (100 + i, expected), (cmd, off, length)
            c.request(P.CMD_WRITE, size - 2, 4, b"wxyz", handle=5)
            assert c.reply()[:2] == (5, errno.ENOSPC)
            c.request(P.CMD_READ, 0, 4, handle=6)
            assert c.reply() == (6, 0, bytes(4))
            # A write bigger than the maximum cannot be skipped: the connection is dropped.
            c.request(P.CMD_WRITE, 0, 64 * MiB, handle=8)
            with pytest.raises(ConnectionError):
                c.reply()
            # Truncated request header / disconnect mid-write.
            c = RawClient(sock)
            c.go()
            c.sock.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4096))
            c.sock.sendall(b"partial")
            c.close()
            c = RawClient(sock)
            c.go()
            c.sock.sendall(b"\x25\x60")
            c.close()
            # Other clients are unaffected; nothing was written by broken requests.
            c = RawClient(sock)
            c.go()
            c.request(P.CMD_READ, 0, 4096, handle=1)
            assert c.reply() == (1, 0, bytes(4096))
            c.close()

        await trio.to_thread.run_sync(_client_call, sock, steps)
        assert server.stats.dropped >= 4

    await _with_server(scenario, tmp_path)


async def test_fuzz_random_and_malformed_requests_keep_the_disk_exact(tmp_path: Path) -> None:
    size = 2 * MiB

    async def scenario(sock: str, disk: blockstore.Disk, server: P.NBDServer) -> None:
        model = bytearray(size)

        def fuzz(sock: str) -> None:
            rng = random.Random(1234)
            c = RawClient(sock)
            c.go()
            for i in range(3000):
                kind = rng.random()
                handle = i
                if kind < 0.35:
                    off = rng.randrange(size)
                    n = rng.randrange(1, min(20000, size - off) + 1)
                    data = rng.randbytes(n)
                    c.request(
                        P.CMD_WRITE,
                        off,
                        n,
                        data,
                        handle=handle,
                        flags=rng.choice([0, 0, P.CMD_FLAG_FUA]),
                    )
                    h, err, _ = c.reply()
                    assert (h, err) == (handle, 0)
                    model[off : off + n] = data
                elif kind < 0.6:
                    off = rng.randrange(size)
                    n = rng.randrange(0, min(30000, size - off) + 1)
                    c.request(P.CMD_READ, off, n, handle=handle)
                    h, err, payload = c.reply()
                    assert (h, err) == (handle, 0) and payload == model[off : off + n]
                elif kind < 0.7:
                    off = rng.randrange(size)
                    n = rng.randrange(1, min(50000, size - off) + 1)
                    cmd = rng.choice([P.CMD_TRIM, P.CMD_WRITE_ZEROES])
                    c.request(cmd, off, n, handle=handle)
                    assert c.reply()[:2] == (handle, 0)
                    model[off : off + n] = bytes(n)
                elif kind < 0.75:
                    c.request(P.CMD_FLUSH, 0, 0, handle=handle)
                    assert c.reply()[:2] == (handle, 0)
                elif kind < 0.8:
                    c.request(
                        P.CMD_BLOCK_STATUS,
                        rng.randrange(size),
                        1,
                        handle=handle,
                        flags=rng.choice([0, P.CMD_FLAG_REQ_ONE]),
                    )
                    assert c.reply()[:2] == (handle, 0)
                else:
                    # Malformed but framed: bad command, bad flags, out of range, overflow.
                    cmd = rng.choice([P.CMD_READ, P.CMD_TRIM, 9, 77, P.CMD_BLOCK_STATUS])
                    off = rng.choice(
                        [size, size + rng.randrange(1 << 40), 2**64 - rng.randrange(1, 100)]
                    )
                    flags = rng.choice([0, 1 << 15, 0xFFFF])
                    c.request(cmd, off, rng.randrange(1, 1 << 16), handle=handle, flags=flags)
                    h, err, _ = c.reply()
                    assert h == handle and err in (errno.EINVAL, errno.ENOSPC)
            c.request(P.CMD_DISC, 0, 0)
            c.close()
            # Unframed garbage on new connections never crashes the server.
            for _ in range(50):
                g = RawClient(sock)
                g.greeting()
                with contextlib.suppress(ConnectionError, OSError):
                    g.sock.sendall(rng.randbytes(rng.randrange(1, 200)))
                g.close()

        await trio.to_thread.run_sync(_client_call, sock, fuzz)
        assert await disk.read(0, size) == model
        await disk.flush()

    await _with_server(scenario, tmp_path, size)


async def test_out_of_order_replies_under_concurrency(tmp_path: Path) -> None:
    async def scenario(sock: str, disk: blockstore.Disk, server: P.NBDServer) -> None:
        def pipelined(sock: str) -> None:
            c = RawClient(sock)
            c.go()
            blobs = {h: os.urandom(65536) for h in range(64)}
            for h, data in blobs.items():
                c.request(P.CMD_WRITE, h * 65536, 65536, data, handle=h)
            assert sorted(c.reply()[0] for _ in blobs) == sorted(blobs)
            c.request(P.CMD_FLUSH, 0, 0, handle=999)
            assert c.reply()[:2] == (999, 0)
            for h in blobs:
                c.request(P.CMD_READ, h * 65536, 65536, handle=h)
            got = {}
            for _ in blobs:
                h, _err, payload = c.reply()
                got[h] = payload
            assert got == blobs
            c.close()

        await trio.to_thread.run_sync(_client_call, sock, pipelined)

    await _with_server(scenario, tmp_path)
