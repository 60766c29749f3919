"""Every long-running command stops on any sequence of signals and leaves nothing behind.

For each command and each sequence: it exits (a liveness bound, not a timing test), no
process that names its data directory remains, no mount remains, the lease of the disk it
served can be taken at once, and what it acknowledged is there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import blockstore
from blockstore.serve.fusefile import clear_dead_fuse_mount
from vm import launcher

from .blockdev import sh, wait_for

SEQUENCES = {
    "term": [(signal.SIGTERM, 0.0)],
    "term-term": [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.05)],
    "int-term": [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.3)],
    "term-kill": [(signal.SIGTERM, 0.0), (signal.SIGKILL, 0.1)],
    "kill": [(signal.SIGKILL, 0.0)],
}


def processes_naming(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append(f"{pid} {cmdline}")
    return found


def mounts_naming(text: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if text in line]


@dataclass
class Command:
    argv: list[str]
    ready: bytes
    prepare: Callable[[Path], None]
    acknowledge: Callable[[Path], None]
    check: Callable[[Path], None]
    disk: str | None = None
    env: dict[str, str] | None = None


def disk_url(d: Path, name: str = "disk") -> str:
    return f"file://{d}/store/{name}"


def make_disk(d: Path) -> None:
    sh(sys.executable, "-m", "tools.cli", "disk", "create", disk_url(d), "--size", "64M")


def read_disk(url: str, offset: int, length: int) -> bytes:
    async def main() -> bytes:
        async with blockstore.open_disk(url, writable=False) as disk:
            return await disk.read(offset, length)

    return trio.run(main)


def nbd_write(d: Path) -> None:
    uri = f"nbd+unix:///disk?socket={d}/nbd.sock"
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", uri)


def nbd_check(d: Path) -> None:
    assert read_disk(disk_url(d), 0, 1 << 20) == b"\x5a" * (1 << 20)


def file_write(d: Path) -> None:
    with open(d / "mnt" / "disk", "r+b") as f:
        f.write(b"\xa5" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())


def file_check(d: Path) -> None:
    assert read_disk(disk_url(d), 0, 1 << 20) == b"\xa5" * (1 << 20)


def nothing(d: Path) -> None:
    pass


def base_of(url: str, vm_home: Path) -> str | None:
    """The local image a disk was made on (vm run's disks have one)."""
    objects, name, _ = blockstore.resolve(url)
    digest = blockstore.disk_info(objects, name)["base_digest"]
    return str(vm_home / "images" / "sha256" / digest / "disk.raw") if digest else None


def vm_check(d: Path, vm_home: Path) -> None:
    raw = d / "exported.raw"
    url = disk_url(d, "lane")
    base = base_of(url, vm_home)
    assert base is not None
    sh(sys.executable, "-m", "tools.cli", "disk", "export", url, str(raw), "--base", base)
    # A guest killed after its sync leaves the file in the journal: replay it first.
    subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, check=False)
    assert sh("debugfs", "-R", "cat /root/kept", str(raw)).stdout == "kept\n"


