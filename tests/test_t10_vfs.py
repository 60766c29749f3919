"""Host-implemented filesystems on a real FUSE mount, checked with real tools and syscalls."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import vfs
from blockstore import LocalObjectStore
from blockstore.serve.fusefile import clear_dead_fuse_mount

from .blockdev import sh, wait_for

pytestmark = pytest.mark.slow

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if libc.utimensat(AT_FDCWD, bytes(path), times, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def as_user(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def readme_example_code() -> str:
    """The README's 30-line read-only filesystem of computed files, as written."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    code = next(b for b in blocks if "class Computed(vfs.Filesystem)" in b)
    assert len(code.strip().splitlines()) <= 45
    return code


def readme_example() -> type[vfs.Filesystem]:
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(readme_example_code(), "README.md", "exec"), namespace)
    return namespace["Computed"]  # type: ignore[return-value]


class Faulty(vfs.MemoryFS):
    """Raises an unexpected exception on reads of one file."""

    async def read(self, handle: object, offset: int, size: int) -> bytes:
        data = await super().read(handle, offset, size)  # type: ignore[arg-type]
        if data.startswith(b"boom"):
            raise RuntimeError("a bug in a user filesystem")
        return data


class CountsFlushes(vfs.MemoryFS):
    """A user filesystem that wants every close(2) to reach it."""

    def __init__(self, seed: dict[str, str] | None = None) -> None:
        super().__init__(seed or {})
        self.flushes = 0

    async def flush(self, handle: object) -> None:
        self.flushes += 1


class BlockingFiles:
    """A plain object with blocking methods, served through vfs.Threaded: reading
    ``slow.txt`` blocks its thread until the test releases it."""

    FILES = {b"fast.txt": b"fast", b"slow.txt": b"slow"}
    root = "/"

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.release = threading.Event()

    def _attr(self, key: str | bytes) -> vfs.Attr:
        if key == "/":
            return vfs.Attr(key, stat.S_IFDIR | 0o555, nlink=2)
        assert isinstance(key, bytes)
        return vfs.Attr(key, stat.S_IFREG | 0o444, size=len(self.FILES[key]))

    def lookup(self, parent: str, name: bytes) -> vfs.Attr:
        if parent != "/" or name not in self.FILES:
            raise vfs.NotFound()
        return self._attr(name)

    def getattr(self, key: str | bytes) -> vfs.Attr:
        return self._attr(key)

    def readdir(self, handle: str, offset: int) -> Iterator[tuple[bytes, vfs.Attr, int]]:
        for i, name in enumerate(sorted(self.FILES)[offset:], start=offset + 1):
            yield name, self._attr(name), i

    def read(self, key: bytes, offset: int, size: int) -> bytes:
        if key == b"slow.txt":
            self.reading.set()
            self.release.wait(60)
        return self.FILES[key][offset : offset + size]


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("passthrough")
    (base / "root").mkdir()
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_text("secret")
    (base / "root" / "inside.txt").write_text("inside")
    os.chmod(base / "root", 0o777)
    return base


@pytest.fixture(scope="module")
def fs_members(host_root: Path) -> dict[str, vfs.Filesystem]:
    return {
        "mem": vfs.MemoryFS(),
        "small": vfs.MemoryFS(max_bytes=1 << 20, max_inodes=20),
        "pass": vfs.PassthroughFS(host_root / "root"),
        "ro": vfs.ReadOnlyFS(vfs.MemoryFS({"seed.txt": "seeded\n"})),
        "computed": readme_example()(),
        "faulty": Faulty({"boom.txt": "boom!", "fine.txt": "fine"}),
        "flushes": CountsFlushes(),
        "roflushes": vfs.ReadOnlyFS(CountsFlushes({"seen.txt": "seen"})),
        "threaded": vfs.Threaded(BlockingFiles(), thread_safe=True),
    }


@pytest.fixture(scope="module")
def mnt(
    tmp_path_factory: pytest.TempPathFactory, fs_members: dict[str, vfs.Filesystem]
) -> Iterator[Path]:
    # Outside pytest's private (0700) temporary directory, so other users can reach it.
    where = Path(tempfile.mkdtemp(prefix="lanekit-vfs-test-", dir="/tmp"))
    os.chmod(where, 0o755)
    try:
        with vfs.mount_blocking(vfs.Hub(fs_members), where) as path:
            os.chmod(path / "mem", 0o777)
            yield path
        wait_for(lambda: str(where) not in Path("/proc/mounts").read_text(), timeout=10)
    finally:
        os.rmdir(where)


