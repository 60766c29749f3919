"""Host code edits a mounted MemoryFS by path; the mount shows it at once (the kernel's
caches are invalidated), and a write past the byte limit fails on that write(2)."""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import vfs

from .blockdev import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def members() -> dict[str, vfs.MemoryFS]:
    return {
        "mem": vfs.MemoryFS(),
        "small": vfs.MemoryFS(max_bytes=1 << 20),
        "inner": vfs.MemoryFS({"seen.txt": "v1"}),
    }


@pytest.fixture(scope="module")
def mnt(members: dict[str, vfs.MemoryFS]) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="lanekit-vfs-host-", dir="/tmp"))
    hub = vfs.Hub({"mem": members["mem"], "small": members["small"],
                   "ro": vfs.ReadOnlyFS(members["inner"])})  # fmt: skip
    try:
        with vfs.mount_blocking(hub, where) as path:
            yield path
        wait_for(lambda: str(where) not in Path("/proc/mounts").read_text(), timeout=10)
    finally:
        os.rmdir(where)


@pytest.fixture(scope="module")
def host(members: dict[str, vfs.MemoryFS]) -> vfs.BlockingPaths:
    return members["mem"].paths_blocking


def test_rewrite_longer_then_shorter_is_seen_by_an_open_file_and_a_new_open(
    mnt: Path, host: vfs.BlockingPaths
) -> None:
    host.write_file("doc.txt", b"short\n")
    path = mnt / "mem" / "doc.txt"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 1 << 20, 0) == b"short\n"  # now in the kernel's caches
        assert os.fstat(fd).st_size == 6
        longer = os.urandom(300_000)
        host.write_file("doc.txt", longer)
        assert os.fstat(fd).st_size == len(longer)
        assert os.pread(fd, 1 << 20, 0) == longer  # the same open file
        assert path.read_bytes() == longer and path.stat().st_size == len(longer)
        host.write_file("doc.txt", b"tiny")
        assert os.pread(fd, 1 << 20, 0) == b"tiny" and os.fstat(fd).st_size == 4
        assert path.read_bytes() == b"tiny"
    finally:
        os.close(fd)
    assert host.read_file("doc.txt") == b"tiny"


def test_new_removed_and_renamed_entries_are_seen_at_once(
    mnt: Path, host: vfs.BlockingPaths
) -> None:
    d = mnt / "mem" / "d"
    host.mkdir("d")
    assert os.listdir(d) == []
    with pytest.raises(FileNotFoundError):
        (d / "new.txt").stat()  # the kernel has looked the name up and found nothing
    mtime = d.stat().st_mtime_ns
    host.write_file("d/new.txt", "hello")
    assert os.listdir(d) == ["new.txt"] and (d / "new.txt").read_text() == "hello"
    assert d.stat().st_mtime_ns > mtime  # the directory's cached attributes too
    host.mkdir("d/sub/deeper", parents=True)
    assert (d / "sub" / "deeper").is_dir() and d.stat().st_nlink == 3
    host.rename("d/new.txt", "d/sub/moved.txt")
    assert sorted(os.listdir(d)) == ["sub"] and not (d / "new.txt").exists()
    assert (d / "sub" / "moved.txt").read_text() == "hello"
    host.remove("d/sub/moved.txt")
    with pytest.raises(FileNotFoundError):
        (d / "sub" / "moved.txt").stat()
    host.remove("d/sub/deeper")
    assert os.listdir(d / "sub") == [] and d.stat().st_nlink == 3
    assert host.listdir("d") == ["sub"] and host.exists("d/sub") and not host.exists("d/x")


def test_unlinked_by_the_host_while_open_in_the_mount(mnt: Path, host: vfs.BlockingPaths) -> None:
    host.write_file("open.txt", b"still readable")
    fd = os.open(mnt / "mem" / "open.txt", os.O_RDONLY)
    try:
        host.remove("open.txt")
        assert not (mnt / "mem" / "open.txt").exists()
        assert os.pread(fd, 100, 0) == b"still readable"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_changes_through_a_read_only_view(mnt: Path, members: dict[str, vfs.MemoryFS]) -> None:
    seen = mnt / "ro" / "seen.txt"
    assert seen.read_text() == "v1"
    members["inner"].paths_blocking.write_file("seen.txt", "version two")
    assert seen.read_text() == "version two"
    members["inner"].paths_blocking.write_file("added.txt", "a")
    assert sorted(os.listdir(mnt / "ro")) == ["added.txt", "seen.txt"]
    with pytest.raises(OSError) as refused:
        seen.write_text("x")
    assert refused.value.errno == errno.EROFS


def test_enospc_on_the_write_that_overflows(mnt: Path, members: dict[str, vfs.MemoryFS]) -> None:
    """Without the writeback cache each write(2) reaches MemoryFS: the one past
    max_bytes fails itself, and close then succeeds with what was written."""
    small = members["small"]
    fd = os.open(mnt / "small" / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    block = os.urandom(256 << 10)
    written = 0
    try:
        for _ in range(4):
            written += os.write(fd, block)
        with pytest.raises(OSError) as full:
            os.write(fd, block)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)  # no error left for close
    assert written == 1 << 20 == small.used_bytes
    assert (mnt / "small" / "fill").read_bytes() == block * 4
    # The host API refuses what does not fit, and the old content stays.
    with pytest.raises(vfs.NoSpace):
        small.paths_blocking.write_file("fill", block * 5)
    assert small.paths_blocking.read_file("fill") == block * 4
    small.paths_blocking.remove("fill")
    assert small.used_bytes == 0


