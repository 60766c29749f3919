"""Dead FUSE mounts (the server gone, the mount left): made for real, then cleared by
``lanekit disk mount`` and ``lanekit vfs mount`` with a notice, and mounted again."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import vfs
from blockstore.serve.fusefile import (
    clear_dead_fuse_mount,
    is_dead_fuse_mount,
    set_own_fuse_readahead,
)
from vm import launcher

from .blockdev import sh, wait_for

pytestmark = pytest.mark.slow
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV = 2, 4


def our_mounts(where: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[1] == str(where)]


def unmount_all(where: Path) -> None:
    while our_mounts(where):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def dead_mount_left_by_fusermount3(where: Path) -> None:
    """What a kill -9 of the server during mount set-up leaves: fusermount3 has mounted,
    but its parent is gone before it can hand over ``/dev/fuse``, so it exits without
    unmounting, before its auto-unmount watcher exists."""
    ours, theirs = socket.socketpair()
    ours.close()
    helper = subprocess.run(
        ["fusermount3", "-o", "auto_unmount,allow_other,fsname=killed,subtype=lanekit",
         "--", str(where)],
        env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
        pass_fds=[theirs.fileno()], capture_output=True, timeout=30,
    )  # fmt: skip
    theirs.close()
    assert helper.returncode != 0  # failed to send the descriptor, did not unmount
    assert our_mounts(where) and is_dead_fuse_mount(where)


def raw_fuse_mount(where: Path) -> int:
    """A FUSE mount whose ``/dev/fuse`` descriptor is ours: nothing answers on it until it
    is closed, and closed without an unmount it leaves a dead mount."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"lanekit-test", bytes(where), b"fuse.lanekit", MS_NOSUID | MS_NODEV, data):
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, os.strerror(code))
    return fd


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    os.chmod(tmp_path, 0o755)
    point = tmp_path / "m"
    point.mkdir()
    try:
        yield point
    finally:
        unmount_all(point)