# ------------------------------------------------------------ POSIX behaviour


def test_permissions_checked_by_kernel(mnt: Path) -> None:
    d = mnt / "mem" / "perm"
    d.mkdir()
    os.chmod(d, 0o755)
    denied = as_user(1000, 1000, "touch", str(d / "x"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    os.chmod(d, 0o777)
    assert as_user(1000, 1000, "touch", str(d / "x")).returncode == 0
    st = os.stat(d / "x")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o644)
    os.chown(d / "x", 2000, 3000)
    assert os.stat(d / "x").st_uid == 2000
    assert as_user(1000, 1000, "chmod", "777", str(d / "x")).returncode != 0


def test_sticky_and_setgid(mnt: Path) -> None:
    sticky = mnt / "mem" / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    assert as_user(1000, 1000, "touch", str(sticky / "a")).returncode == 0
    refused = as_user(1001, 1001, "rm", "-f", str(sticky / "a"))
    assert refused.returncode != 0 and (sticky / "a").exists()
    assert as_user(1000, 1000, "rm", str(sticky / "a")).returncode == 0
    shared = mnt / "mem" / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    os.chmod(shared, 0o2777)
    assert as_user(1000, 1000, "mkdir", str(shared / "sub")).returncode == 0
    assert as_user(1000, 1000, "touch", str(shared / "f")).returncode == 0
    assert os.stat(shared / "f").st_gid == 4242
    sub = os.stat(shared / "sub")
    assert sub.st_gid == 4242 and sub.st_mode & stat.S_ISGID


def test_links_and_renames(mnt: Path) -> None:
    d = mnt / "mem" / "links"
    d.mkdir()
    (d / "a").write_text("A")
    os.link(d / "a", d / "b")
    assert os.stat(d / "a").st_nlink == 2
    os.symlink("a", d / "s")
    assert os.readlink(d / "s") == "a" and (d / "s").read_text() == "A"
    assert stat.S_ISLNK(os.lstat(d / "s").st_mode)
    (d / "c").write_text("C")
    os.rename(d / "c", d / "b")
    assert (d / "b").read_text() == "C" and os.stat(d / "a").st_nlink == 1
    (d / "x").write_text("X")
    with pytest.raises(FileExistsError):
        renameat2(d / "x", d / "a", 1)  # RENAME_NOREPLACE
    renameat2(d / "x", d / "a", 2)  # RENAME_EXCHANGE
    assert (d / "a").read_text() == "X" and (d / "x").read_text() == "A"
    with pytest.raises(OSError) as bad:
        renameat2(d / "x", d / "a", 1 | 2)
    assert bad.value.errno == errno.EINVAL
    (d / "dir").mkdir()
    (d / "dir" / "f").write_text("f")
    (d / "empty").mkdir()
    with pytest.raises(OSError) as bad:
        os.rename(d / "empty", d / "dir")
    assert bad.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(NotADirectoryError):
        os.rename(d / "empty", d / "a")
    with pytest.raises(IsADirectoryError):
        os.rename(d / "a", d / "empty")


def test_unlinked_open_file_lives_until_close(
    mnt: Path, fs_members: dict[str, vfs.Filesystem]
) -> None:
    memory = fs_members["mem"]
    assert isinstance(memory, vfs.MemoryFS)
    path = mnt / "mem" / "doomed"
    path.write_bytes(b"x" * 100_000)
    used = memory.used_bytes
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.pread(fd, 5, 0) == b"xxxxx"
        os.pwrite(fd, b"yy", 0)
        assert os.pread(fd, 3, 0) == b"yyx"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    wait_for(lambda: memory.used_bytes <= used - 100_000, timeout=10)


def test_truncate_fallocate_sparse_append(mnt: Path) -> None:
    path = mnt / "mem" / "sizes"
    path.write_bytes(b"0123456789")
    os.truncate(path, 4)
    assert path.read_bytes() == b"0123"
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), 8)
        assert f.read() == b"0123\0\0\0\0"
        os.posix_fallocate(f.fileno(), 0, 100)
    assert path.stat().st_size == 100
    sparse = mnt / "mem" / "sparse"
    with open(sparse, "wb") as f:
        f.seek(1 << 30)
        f.write(b"end")
    st = sparse.stat()
    assert st.st_size == (1 << 30) + 3 and st.st_blocks * 512 < 1 << 20
    with open(sparse, "rb") as f:
        f.seek((1 << 30) - 2)
        assert f.read() == b"\0\0end"
    log = mnt / "mem" / "log"
    for line in (b"one\n", b"two\n"):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, line)
        os.close(fd)
    assert log.read_bytes() == b"one\ntwo\n"


