"""The FUSE single-file export under the kernel loop device, and kill -9 of the NBD server
in the middle of a filesystem workload."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import blockstore
from tests.blockdev import is_mounted, loop_device, mounted, sh, wait_for

MiB = 1 << 20


@contextlib.contextmanager
def lanekit_bg(*args: str, ready: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(ready), line + (proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


@pytest.mark.slow
def test_fuse_file_under_loop_mkfs_mount_e2fsck(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/vol"
    trio.run(lambda: blockstore.create(url, 256 * MiB))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    source = Path(blockstore.__file__).parent
    with lanekit_bg("disk", "mount", url, str(mnt), ready="mounted") as proc:
        image = mnt / "disk"
        assert image.stat().st_size == 256 * MiB
        dev_t = mnt.stat().st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev_t)}:{os.minor(dev_t)}/read_ahead_kb")
        assert bdi.read_text().strip() == "4096", "sequential reads should reach us as 1 MiB"
        with loop_device(image) as dev:
            sh("mkfs.ext4", "-q", dev)
            with mounted(dev, tmp_path / "fs") as fs:
                sh("cp", "-a", str(source), str(fs / "src"))
                (fs / "big").write_bytes(os.urandom(20 * MiB))
                expected = tree_digest(fs)
                sh("sync")
            sh("e2fsck", "-fn", dev)
        # fsync of the file is a durable flush.
        fd = os.open(image, os.O_RDWR)
        try:
            os.pwrite(fd, b"marker", 255 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert "flushed and released" in stop(proc)
    assert not is_mounted(mnt)
    out = tmp_path / "export.raw"
    sh(sys.executable, "-m", "tools.cli", "disk", "export", url, str(out))
    sh("e2fsck", "-fn", str(out))
    with loop_device(out) as dev, mounted(dev, tmp_path / "check", "ro") as fs:
        assert tree_digest(fs) == expected
    with open(out, "rb") as f:
        f.seek(255 * MiB)
        assert f.read(6) == b"marker"


@pytest.mark.slow
def test_fuse_file_unmount_from_outside_flushes_and_releases(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/vol"
    trio.run(lambda: blockstore.create(url, 16 * MiB))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with lanekit_bg("disk", "mount", url, str(mnt), ready="mounted") as proc:
        with open(mnt / "disk", "r+b") as f:
            f.write(b"hello")
        sh("fusermount3", "-u", str(mnt))
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    objects, name, _ = blockstore.resolve(url)
    assert blockstore.disk_info(objects, name)["lease_holder"] is None

    async def check() -> bytes:
        async with blockstore.open_disk(url, writable=False) as disk:
            return await disk.read(0, 5)

    assert trio.run(check) == b"hello"


@pytest.mark.slow
def test_kill9_nbd_server_during_filesystem_workload(tmp_path: Path) -> None:
    """mkfs, files, sync, more files, kill -9 the server: what was synced survives."""
    url = f"file://{tmp_path}/store/vol"
    trio.run(lambda: blockstore.create(url, 256 * MiB))
    sock = tmp_path / "nbd.sock"
    fusemnt = tmp_path / "nbdfuse"
    fusemnt.mkdir()
    server = lanekit_bg("disk", "serve", url, "--nbd", f"unix:{sock}", ready="serving")
    nbdfuse: subprocess.Popen[str] | None = None
    with server as proc:
        try:
            nbdfuse = subprocess.Popen(
                ["nbdfuse", str(fusemnt / "nbd"), "--unix", str(sock)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_for(lambda: (fusemnt / "nbd").exists())
            with loop_device(fusemnt / "nbd") as dev:
                sh("mkfs.ext4", "-q", dev)
                fs_dir = tmp_path / "fs"
                with mounted(dev, fs_dir) as fs:
                    (fs / "synced").mkdir()
                    for i in range(20):
                        (fs / "synced" / f"f{i}").write_bytes(os.urandom(100_000 + i))
                    expected = tree_digest(fs)
                    sh("sync")
                    (fs / "unsynced").write_bytes(os.urandom(5 * MiB))
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    sh("umount", "-l", str(fs), check=False)
        finally:
            sh("fusermount3", "-u", "-z", str(fusemnt), check=False)
            if nbdfuse is not None:
                nbdfuse.kill()
                nbdfuse.wait()
    # Restart: the dead server's lease must be broken explicitly (or wait for its TTL).
    out = tmp_path / "after.raw"
    sh(sys.executable, "-m", "tools.cli", "disk", "release", url, "--force")
    sh(sys.executable, "-m", "tools.cli", "disk", "export", url, str(out))
    # Mounting replays the journal, like a VM rebooting; then the fs must be clean.
    with loop_device(out) as dev:
        with mounted(dev, tmp_path / "check") as fs:
            got = tree_digest(fs)
            for name, digest in expected.items():
                assert got.get(name) == digest, name
        sh("e2fsck", "-fn", dev)