@contextlib.contextmanager
def cli(*argv: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_vfs_mount_clears_a_dead_mount_and_mounts(where: Path) -> None:
    dead_mount_left_by_fusermount3(where)
    with cli("vfs", "mount", "--memory", str(where)) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("mounted")
        (where / "f").write_text("alive")
        assert (where / "f").read_text() == "alive"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        notice = proc.stderr.read().splitlines()
    assert (
        notice[0] == f"lanekit: cleared a dead FUSE mount at {where} (left by a server that died)"
    )
    assert notice[1:] == [line for line in notice[1:] if line.startswith("lanekit: SIGTERM: ")]
    wait_for(lambda: not our_mounts(where), timeout=15)


def test_a_dead_mount_whose_root_the_kernel_still_caches_is_seen_dead(where: Path) -> None:
    """A server killed when fusermount3 cannot unmount (here its auto-unmount watcher is
    killed first, as its race with the killed server does) leaves a dead mount whose root
    attributes the kernel may still have cached: ``stat`` of it then succeeds. Seen dead
    anyway, and cleared (a CI run caught the clean-up missing this)."""
    with cli("vfs", "mount", "--memory", str(where)) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("mounted")
        os.stat(where)  # the root's attributes are now in the kernel's cache
        watchers = [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and _cmdline(int(pid)).startswith("fusermount3")
            and str(where) in _cmdline(int(pid))
        ]  # fmt: skip
        assert watchers, "no auto-unmount watcher found"
        for pid in watchers:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(30)
    os.stat(where)  # answered from the cache: what made the old check miss it
    assert is_dead_fuse_mount(where)
    assert clear_dead_fuse_mount(where) is not None
    assert not our_mounts(where)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_disk_mount_clears_a_dead_mount_and_mounts(where: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/d"
    sh(sys.executable, "-m", "tools.cli", "disk", "create", url, "--size", "8M")
    dead_mount_left_by_fusermount3(where)
    with cli("disk", "mount", url, str(where)) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("mounted")
        assert (where / "disk").stat().st_size == 8 << 20
        with open(where / "disk", "r+b") as disk:
            disk.write(b"block")
            os.fsync(disk.fileno())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        notice = proc.stderr.read().splitlines()
    assert f"lanekit: cleared a dead FUSE mount at {where} (left by a server that died)" in notice
    assert not any("Traceback" in line for line in notice)
    wait_for(lambda: not our_mounts(where), timeout=15)


def test_a_killed_launchers_dead_hub_mount_is_cleared_by_the_next_boots_sweep(
    tmp_path: Path,
) -> None:
    """vm run killed in fusermount3's race leaves its hub mount dead in its runtime
    directory; the next boot's sweep must clear it and remove the directory."""
    os.chmod(tmp_path, 0o755)
    runtime = tmp_path / f"{launcher.RUNTIME_PREFIX}dead"
    hub = runtime / "hub"
    hub.mkdir(parents=True)
    done = subprocess.run(["sh", "-c", "cat /proc/$$/stat"], capture_output=True, text=True)
    dead_pid, start = done.stdout.split()[0], done.stdout.rpartition(")")[2].split()[19]
    (runtime / "owner").write_text(f"{dead_pid}:{start}")
    try:
        dead_mount_left_by_fusermount3(hub)
        launcher._sweep_runtime_dirs(tmp_path)
        assert not our_mounts(hub)
        assert not runtime.exists()
    finally:
        unmount_all(hub)


def test_stacked_dead_mounts_are_all_cleared(where: Path) -> None:
    for _ in range(2):
        os.close(raw_fuse_mount(where))
    assert len(our_mounts(where)) == 2 and is_dead_fuse_mount(where)
    notice = clear_dead_fuse_mount(where)
    assert notice == f"lanekit: cleared 2 dead FUSE mounts at {where} (left by a server that died)"
    assert not our_mounts(where) and where.is_dir()
    assert clear_dead_fuse_mount(where) is None  # nothing there: nothing done


def test_a_dead_mount_above_the_mount_point_is_a_clear_error(where: Path) -> None:
    os.close(raw_fuse_mount(where))
    inner = where / "sub"
    for argv in (
        ["vfs", "mount", "--memory", str(inner)],
        ["disk", "mount", "file:///x/y", str(inner)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tools.cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "is a directory above it a dead mount?" in lines[0], lines
    assert len(our_mounts(where)) == 1  # not ours to clear


def test_serve_refuses_a_dead_mount_with_the_fix(where: Path) -> None:
    os.close(raw_fuse_mount(where))

    async def main() -> None:
        with pytest.raises(vfs.MountError, match=f"fusermount3 -uz {where}"):
            await vfs.serve(vfs.MemoryFS(), where)

    trio.run(main)


def test_readahead_is_set_without_asking_the_server(where: Path) -> None:
    """A server sets its own mount's read-ahead from the mount table: a stat would wait on
    a request only that server answers, and a kill -9 in that window can never finish."""
    fd = raw_fuse_mount(where)  # a server that never answers anything
    stat_result: list[BaseException | os.stat_result] = []

    def stat_it() -> None:
        try:
            stat_result.append(os.stat(where))
        except OSError as exc:
            stat_result.append(exc)

    try:
        setter = threading.Thread(target=set_own_fuse_readahead, args=(where, 4096))
        setter.start()
        setter.join(20)
        assert not setter.is_alive(), "set_own_fuse_readahead waited on the mount's server"
        with open("/proc/self/mountinfo") as f:
            device = next(line.split()[2] for line in f if f" {where} " in line)
        assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text() == "4096\n"
        waiting = threading.Thread(target=stat_it)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not stat_result  # a stat waits for the server
    finally:
        os.close(fd)  # aborts the connection
    waiting.join(20)
    assert isinstance(stat_result[0], OSError)
    assert stat_result[0].errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert is_dead_fuse_mount(where)