def test_timestamps(mnt: Path) -> None:
    path = mnt / "mem" / "times"
    path.write_text("a")
    before = os.stat(path)
    time.sleep(0.02)
    with open(path, "a") as f:
        f.write("b")
    after_write = os.stat(path)
    assert after_write.st_mtime_ns > before.st_mtime_ns
    time.sleep(0.02)
    os.chmod(path, 0o600)
    after_chmod = os.stat(path)
    assert after_chmod.st_ctime_ns > after_write.st_ctime_ns
    assert after_chmod.st_mtime_ns == after_write.st_mtime_ns
    time.sleep(0.02)
    os.link(path, mnt / "mem" / "times2")
    assert os.stat(path).st_ctime_ns > after_chmod.st_ctime_ns
    time.sleep(0.02)
    ctime = os.stat(path).st_ctime_ns
    os.rename(mnt / "mem" / "times2", mnt / "mem" / "times3")
    assert os.stat(path).st_ctime_ns > ctime
    utimensat(path, (0, UTIME_OMIT), (1234567890, 123456789))
    st = os.stat(path)
    assert st.st_mtime_ns == 1234567890_123456789
    assert st.st_atime_ns == after_chmod.st_atime_ns or st.st_atime_ns >= before.st_atime_ns
    utimensat(path, (0, UTIME_NOW), (0, UTIME_OMIT))
    st2 = os.stat(path)
    assert st2.st_mtime_ns == 1234567890_123456789 and st2.st_atime_ns > 1234567890_123456789


def test_special_files_xattrs_statfs(mnt: Path, fs_members: dict[str, vfs.Filesystem]) -> None:
    fifo = mnt / "mem" / "fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    node = mnt / "mem" / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert os.stat(node).st_rdev == os.makedev(1, 3)
    path = mnt / "mem" / "attrs"
    path.write_text("x")
    os.setxattr(path, "user.color", b"blue")
    os.setxattr(path, "user.size", b"9")
    assert os.getxattr(path, "user.color") == b"blue"
    assert sorted(os.listxattr(path)) == ["user.color", "user.size"]
    os.removexattr(path, "user.size")
    with pytest.raises(OSError) as missing:
        os.getxattr(path, "user.size")
    assert missing.value.errno == errno.ENODATA
    # A member that keeps no xattrs refuses them itself; the others keep theirs.
    assert not fs_members["computed"].has_xattrs and fs_members["mem"].has_xattrs
    for attempt in (
        lambda: os.getxattr(mnt / "computed" / "hello.txt", "user.color"),
        lambda: os.listxattr(mnt / "computed" / "hello.txt"),
        lambda: os.setxattr(mnt / "computed" / "hello.txt", "user.color", b"red"),
    ):
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno == errno.EOPNOTSUPP
    assert os.getxattr(path, "user.color") == b"blue"
    # FUSE asks statfs of the mount, not of a path: the hub reports its members' sum.
    total = os.statvfs(mnt / "small")
    assert total.f_files >= 20 and total.f_blocks * total.f_frsize >= 1 << 20
    small = trio.run(fs_members["small"].statfs)
    assert (small.blocks * small.block_size, small.files) == (1 << 20, 20)


def test_limits_answer_enospc(mnt: Path) -> None:
    with pytest.raises(OSError) as full:
        (mnt / "small" / "big").write_bytes(b"x" * (2 << 20))
    assert full.value.errno == errno.ENOSPC
    os.unlink(mnt / "small" / "big")
    made = 0
    with pytest.raises(OSError) as no_inodes:
        for i in range(100):
            (mnt / "small" / f"f{i}").touch()
            made += 1
    assert no_inodes.value.errno == errno.ENOSPC and made < 20


def test_big_directory_and_stable_readdir(mnt: Path) -> None:
    d = mnt / "mem" / "many"
    d.mkdir()
    names = {f"entry-{i:05d}" for i in range(10_500)}
    for name in names:
        (d / name).touch()
    assert set(os.listdir(d)) == names
    seen: list[str] = []
    removed: set[str] = set()
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 100 == 0:  # delete entries not yet seen and add new ones meanwhile
                victim = f"entry-{10_499 - i // 100:05d}"
                if victim not in seen:
                    os.unlink(d / victim)
                    removed.add(victim)
                (d / f"new-{i}").touch()
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert (names - removed) <= set(seen), "an entry that stayed was skipped"