def test_host_api_errors(host: vfs.BlockingPaths) -> None:
    host.mkdir("errs")
    host.write_file("errs/f", "x")
    cases = [
        (lambda: host.read_file("errs/missing"), vfs.NotFound),
        (lambda: host.read_file("errs"), vfs.IsADirectory),
        (lambda: host.write_file("errs", "x"), vfs.IsADirectory),
        (lambda: host.write_file("nodir/f", "x"), vfs.NotFound),
        (lambda: host.write_file("errs/f/g", "x"), vfs.NotADirectory),
        (lambda: host.listdir("errs/f"), vfs.NotADirectory),
        (lambda: host.mkdir("errs"), vfs.Exists),
        (lambda: host.mkdir("a/b/c"), vfs.NotFound),
        (lambda: host.remove("errs"), vfs.NotEmpty),
        (lambda: host.remove("/"), vfs.NotPermitted),
        (lambda: host.read_file("../etc/passwd"), vfs.InvalidArgument),
        (lambda: host.write_file("errs/" + "n" * 256, "x"), vfs.NameTooLong),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
    host.mkdir("errs", exist_ok=True)
    assert host.listdir("errs") == ["f"] and host.stat("errs/f").size == 1


def test_async_form_on_the_serving_loop_only(members: dict[str, vfs.MemoryFS], mnt: Path) -> None:
    fs = members["mem"]

    async def from_another_loop() -> None:
        await fs.paths.write_file("x", "x")

    with pytest.raises(RuntimeError, match="served by another trio loop"):
        trio.run(from_another_loop)


def test_unmounted_filesystem_is_edited_in_place() -> None:
    fs = vfs.MemoryFS({"a.txt": "a"})
    fs.paths_blocking.mkdir("b")
    fs.paths_blocking.write_file("b/c.txt", "c")
    assert fs.paths_blocking.listdir() == ["a.txt", "b"]

    async def main() -> bytes:
        return await fs.paths.read_file("/b/c.txt")

    assert trio.run(main) == b"c"


def test_host_edits_race_a_busy_mount_without_deadlock(mnt: Path, host: vfs.BlockingPaths) -> None:
    """Invalidations wait for the kernel's requests on the same names; readers hammer
    those names meanwhile, and every host call still returns (liveness, not timing).
    A read that overlaps a rewrite may see a torn view, as with any concurrent writer;
    once the edits are done, the mount and the host agree on everything."""
    host.mkdir("race")
    names = [f"f{i}" for i in range(8)]
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                name = mnt / "mem" / "race" / rng.choice(names)
                os.listdir(mnt / "mem" / "race")
                name.read_bytes()
            except FileNotFoundError:
                pass
            except BaseException as exc:
                failures.append(exc)
                return

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in readers:
        t.start()
    rng = random.Random(1)
    finished = threading.Event()

    def edits() -> None:
        for i in range(300):
            name = rng.choice(names)
            op = rng.random()
            if op < 0.5:
                host.write_file(f"race/{name}", str(i).encode() * rng.randrange(1, 5000))
            elif op < 0.75 and host.exists(f"race/{name}"):
                host.remove(f"race/{name}")
            elif host.exists(f"race/{name}"):
                host.rename(f"race/{name}", f"race/{rng.choice(names)}")
        finished.set()

    editor = threading.Thread(target=edits)
    editor.start()
    try:
        assert finished.wait(120), "host edits stalled against a busy mount"
    finally:
        stop.set()
        editor.join(120)
        for t in readers:
            t.join(60)
    assert not failures, failures
    assert sorted(os.listdir(mnt / "mem" / "race")) == host.listdir("race")
    for name in host.listdir("race"):
        content = host.read_file(f"race/{name}")
        assert (mnt / "mem" / "race" / name).read_bytes() == content
        assert (mnt / "mem" / "race" / name).stat().st_size == len(content)


def test_passthrough_lookups_from_threads_and_forgets_keep_the_node_table(tmp_path: Path) -> None:
    """Lookups register nodes from worker threads while the kernel's forgets drop them on
    the trio thread (a LOOKUP and a FORGET of one inode may cross): every reference is
    counted once, no descriptor leaks, and the last forget closes the node."""
    import sys

    (tmp_path / "f").write_bytes(b"x")
    fs = vfs.PassthroughFS(tmp_path)
    fds_before = len(os.listdir("/proc/self/fd"))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can

    async def main() -> None:
        async def lookups(n: int) -> None:
            for _ in range(n):
                attr = await fs.lookup(fs.root, b"f")
                await fs.forget(attr.key, 1)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(lookups, 1000)

    try:
        trio.run(main)
    finally:
        sys.setswitchinterval(interval)
    assert len(fs._nodes) == 1  # the root only: every lookup was forgotten
    assert len(os.listdir("/proc/self/fd")) == fds_before