def command(kind: str, d: Path, vm_home: Path) -> Command:
    cli = [sys.executable, "-m", "tools.cli"]
    if kind == "s3 serve":
        return Command([*cli, "s3", "serve", "--dir", str(d / "s3")], b"Press Ctrl-C",
                       nothing, nothing, nothing)  # fmt: skip
    if kind == "disk serve":
        return Command(
            [*cli, "disk", "serve", disk_url(d), "--nbd", f"unix:{d}/nbd.sock"], b"serving",
            make_disk, nbd_write, nbd_check, disk=disk_url(d),
        )  # fmt: skip
    if kind == "disk mount":
        return Command(
            [*cli, "disk", "mount", disk_url(d), str(d / "mnt")], b"mounted",
            lambda d: (make_disk(d), (d / "mnt").mkdir()), file_write, file_check,
            disk=disk_url(d),
        )  # fmt: skip
    if kind == "vfs mount":
        return Command([*cli, "vfs", "mount", "--memory", str(d / "mnt")], b"mounted",
                       lambda d: (d / "mnt").mkdir(), nothing, nothing)  # fmt: skip
    assert kind == "vm run"
    return Command(
        [*cli, "vm", "run", "--image", "shell", "--memory", "256", "--disk", disk_url(d, "lane"),
         "--mount", "/w=memory", "--", "sh", "-c",
         "echo kept > /root/kept; sync; echo up; sleep 600"],
        b"up", nothing, nothing, lambda d: vm_check(d, vm_home), disk=disk_url(d, "lane"),
        env={"LANEKIT_HOME": str(vm_home), "XDG_RUNTIME_DIR": str(d)},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sequence", list(SEQUENCES))
@pytest.mark.parametrize("kind", ["s3 serve", "disk serve", "disk mount", "vfs mount", "vm run"])
def test_any_signals_stop_cleanly(kind: str, sequence: str, vm_home: Path) -> None:
    # Short (socket paths) and unique: a killed run's leftovers never collide with, or
    # get counted as, a later run's.
    d = Path(tempfile.mkdtemp(prefix=f"lanekit-signals-{kind.replace(' ', '-')}-{sequence}-"))
    try:
        cmd = command(kind, d, vm_home)
        cmd.prepare(d)
        # faulthandler: a SIGABRT prints every thread's stack (see the liveness bound)
        env = {**os.environ, **(cmd.env or {}), "PYTHONFAULTHANDLER": "1"}
        proc = subprocess.Popen(
            cmd.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            seen = b""
            while cmd.ready not in seen:
                line = proc.stdout.readline()
                assert line, (seen, proc.wait(), proc.stderr.read() if proc.stderr else b"")
                seen += line
            cmd.acknowledge(d)
            for signum, delay in SEQUENCES[sequence]:
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signum)
            try:
                proc.wait(90)  # a liveness bound: it must exit
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                _, err = proc.communicate(timeout=30)
                raise AssertionError(f"{kind} did not exit; its threads:\n{err.decode()}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "Traceback" not in err, err
        assert proc.returncode is not None
        wait_for(lambda: not processes_naming(str(d)), timeout=30)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not mounts_naming(str(d)), timeout=30)
        if mounts_naming(str(d)):
            # fusermount3 can lose the race with a killed server and leave its mount dead
            # (a few kills in a hundred under load): then the next run must clear it.
            if kind == "vm run":
                launcher._sweep_runtime_dirs(d)
            else:
                clear_dead_fuse_mount(d / "mnt")
            assert not mounts_naming(str(d)), "the next run did not clear a dead mount"
        if cmd.disk is not None:
            base = base_of(cmd.disk, vm_home)

            async def take_over() -> None:  # at once: released, or its holder is dead here
                async with blockstore.open_disk(cmd.disk or "", base=base):
                    pass

            trio.run(take_over)
        cmd.check(d)
    finally:
        for line in mounts_naming(str(d)):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
        shutil.rmtree(d, ignore_errors=True)


STORM = """
import os, sys
from tools.stopping import SignalCount
signals = SignalCount("stopping", "hurrying")
signals.install()
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    signals.sleep_until_first(0.001)  # what `s3 serve` does between its checks
    signals.second.is_set()
print("counted", signals.count, flush=True)
"""


def test_a_storm_of_stop_signals_never_hangs_their_handler(tmp_path: Path) -> None:
    """`s3 serve` once hung on SIGINT then SIGTERM: its handler set a threading.Event
    while the interrupted main thread held that Event's lock in Event.wait. The handler
    must run at any instant of the main loop; a storm of signals lands on every one."""
    done = tmp_path / "storm-over"
    proc = subprocess.Popen(
        [sys.executable, "-c", STORM, str(done)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for i in range(3000):
            os.kill(proc.pid, signal.SIGTERM if i % 2 else signal.SIGINT)
            time.sleep(0.0002)  # a signal while the last one's handler still runs, too
        done.touch()  # a hung handler never sees it
        out, err = proc.communicate(timeout=60)  # a liveness bound
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert int(out.split()[1]) >= 2, out  # pending signals of one kind coalesce
    lines = err.decode().splitlines()
    assert lines == [
        "lanekit: SIGINT: stopping (SIGINT again: hurrying)",
        "lanekit: SIGTERM again: hurrying",
    ], lines


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_command_without_its_own_stop_cleans_up_on_sigterm(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """``volume create`` watches no signals: SIGTERM ends it the way Ctrl-C does, running
    its cleanups (the scratch file system image goes), not on the spot (it stayed)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    store = f"file://{tmp_path / 'store'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "volume", "create", "data", "--size", "2G",
         "--store", store],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # Signalled once its image exists: inside the with-block that removes it. (Between
        # mkdtemp and that block no Python code can clean up after any signal.)
        while not any(scratch.glob("*/fs.img")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert proc.poll() is None, "the command ended before it could be interrupted"
        proc.send_signal(signal.SIGSTOP)  # it stays in the phase that holds the image
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert list(scratch.iterdir()) == []


REPO = Path(__file__).resolve().parent.parent
BOOT_THEN_WAIT = """
import sys, time
from pathlib import Path
from vm.launcher import Sandbox
try:
    with Sandbox("shell", home=Path(sys.argv[1]), memory_mib=256, disk=sys.argv[2]).run():
        print("booted", flush=True)
        time.sleep(600)
except KeyboardInterrupt:
    print("interrupted", flush=True)  # and the program goes on
    time.sleep(600)
"""


@pytest.mark.slow
def test_ctrl_c_during_a_blocking_boot_stops_the_sandbox(vm_home: Path) -> None:
    """``Sandbox.run()`` (the blocking form) interrupted while the VM boots, in a program
    that catches the KeyboardInterrupt and goes on: by the time it is caught the boot is
    cancelled, what it started is stopped and the disk's lease released; it was left
    running on a helper thread with no handle."""
    d = Path(tempfile.mkdtemp(prefix="lanekit-signals-boot-"))
    url = disk_url(d, "lane")
    env = {**os.environ, "LANEKIT_HOME": str(vm_home), "XDG_RUNTIME_DIR": str(d)}
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOT_THEN_WAIT, str(vm_home), url], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not [p for p in processes_naming(str(d)) if "qemu" in p]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"interrupted\n"
        # The program goes on, and nothing of its sandbox does.
        assert not [p for p in processes_naming(str(d)) if "qemu" in p or "virtiofsd" in p]
        assert blockstore.disk_info(*blockstore.resolve(url)[:2])["lease_holder"] is None
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for line in processes_naming(str(d)):
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