def test_real_workloads(mnt: Path, tmp_path: Path) -> None:
    work = mnt / "mem" / "work"
    work.mkdir()
    sh("tar", "-C", str(Path(__file__).parents[1]), "-cf", str(tmp_path / "src.tar"),
       "blockstore", "vfs", "vm", "tests")  # fmt: skip
    sh("tar", "-C", str(work), "-xf", str(tmp_path / "src.tar"))
    sh("diff", "-r", str(work / "blockstore"), str(Path(__file__).parents[1] / "blockstore"))
    sh("cp", "-a", str(work / "vfs"), str(work / "vfs-copy"))
    sh("diff", "-r", str(work / "vfs"), str(work / "vfs-copy"))
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@e"]
    sh("git", "init", "-q", str(work))
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "snapshot")
    sh(*git, "fsck", "--strict")
    assert sh(*git, "status", "--porcelain").stdout == ""
    sh(sys.executable, "-m", "venv", "--without-pip", str(work / "venv"))
    # Through sh: this process serves the mount, so it must not vfork+exec a program
    # that lives on it (its serving thread would wait on the vfork).
    out = sh("sh", "-c", f"{work}/venv/bin/python -c 'import sys; print(sys.prefix)'")
    assert out.stdout.strip() == str(work / "venv")


def test_random_operations_against_a_model(mnt: Path) -> None:
    rng = random.Random(7)
    d = mnt / "mem" / "model"
    d.mkdir()
    model: dict[str, bytearray] = {f"f{i}": bytearray() for i in range(4)}
    fds = {name: os.open(d / name, os.O_RDWR | os.O_CREAT, 0o644) for name in model}
    try:
        for _ in range(1500):
            name = rng.choice(list(model))
            data, fd = model[name], fds[name]
            op = rng.random()
            if op < 0.45:
                offset = rng.randrange(0, 300_000)
                chunk = rng.randbytes(rng.randrange(1, 70_000))
                os.pwrite(fd, chunk, offset)
                if len(data) < offset:
                    data.extend(bytes(offset - len(data)))
                data[offset : offset + len(chunk)] = chunk
            elif op < 0.75:
                offset = rng.randrange(0, 320_000)
                size = rng.randrange(1, 100_000)
                assert os.pread(fd, size, offset) == bytes(data[offset : offset + size])
            elif op < 0.9:
                size = rng.randrange(0, 300_000)
                os.ftruncate(fd, size)
                if size < len(data):
                    del data[size:]
                else:
                    data.extend(bytes(size - len(data)))
            else:
                os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    for name, data in model.items():
        assert (d / name).read_bytes() == bytes(data)


# ------------------------------------------------------------ other filesystems


def test_read_only_and_computed(mnt: Path) -> None:
    assert (mnt / "ro" / "seed.txt").read_text() == "seeded\n"
    for attempt in (
        lambda: (mnt / "ro" / "new").write_text("x"),
        lambda: (mnt / "ro" / "seed.txt").write_text("x"),
        lambda: os.unlink(mnt / "ro" / "seed.txt"),
        lambda: os.mkdir(mnt / "ro" / "d"),
    ):
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno == errno.EROFS
    assert sorted(os.listdir(mnt / "computed")) == ["hello.txt", "squares.txt"]
    assert (mnt / "computed" / "squares.txt").read_text().splitlines()[-1] == "9801"


def test_mount_reads_ahead_4_mib_and_big_files_round_trip(mnt: Path) -> None:
    """Read-ahead is raised to 4 MiB (1 MiB requests) on a real mount."""
    dev = mnt.stat().st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
    assert (bdi / "read_ahead_kb").read_text().strip() == "4096"
    data = os.urandom(1 << 20) * 96
    (mnt / "mem" / "big").write_bytes(data)
    os.sync()
    assert (mnt / "mem" / "big").read_bytes() == data
    (mnt / "mem" / "big").unlink()


def test_unexpected_exception_is_eio_and_mount_survives(mnt: Path) -> None:
    with pytest.raises(OSError) as failed:
        (mnt / "faulty" / "boom.txt").read_text()
    assert failed.value.errno == errno.EIO
    assert (mnt / "faulty" / "fine.txt").read_text() == "fine"


