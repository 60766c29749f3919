"""O_DIRECT, O_SYNC, O_DSYNC and the other open flags on real mounts: PassthroughFS (and
MemoryFS where it applies) behave as a local filesystem, checked against the host file."""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import vfs
from vfs import passthrough

from .blockdev import sh, wait_for

pytestmark = pytest.mark.slow
O_LARGEFILE = 0o100000  # os.O_LARGEFILE is 0 on x86-64; the kernel passes the bit on


class CountingPassthrough(vfs.PassthroughFS):
    """Records the fsync(2)s and directory fsyncs the kernel sends on."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fsyncs: list[bool] = []
        self.dir_fsyncs = 0

    async def fsync(self, handle: Any, datasync: bool) -> None:
        self.fsyncs.append(datasync)
        await super().fsync(handle, datasync)

    async def fsyncdir(self, handle: Any, datasync: bool) -> None:
        self.dir_fsyncs += 1
        await super().fsyncdir(handle, datasync)


class NoFsync(vfs.MemoryFS):
    """A member that says fsync is not for it (ENOSYS)."""

    async def fsync(self, handle: Any, datasync: bool) -> None:
        raise vfs.NotSupported()


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("host")


@pytest.fixture(scope="module")
def counting(host_dir: Path) -> CountingPassthrough:
    return CountingPassthrough(host_dir)


@pytest.fixture(scope="module")
def memory() -> vfs.MemoryFS:
    return vfs.MemoryFS()


@pytest.fixture(scope="module")
def mnt(counting: CountingPassthrough, memory: vfs.MemoryFS) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="lanekit-vfs-direct-", dir="/tmp"))
    hub = vfs.Hub({"pass": counting, "mem": memory, "nofsync": NoFsync()})
    try:
        with vfs.mount_blocking(hub, where) as path:
            yield path
        wait_for(lambda: str(where) not in Path("/proc/mounts").read_text(), timeout=10)
    finally:
        os.rmdir(where)


@pytest.fixture(params=["pass", "mem"])
def member(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def host_view(member: str, name: str, host_dir: Path, memory: vfs.MemoryFS) -> bytes:
    """The file as the host sees it, not through the mount."""
    if member == "pass":
        return (host_dir / name).read_bytes()
    return memory.paths_blocking.read_file(name)


# ------------------------------------------------------------ O_DIRECT


def test_dd_direct_round_trips_of_unaligned_sizes(
    mnt: Path, member: str, host_dir: Path, memory: vfs.MemoryFS, tmp_path: Path
) -> None:
    # the report's case first: 16 aligned blocks of zeros
    sh("dd", "if=/dev/zero", f"of={mnt / member / 'zeros'}", "bs=4096", "count=16", "oflag=direct")
    assert host_view(member, "zeros", host_dir, memory) == bytes(16 * 4096)
    for size in (4096 * 16 + 1000, 123_457, (1 << 20) + 7, 511):
        source = tmp_path / f"src{size}"
        source.write_bytes(random.Random(size).randbytes(size))
        target = mnt / member / f"f{size}"
        # dd turns O_DIRECT off for the short last block, as on any filesystem
        sh("dd", f"if={source}", f"of={target}", "bs=64k", "oflag=direct")
        assert host_view(member, f"f{size}", host_dir, memory) == source.read_bytes()
        back = tmp_path / f"back{size}"
        sh("dd", f"if={target}", f"of={back}", "bs=64k", "iflag=direct")
        assert back.read_bytes() == source.read_bytes()
        sh("dd", f"if={source}", f"of={target}", "bs=4k", "oflag=direct,dsync", "conv=notrunc")
        assert host_view(member, f"f{size}", host_dir, memory) == source.read_bytes()


def test_random_direct_io_against_a_model(
    mnt: Path, member: str, host_dir: Path, memory: vfs.MemoryFS
) -> None:
    """Reads and writes with O_DIRECT from page-aligned (mmap) buffers, mostly aligned as
    a local filesystem demands, some not (FUSE passes those on), checked against a model."""
    rng = random.Random(22)
    model = bytearray()
    buf = mmap.mmap(-1, 256 << 10)
    path = mnt / member / "direct.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for _ in range(2500):
            aligned = rng.random() < 0.9
            unit = 512 if aligned else 1
            offset = rng.randrange(0, (3 << 20) // unit) * unit
            length = rng.randrange(1, (256 << 10) // unit + 1) * unit
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(length)
                buf[:length] = data
                assert os.pwritev(fd, [memoryview(buf)[:length]], offset) == length
                if len(model) < offset:
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + length] = data
            elif op < 0.9:
                got = os.preadv(fd, [memoryview(buf)[:length]], offset)
                assert buf[:got] == model[offset : offset + length]
            elif op < 0.95:
                size = rng.randrange(0, 3 << 20)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    assert path.read_bytes() == bytes(model)
    assert host_view(member, "direct.bin", host_dir, memory) == bytes(model)


def test_direct_writes_reach_the_device_before_returning(
    mnt: Path, host_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT is dropped from the host descriptor (no alignment demands), and each
    write is written out with sync_file_range before the kernel is answered."""
    synced: list[tuple[int, int]] = []
    real = passthrough._sync_range

    def counting(fd: int, offset: int, size: int) -> None:
        synced.append((offset, size))
        real(fd, offset, size)

    monkeypatch.setattr(passthrough, "_sync_range", counting)
    fd = os.open(mnt / "pass" / "dev.bin", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        with mmap.mmap(-1, 8192) as buf:
            buf[:] = b"d" * 8192
            for i in range(3):
                assert os.pwritev(fd, [memoryview(buf)[: 4096 + i]], i * 8192) == 4096 + i
                assert synced[-1] == (i * 8192, 4096 + i)
                host = (host_dir / "dev.bin").read_bytes()
                assert host[i * 8192 : i * 8192 + 4096 + i] == b"d" * (4096 + i)
        flags = host_fd_flags(host_dir / "dev.bin")
        assert flags and not any(f & os.O_DIRECT for f in flags)
    finally:
        os.close(fd)


# ------------------------------------------------------------ O_SYNC and O_DSYNC


def host_fd_flags(path: Path) -> list[int]:
    """The open flags of this process's descriptors open on ``path`` for I/O (the server's
    host files; its O_PATH handles left out)."""
    flags = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                info = Path(f"/proc/self/fdinfo/{fd}").read_text()
                flags.append(int(info.split("flags:")[1].split()[0], 8))
        except OSError:
            continue
    return [f for f in flags if not f & os.O_PATH]


@pytest.mark.parametrize("flag", ["O_SYNC", "O_DSYNC"])
def test_sync_writes_are_on_the_host_before_write_returns(
    mnt: Path, host_dir: Path, counting: CountingPassthrough, flag: str
) -> None:
    name = f"sync-{flag}"
    fd = os.open(mnt / "pass" / name, os.O_WRONLY | os.O_CREAT | getattr(os, flag), 0o644)
    try:
        before = len(counting.fsyncs)
        for i in range(10):
            chunk = bytes([65 + i]) * (1000 + i)
            os.write(fd, chunk)
            # from the writer, right after write(2): the data is in the host file
            assert (host_dir / name).read_bytes().endswith(chunk)
            # and the kernel asked for the sync the flag promises (fdatasync for O_DSYNC)
            assert len(counting.fsyncs) == before + i + 1
            assert counting.fsyncs[-1] is (flag == "O_DSYNC")
        # the host descriptor keeps the flag, so every host write is durable by itself
        flags = host_fd_flags(host_dir / name)
        wanted = getattr(os, flag)
        assert flags and all(f & wanted == wanted for f in flags)
    finally:
        os.close(fd)
    assert len((host_dir / name).read_bytes()) == sum(1000 + i for i in range(10))


def test_sync_writes_on_memoryfs(mnt: Path, memory: vfs.MemoryFS) -> None:
    fd = os.open(mnt / "mem" / "sync", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    try:
        for i in range(5):
            os.write(fd, b"x" * 100)
            assert memory.paths_blocking.read_file("sync") == b"x" * 100 * (i + 1)
    finally:
        os.close(fd)


def test_fsync_reaches_every_hub_member_and_directories(
    mnt: Path, counting: CountingPassthrough
) -> None:
    """A member answering ENOSYS to fsync must not switch fsync off for the whole mount
    (the kernel would then skip the passthrough member's syncs too)."""
    with open(mnt / "nofsync" / "f", "wb") as f:
        f.write(b"x")
        os.fsync(f.fileno())  # succeeds: nothing to sync there
    before = len(counting.fsyncs)
    with open(mnt / "pass" / "after-nofsync", "wb") as f:
        f.write(b"y")
        os.fsync(f.fileno())
    assert len(counting.fsyncs) == before + 1
    (mnt / "pass" / "dir").mkdir(exist_ok=True)
    fd = os.open(mnt / "pass" / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        before_dirs = counting.dir_fsyncs
        os.fsync(fd)
        assert counting.dir_fsyncs == before_dirs + 1
    finally:
        os.close(fd)


# ------------------------------------------------------------ every other flag


def outcome(fn: Callable[[Path], object], where: Path) -> tuple[str, object]:
    try:
        return "ok", fn(where)
    except OSError as exc:
        return "error", exc.errno


def append(d: Path) -> bytes:
    fd = os.open(d / "a", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"one")
    os.pwrite(fd, b"two", 0)  # Linux appends anyway
    os.close(fd)
    fd = os.open(d / "a", os.O_RDWR | os.O_APPEND)
    os.write(fd, b"three")
    first = os.pread(fd, 3, 0)
    os.close(fd)
    return first + (d / "a").read_bytes()


def truncate(d: Path) -> bytes:
    (d / "t").write_bytes(b"a long first content")
    fd = os.open(d / "t", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    (d / "r").write_bytes(b"abc")
    os.close(os.open(d / "r", os.O_RDONLY | os.O_TRUNC))
    return (d / "t").read_bytes() + b"|" + (d / "r").read_bytes()


def exclusive(d: Path) -> int:
    os.close(os.open(d / "x", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    mode = os.stat(d / "x").st_mode & 0o777
    os.open(d / "x", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return mode


def no_atime(d: Path) -> bytes:
    (d / "n").write_bytes(b"noatime")
    fd = os.open(d / "n", os.O_RDONLY | os.O_NOATIME)
    data = os.read(fd, 100)
    os.close(fd)
    return data


def path_only(d: Path) -> int:
    (d / "p").write_bytes(b"12345")
    fd = os.open(d / "p", os.O_PATH)
    try:
        size = os.fstat(fd).st_size
        os.read(fd, 1)
        return size
    finally:
        os.close(fd)


def large_nonblock(d: Path) -> bytes:
    fd = os.open(d / "l", os.O_RDWR | os.O_CREAT | O_LARGEFILE | os.O_NONBLOCK, 0o644)
    os.write(fd, b"large")
    data = os.pread(fd, 10, 0)
    os.close(fd)
    return data


def write_only_read(d: Path) -> bytes:
    fd = os.open(d / "w", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.read(fd, 1)
    finally:
        os.close(fd)


def direct_dsync(d: Path) -> bytes:
    fd = os.open(d / "dd", os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_DSYNC, 0o644)
    with mmap.mmap(-1, 4096) as buf:
        buf[:] = b"q" * 4096
        os.pwritev(fd, [buf], 0)
        buf[:] = bytes(4096)
        os.preadv(fd, [buf], 0)
        os.close(fd)
        return bytes(buf[:8])


@pytest.mark.parametrize(
    "scenario",
    [append, truncate, exclusive, no_atime, path_only, large_nonblock, write_only_read,
     direct_dsync],
)  # fmt: skip
def test_open_flags_behave_as_on_a_local_filesystem(
    mnt: Path, member: str, tmp_path: Path, scenario: Callable[[Path], object]
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    mounted = mnt / member / f"flags-{scenario.__name__}"
    mounted.mkdir()
    assert outcome(scenario, mounted) == outcome(scenario, local)


def test_o_tmpfile_is_refused_so_callers_fall_back(mnt: Path, member: str) -> None:
    """pyfuse3 has no tmpfile operation: the kernel answers EOPNOTSUPP, which glibc and
    Python take as the cue to create and unlink a named file instead."""
    with pytest.raises(OSError) as refused:
        os.open(mnt / member, os.O_TMPFILE | os.O_RDWR, 0o600)
    assert refused.value.errno == errno.EOPNOTSUPP
    with tempfile.TemporaryFile(dir=mnt / member) as f:
        f.write(b"falls back")
        f.seek(0)
        assert f.read() == b"falls back"


def test_create_without_o_excl_opens_a_file_made_on_the_host_meanwhile(
    host_dir: Path,
) -> None:
    """The kernel looked the name up and found nothing; the host made it since. The file
    is opened as it is: not truncated, and not given to the caller."""
    (host_dir / "raced").write_bytes(b"host data")
    os.chown(host_dir / "raced", 4321, 4321)

    async def main() -> None:
        fs = vfs.PassthroughFS(host_dir)
        ctx = vfs.Context(uid=1000, gid=1000)
        attr, handle = await fs.create(fs.root, b"raced", 0o600, os.O_RDWR, ctx)
        assert await fs.read(handle, 0, 100) == b"host data"
        assert (attr.uid, attr.gid) == (4321, 4321)
        await fs.release(handle)
        with pytest.raises(FileExistsError):
            await fs.create(fs.root, b"raced", 0o600, os.O_RDWR | os.O_EXCL, ctx)

    trio.run(main)


NOATIME_SCRIPT = r"""
import os, sys, trio, vfs
async def main():
    fs = vfs.PassthroughFS(sys.argv[1])
    attr = await fs.lookup(fs.root, b"rootfile")
    handle = await fs.open(attr.key, os.O_RDONLY | os.O_NOATIME)
    print((await fs.read(handle, 0, 100)).decode())
    await fs.release(handle)
trio.run(main)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own are 0700)."""
    where = Path(tempfile.mkdtemp(prefix="lanekit-noatime-", dir="/tmp"))
    os.chmod(where, 0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where)


def test_o_noatime_is_dropped_when_the_host_refuses_it_to_the_server(shared_dir: Path) -> None:
    """A server that does not own the host file (here: not root) may not use O_NOATIME
    on it; the open goes on without it rather than failing with EPERM."""
    tmp_path = shared_dir
    (tmp_path / "rootfile").write_text("readable by all")
    os.chmod(tmp_path / "rootfile", 0o644)
    refused = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         "import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_NOATIME)",
         str(tmp_path / "rootfile")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    served = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         NOATIME_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    assert served.stdout == "readable by all\n"


def test_path_api_works_on_passthrough_too(
    mnt: Path, counting: CountingPassthrough, host_dir: Path
) -> None:
    """vfs.Paths is not MemoryFS's alone: on a PassthroughFS it edits the host directory
    and the mount shows it at once, through an open file too."""
    paths = vfs.BlockingPaths(vfs.Paths(counting))
    paths.mkdir("via-paths/sub", parents=True)
    paths.write_file("via-paths/sub/f.txt", "one")
    path = mnt / "pass" / "via-paths" / "sub" / "f.txt"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"one"
        paths.write_file("via-paths/sub/f.txt", "a longer second version")
        assert os.pread(fd, 100, 0) == b"a longer second version"
        assert (host_dir / "via-paths" / "sub" / "f.txt").read_text() == "a longer second version"
    finally:
        os.close(fd)
    paths.rename("via-paths/sub/f.txt", "via-paths/g.txt")
    assert sorted(os.listdir(mnt / "pass" / "via-paths")) == ["g.txt", "sub"]
    paths.remove("via-paths/g.txt")
    paths.remove("via-paths/sub")
    assert os.listdir(mnt / "pass" / "via-paths") == [] == paths.listdir("via-paths")