def test_flush_reaches_only_filesystems_that_want_it(
    mnt: Path, fs_members: dict[str, vfs.Filesystem]
) -> None:
    assert not vfs.MemoryFS().wants_flush and not vfs.Hub({"m": vfs.MemoryFS()}).wants_flush
    counting = fs_members["flushes"]
    assert isinstance(counting, CountsFlushes) and counting.wants_flush
    before = counting.flushes
    for i in range(3):
        (mnt / "flushes" / f"f{i}").write_text("x")
    assert counting.flushes >= before + 3
    # Through the read-only wrapper too.
    wrapper = fs_members["roflushes"]
    assert isinstance(wrapper, vfs.ReadOnlyFS) and wrapper.wants_flush
    inner = wrapper.inner
    assert isinstance(inner, CountsFlushes)
    before = inner.flushes
    for _ in range(3):
        assert (mnt / "roflushes" / "seen.txt").read_text() == "seen"
    assert inner.flushes >= before + 3


def test_blocking_code_in_threaded_never_stalls_the_mount(
    mnt: Path, fs_members: dict[str, vfs.Filesystem]
) -> None:
    threaded = fs_members["threaded"]
    assert isinstance(threaded, vfs.Threaded) and isinstance(threaded.inner, BlockingFiles)
    files, got = threaded.inner, {}
    reader = threading.Thread(
        target=lambda: got.update(slow=(mnt / "threaded" / "slow.txt").read_bytes())
    )
    reader.start()
    try:
        assert files.reading.wait(30)
        # While that read blocks its worker thread, the mount answers everything else.
        assert (mnt / "threaded" / "fast.txt").read_bytes() == b"fast"
        assert sorted(os.listdir(mnt / "threaded")) == ["fast.txt", "slow.txt"]
        (mnt / "mem" / "while-blocked").write_text("x")
        assert reader.is_alive() and "slow" not in got
    finally:
        files.release.set()
        reader.join(60)
    assert got["slow"] == b"slow"
    # What the object lacks gets Filesystem's default answers.
    with pytest.raises(OSError) as refused:
        (mnt / "threaded" / "new").write_text("x")
    assert refused.value.errno == errno.EROFS
    assert not threaded.has_xattrs and not threaded.wants_flush
    with pytest.raises(OSError) as no_xattrs:
        os.getxattr(mnt / "threaded" / "fast.txt", "user.a")
    assert no_xattrs.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("thread_safe", [False, True])
def test_threaded_calls_overlap_only_when_thread_safe(thread_safe: bool) -> None:
    class Counting:
        root = "/"

        def __init__(self) -> None:
            self.running = self.most = 0
            self.guard = threading.Lock()
            self.all_in = threading.Event()

        def read(self, key: object, offset: int, size: int) -> bytes:
            with self.guard:
                self.running += 1
                self.most = max(self.most, self.running)
                if self.running == 3:
                    self.all_in.set()
            # blocks, as plain code does: until all three overlap, or a while if they can't
            self.all_in.wait(10 if thread_safe else 0.3)
            with self.guard:
                self.running -= 1
            return b"x" * size

    inner = Counting()
    fs = vfs.Threaded(inner, thread_safe=thread_safe)

    async def main() -> None:
        async with trio.open_nursery() as readers:
            for _ in range(3):
                readers.start_soon(fs.read, "k", 0, 4)
        assert await fs.read("k", 0, 2) == b"xx"

    trio.run(main)
    assert inner.most == (3 if thread_safe else 1)


def test_bad_names(mnt: Path) -> None:
    with pytest.raises(OSError) as long_name:
        (mnt / "mem" / ("x" * 256)).write_text("x")
    assert long_name.value.errno == errno.ENAMETOOLONG
    (mnt / "mem" / ("y" * 255)).write_text("ok")
    with pytest.raises(ValueError):
        os.open(str(mnt / "mem" / "nul\0name"), os.O_CREAT | os.O_WRONLY)


def test_passthrough_basics(mnt: Path, host_root: Path) -> None:
    p = mnt / "pass"
    assert (p / "inside.txt").read_text() == "inside"
    (p / "dir").mkdir()
    (p / "dir" / "f").write_text("via fuse")
    assert (host_root / "root" / "dir" / "f").read_text() == "via fuse"
    os.link(p / "dir" / "f", p / "dir" / "g")
    assert os.stat(host_root / "root" / "dir" / "f").st_nlink == 2
    os.symlink("f", p / "dir" / "s")
    assert os.readlink(host_root / "root" / "dir" / "s") == "f"
    assert as_user(1000, 1000, "touch", str(p / "byuser")).returncode == 0
    assert os.stat(host_root / "root" / "byuser").st_uid == 1000
    os.setxattr(p / "dir" / "f", "user.k", b"v")
    assert os.getxattr(host_root / "root" / "dir" / "f", "user.k") == b"v"


async def test_passthrough_confinement_api(host_root: Path) -> None:
    fs = vfs.PassthroughFS(host_root / "root")
    for bad in (b"..", b".", b"a/b", b"../outside"):
        with pytest.raises(vfs.FSError):
            await fs.lookup(fs.root, bad)
    os.symlink("../outside", host_root / "root" / "escape")
    try:
        link = await fs.lookup(fs.root, b"escape")
        assert stat.S_ISLNK(link.mode)
        with pytest.raises(OSError) as loop:
            await fs.open(link.key, os.O_RDONLY)
        assert loop.value.errno == errno.ELOOP
        with pytest.raises((OSError, vfs.FSError)):
            await fs.lookup(link.key, b"secret")
        with pytest.raises((OSError, vfs.FSError)):
            await fs.create(link.key, b"planted", 0o644, os.O_WRONLY, vfs.Context())
    finally:
        os.unlink(host_root / "root" / "escape")
    assert sorted(os.listdir(host_root / "outside")) == ["secret"]


def test_passthrough_directory_swapped_for_symlink(mnt: Path, host_root: Path) -> None:
    p = mnt / "pass"
    (p / "swap").mkdir()
    (p / "swap" / "before").write_text("x")
    os.rename(host_root / "root" / "swap", host_root / "root" / "moved")
    os.symlink(str(host_root / "outside"), host_root / "root" / "swap")
    try:
        # The kernel may still hold the old directory; either the write lands in the
        # real directory (now "moved") or the lookup sees the symlink — never outside.
        try:
            fd = os.open(p / "swap" / "planted", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            os.close(fd)
        except OSError:
            pass
        assert sorted(os.listdir(host_root / "outside")) == ["secret"]
    finally:
        os.unlink(host_root / "root" / "swap")


def test_passthrough_refuses_device_nodes(mnt: Path, host_root: Path) -> None:
    with pytest.raises(PermissionError):
        os.mknod(mnt / "pass" / "disk", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    assert not (host_root / "root" / "disk").exists()
    os.mkfifo(mnt / "pass" / "fifo")
    assert stat.S_ISFIFO(os.stat(host_root / "root" / "fifo").st_mode)


def test_passthrough_read_only(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")

    async def main() -> None:
        fs = vfs.PassthroughFS(tmp_path, read_only=True)
        attr = await fs.lookup(fs.root, b"f")
        with pytest.raises(vfs.ReadOnly):
            await fs.open(attr.key, os.O_WRONLY)
        with pytest.raises(vfs.ReadOnly):
            await fs.unlink(fs.root, b"f")
        handle = await fs.open(attr.key, os.O_RDONLY)
        assert await fs.read(handle, 0, 10) == b"x"
        await fs.release(handle)

    trio.run(main)


# ------------------------------------------------------------ snapshots


async def _tree(fs: vfs.Filesystem) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    buf = io.BytesIO()
    await vfs.snapshot_tar(fs, buf)
    import tarfile

    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            xattrs = sorted((k, v) for k, v in m.pax_headers.items() if "xattr" in k)
            fields = (m.type, m.mode, m.uid, m.gid, m.linkname, data, m.pax_headers.get("mtime"))
            out[m.name] = (*fields, tuple(xattrs))
    return out


async def _sample() -> vfs.MemoryFS:
    fs = vfs.MemoryFS({"a/b.txt": "bee", "c.bin": bytes(range(256)) * 1000})
    ctx = vfs.Context(uid=1000, gid=1000)
    d = await fs.mkdir(fs.root, b"d", 0o2750, ctx)
    attr, h = await fs.create(d.key, b"f", 0o600, os.O_WRONLY, ctx)
    await fs.write(h, 0, b"data")
    await fs.release(h)
    await fs.link(attr.key, fs.root, b"hard")
    await fs.symlink(fs.root, b"sym", b"d/f", ctx)
    await fs.mknod(fs.root, b"pipe", stat.S_IFIFO | 0o644, 0, ctx)
    await fs.setxattr(attr.key, b"user.tag", b"\x00\xffbin")
    return fs


async def test_snapshot_tar_round_trip() -> None:
    source = await _sample()
    buf = io.BytesIO()
    count = await vfs.snapshot_tar(source, buf)
    assert count == 8
    buf.seek(0)
    copy = vfs.MemoryFS()
    await vfs.restore_tar(copy, buf)
    assert await _tree(copy) == await _tree(source)
    hard = await copy.lookup(copy.root, b"hard")
    assert hard.nlink == 2


async def test_snapshot_object_store_round_trip(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    source = await _sample()
    manifest = await vfs.snapshot_objects(source, objects, "lanes/l1/workspace")
    assert manifest["entries"] == 8
    copy = vfs.MemoryFS()
    await vfs.restore_objects(copy, objects, "lanes/l1/workspace")
    assert await _tree(copy) == await _tree(source)
    part = manifest["parts"][0]["key"]
    import lz4.frame

    data = bytearray(lz4.frame.decompress(objects.get(part).data))
    data[600] ^= 1
    objects.put(part, lz4.frame.compress(bytes(data)))
    with pytest.raises(vfs.FSError, match="corrupt"):
        await vfs.restore_objects(vfs.MemoryFS(), objects, "lanes/l1/workspace")


async def test_a_snapshot_of_many_parts_round_trips(tmp_path: Path) -> None:
    """Past one part (8 MiB), each part is cut, hashed and compressed off the trio loop
    and restored in order."""
    objects = LocalObjectStore(tmp_path / "objects")
    big = os.urandom(20 << 20)
    source = vfs.MemoryFS({"big.bin": big, "small/one": "1"})
    manifest = await vfs.snapshot_objects(source, objects, "w")
    assert len(manifest["parts"]) == 3
    copy = vfs.MemoryFS()
    assert await vfs.restore_objects(copy, objects, "w") == manifest["entries"]
    assert await _tree(copy) == await _tree(source)


async def test_restore_refuses_unsafe_tar() -> None:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        tar.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    with pytest.raises(vfs.InvalidArgument):
        await vfs.restore_tar(vfs.MemoryFS(), buf)


def test_memoryfs_seeded_from_directory(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    (seed / "sub").mkdir(parents=True)
    (seed / "sub" / "x").write_text("x")
    os.link(seed / "sub" / "x", seed / "y")
    os.symlink("sub/x", seed / "z")

    async def main() -> None:
        fs = vfs.MemoryFS(copy_from=seed, files={"extra": "e"})
        tree = await _tree(fs)
        assert set(tree) == {"sub", "sub/x", "y", "z", "extra"}
        y = await fs.lookup(fs.root, b"y")
        assert y.nlink == 2

    trio.run(main)


NO_XATTRS_SCRIPT = r"""
import json, os, sys
import vfs
from vfs.fuse import FuseAdapter

class NoXattrs(vfs.MemoryFS):
    has_xattrs = False

asked = []
original = FuseAdapter.getxattr
async def counting(self, inode, name, ctx):
    asked.append(name)
    return await original(self, inode, name, ctx)
FuseAdapter.getxattr = counting
with vfs.mount_blocking(NoXattrs(), sys.argv[1]) as where:
    fd = os.open(where / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    for i in range(50):
        os.write(fd, b"x" * 1000)
    os.close(fd)
    errors = []
    for call in (lambda: os.getxattr(where / "f", "user.a"), lambda: os.listxattr(where / "f"),
                 lambda: os.setxattr(where / "f", "user.a", b"1")):
        try:
            call()
        except OSError as exc:
            errors.append(exc.errno)
    data = (where / "f").read_bytes()
print(json.dumps({"asked": len(asked), "errors": errors, "size": len(data)}))
"""


def test_filesystem_without_xattrs_costs_no_round_trip_per_write(tmp_path: Path) -> None:
    """Without xattrs the kernel is told once; else it asks before every write(2)."""
    import json

    where = tmp_path / "m"
    where.mkdir()
    os.chmod(tmp_path, 0o755)
    out = subprocess.run(
        [sys.executable, "-c", NO_XATTRS_SCRIPT, str(where)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["asked"] <= 1, result
    assert result["errors"] == [errno.EOPNOTSUPP] * 3
    assert result["size"] == 50_000
    assert not os.path.ismount(where)


def test_readme_example_runs_as_a_script_until_unmounted(tmp_path: Path) -> None:
    script = tmp_path / "computed.py"
    script.write_text(readme_example_code())
    where = tmp_path / "m"
    where.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(where)])
    try:
        wait_for(lambda: os.path.ismount(where), timeout=30)
        assert (where / "hello.txt").read_text() == "hello\n"
        subprocess.run(["umount", str(where)], check=True, timeout=30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------ the CLI


@pytest.mark.parametrize("how", ["sigterm", "kill-9", "umount"])
def test_cli_vfs_mount(tmp_path: Path, how: str) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "hello").write_text("hi")
    where = tmp_path / "m"
    where.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "vfs", "mount", "--memory", "--seed", str(seed),
         str(where)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("mounted")
        assert (where / "hello").read_text() == "hi"
        # MemoryFS wants no flush: the kernel learns that at the first close, and the
        # written data must still be there (the writeback cache sends it before close).
        for i in range(20):
            (where / f"new{i}").write_bytes(bytes([i]) * (100_000 + i))
        Path("/proc/sys/vm/drop_caches").write_text("3")  # reads below come from the server
        for i in range(20):
            assert (where / f"new{i}").read_bytes() == bytes([i]) * (100_000 + i)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        elif how == "umount":  # taken away from outside: the server must not linger
            subprocess.run(["umount", str(where)], check=True, timeout=30)
            assert proc.wait(30) == 0
            assert proc.stdout.read().strip() == "unmounted"
        else:
            proc.kill()
            proc.wait(30)
            # fusermount3 unmounts once its server is gone, unless its look at the mount
            # point lands while the connection is being aborted (ECONNABORTED instead of
            # the ENOTCONN it checks for; a few kills in a hundred under load): then the
            # mount is left dead, and the next mount clears it.
            with contextlib.suppress(AssertionError):
                wait_for(lambda: str(where) not in Path("/proc/mounts").read_text(), timeout=15)
            if str(where) in Path("/proc/mounts").read_text():
                notice = clear_dead_fuse_mount(where)  # None: fusermount3 was only slow
                assert notice or str(where) not in Path("/proc/mounts").read_text()
        wait_for(lambda: str(where) not in Path("/proc/mounts").read_text(), timeout=15)
        assert os.listdir(where) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for _ in range(8):  # a failed test leaves no mount either
            if str(where) not in Path("/proc/mounts").read_text():
                break
            sh("umount", "-l", str(where), check=False)


def test_cli_vfs_mount_refuses_a_mount_point_that_is_not_a_directory(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for where in (tmp_path / "missing", afile):
        proc = subprocess.run(
            [sys.executable, "-m", "tools.cli", "vfs", "mount", "--memory", str(where)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1
        assert f"mount point {where} is not a directory" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert str(where) not in Path("/proc/mounts").read_text()


# ------------------------------------------------------------ the bench's FUSE floor


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_fuse_floor_server_answers_real_tools_and_leaves_no_mount(tmp_path: Path, how: str) -> None:
    """The vfs bench's floor must run the bench's workload, or its numbers mean nothing."""
    where = tmp_path / "m"
    where.mkdir()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a").write_bytes(b"a" * 30_000)
    os.symlink("sub/a", tree / "link")
    archive = tmp_path / "tree.tar"
    sh("tar", "-cf", str(archive), "-C", str(tmp_path), "tree")
    proc = subprocess.Popen([sys.executable, "-m", "tools.bench.fusefloor", str(where)])
    try:
        wait_for(lambda: os.path.ismount(where), timeout=30)
        dev = where.stat().st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
        # Set by the server's helper thread once the mount exists: not at once.
        wait_for(lambda: (bdi / "read_ahead_kb").read_text() == "4096\n", timeout=30)
        sh("dd", "if=/dev/zero", f"of={where / 'big'}", "bs=1M", "count=8", "conv=fsync")
        Path("/proc/sys/vm/drop_caches").write_text("3")
        assert len((where / "big").read_bytes()) == 8 << 20  # zeros: it stores nothing
        for i in range(50):
            os.close(os.open(where / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o640))
        assert stat.S_IMODE((where / "f7").stat().st_mode) == 0o640
        for i in range(0, 50, 2):
            os.unlink(where / f"f{i}")
        sh("tar", "-xf", str(archive), "-C", str(where))
        assert os.readlink(where / "tree" / "link") == "sub/a"
        assert (where / "tree" / "sub" / "a").stat().st_size == 30_000
        names = os.listdir(where)
        assert sorted(names) == sorted(["big", "tree", *(f"f{i}" for i in range(1, 50, 2))])
        with pytest.raises(FileNotFoundError):
            (where / "f0").stat()
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        else:
            proc.kill()
            proc.wait(30)
        wait_for(lambda: not os.path.ismount(where), timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
