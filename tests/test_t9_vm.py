"""The microVM launcher, booted for real (TCG here). Boots are few and shared where safe."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import blockstore
import vfs
from blockstore import LeaseHeld
from blockstore.identity import process_identity
from vm import ExecTimeout, Healthcheck, HealthcheckFailed, ImageEntry, launcher
from vm.launcher import Sandbox, SyncMachine

from .blockdev import readable, sh, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.slow]


RUNTIME_DIR = re.compile(r"/[^\s,=]*lanekit-vm-[^/\s,]+")


def _lanekit_vm_lines() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "lanekit-vm-"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line and "fusermount3" not in line]


def our_processes(vm_home: Path) -> list[str]:
    """qemu and virtiofsd of this session's boots (their qemu boots a kernel from
    ``vm_home``; another test worker has a home of its own). fusermount3's auto_unmount
    helper is left out: as root, libfuse unmounts directly and the helper only exits with
    this process (then finds nothing to unmount); the mounts themselves are checked."""
    lines = _lanekit_vm_lines()
    dirs = {d for line in lines if str(vm_home) in line for d in RUNTIME_DIR.findall(line)}
    return [line for line in lines if str(vm_home) in line or any(d in line for d in dirs)]


def our_mounts(vm_home: Path) -> list[str]:
    dirs = {d for line in _lanekit_vm_lines() if str(vm_home) in line
            for d in RUNTIME_DIR.findall(line)}  # fmt: skip
    with open("/proc/mounts") as f:
        return [line for line in f if any(d in line for d in dirs)]


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind(vm_home: Path) -> Iterator[None]:
    """What this module's boots leave; a VM another module shares (booted before, still in
    use) is not theirs."""
    processes, mounts = set(our_processes(vm_home)), set(our_mounts(vm_home))

    def left() -> tuple[set[str], set[str]]:
        return set(our_processes(vm_home)) - processes, set(our_mounts(vm_home)) - mounts

    yield
    try:
        wait_for(lambda: left() == (set(), set()), timeout=10)
    except AssertionError:
        pass
    assert left() == (set(), set())


@pytest.fixture(scope="module")
def workspace() -> vfs.MemoryFS:
    return vfs.MemoryFS({"from-host.txt": "hello guest\n"})


@pytest.fixture(scope="module")
def shared_disk(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"file://{tmp_path_factory.mktemp('disks')}/shared"


@pytest.fixture(scope="module")
def machine(vm_home: Path, workspace: vfs.MemoryFS, shared_disk: str) -> Iterator[SyncMachine]:
    sandbox = Sandbox("shell", home=vm_home, disk=shared_disk, memory_mib=256)
    with sandbox.run({"/workspace": workspace}, cwd="/workspace") as m:
        yield m


def test_exec_basics(machine: SyncMachine) -> None:
    r = machine.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    assert machine.exec(["pwd"]).stdout == b"/workspace\n"
    assert machine.exec(["pwd"], cwd="/tmp").stdout == b"/tmp\n"
    r = machine.exec(["sh", "-c", 'echo "$GREETING $HOME"'], env={"GREETING": "hi there"})
    assert r.stdout == b"hi there /root\n"
    assert machine.exec(["cat"], stdin=b"piped\x00in").stdout == b"piped\x00in"
    blob = bytes(range(256)) * 64
    machine.write_file("/tmp/blob", blob)
    assert machine.exec(["cat", "/tmp/blob"]).stdout == blob
    r = machine.exec(["no-such-command"])
    assert r.exit_code == 127 and b"not found" in r.stderr
    r = machine.exec(["true"], cwd="/no/such/dir")
    assert r.exit_code == 126 and b"cannot change to directory" in r.stderr
    assert "HOST" not in machine.exec_text(["env"])  # the host environment stays out
    assert machine.exec_text(["sh", "-c", "ip -o link | grep -v ' lo:' | wc -l"]).strip() == "0"


def test_runtime_comes_from_the_initramfs_read_only(machine: SyncMachine) -> None:
    mounts = machine.read_file("/proc/mounts").decode().splitlines()
    runtime = [line.split() for line in mounts if line.split()[1] == "/lanekit"]
    assert runtime and "ro" in runtime[-1][3].split(","), mounts
    r = machine.exec(["touch", "/lanekit/tampered"])
    assert r.exit_code != 0 and b"Read-only" in r.stderr
    mounted = {line.split()[1]: line.split()[2] for line in mounts}
    for point, kind in [("/proc", "proc"), ("/sys", "sysfs"), ("/dev/pts", "devpts"),
                        ("/dev/shm", "tmpfs"), ("/tmp", "tmpfs"), ("/run", "tmpfs"),
                        ("/workspace", "virtiofs")]:  # fmt: skip
        assert mounted.get(point) == kind, (point, mounts)


def test_timeout_kills_only_the_command(machine: SyncMachine) -> None:
    with pytest.raises(ExecTimeout) as caught:
        machine.exec(["sh", "-c", "echo started; sleep 1000 & sleep 1000"], timeout=2)
    assert caught.value.result.signal == 9  # type: ignore[attr-defined]
    assert machine.exec(["echo", "still alive"]).stdout == b"still alive\n"
    assert "sleep 1000" not in machine.exec_text(["ps"])


def test_files_and_metrics(machine: SyncMachine) -> None:
    machine.write_file("/tmp/f.txt", "text")
    assert machine.read_file("/tmp/f.txt") == b"text"
    assert "f.txt" in machine.list_dir("/tmp")
    m = machine.metrics()
    assert m.guest_uptime_s > 0 and m.host_rss_bytes > 10 << 20 and m.host_cpu_s > 0
    assert m.disk_bytes_read > 0


def test_memoryfs_workspace_both_ways(machine: SyncMachine, workspace: vfs.MemoryFS) -> None:
    assert machine.read_file("/workspace/from-host.txt") == b"hello guest\n"
    machine.exec_text(["sh", "-c", "echo from guest > /workspace/out.txt"])

    async def host_read() -> bytes:
        attr = await workspace.lookup(workspace.root, b"out.txt")
        handle = await workspace.open(attr.key, os.O_RDONLY)
        try:
            return await workspace.read(handle, 0, 100)
        finally:
            await workspace.release(handle)
            await workspace.forget(attr.key, 1)

    assert trio.run(host_read) == b"from guest\n"


def test_second_sandbox_on_same_disk_refused(
    machine: SyncMachine, vm_home: Path, shared_disk: str
) -> None:
    second = Sandbox("shell", home=vm_home, disk=shared_disk)
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"), second.run():
        pass


def test_durable_root_disk(vm_home: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/disks/lane"
    sandbox = Sandbox("shell", home=vm_home, disk=url, memory_mib=256)
    with sandbox.run() as m:
        m.exec_text(["sh", "-c", "echo persisted > /root/note"])
    with sandbox.run() as m:
        assert m.read_file("/root/note") == b"persisted\n"
        m.exec_text(["sh", "-c", "echo synced > /root/synced; sync"])
        m.exec_text(["sh", "-c", "echo unsynced > /root/unsynced"])
        qemu_pid = m._machine.qemu.pid
        os.kill(qemu_pid, signal.SIGKILL)
    with sandbox.run() as m:
        assert m.read_file("/root/synced") == b"synced\n"
        assert m.read_file("/root/note") == b"persisted\n"
    # The guest stopped cleanly (journal replayed at the last boot): the image is clean.
    base = sandbox.images.path(sandbox.registry.lookup("shell").digest or "")
    raw = tmp_path / "lane.raw"

    async def export() -> None:
        async with blockstore.open_disk(url, writable=False, base=base) as disk:
            with open(raw, "wb") as f:  # noqa: ASYNC230  (a test helper)
                offset = 0
                while offset < disk.size:
                    data = await disk.read(offset, min(8 << 20, disk.size - offset))
                    f.write(data)
                    offset += len(data)

    trio.run(export)
    sh("e2fsck", "-fn", str(raw))


def test_healthcheck_failure_is_clear(vm_home: Path) -> None:
    sandbox = Sandbox("shell", home=vm_home, memory_mib=256)
    sandbox.registry.register(
        ImageEntry(
            id="broken-shell",
            image="lanekit/shell:busybox",
            healthcheck=Healthcheck(("sh", "-c", "echo probing; exit 4"), 0, 1500),
            default_entrypoint=("sh", "-c"),
            digest=sandbox.registry.lookup("shell").digest,
        )
    )
    broken = Sandbox("broken-shell", home=vm_home, memory_mib=256)
    with broken.run() as m, pytest.raises(HealthcheckFailed, match=r"exited 4.*probing"):
        m.exec(["true"])
    status = next(s for s in broken.registry.statuses() if s.id == "broken-shell")
    assert not status.healthy and "exited 4" in (status.last_error or "")


def test_cli_vm_run(vm_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LANEKIT_HOME": str(vm_home), "LANEKIT_TEST_SECRET": "do-not-leak"}
    hostdir = tmp_path / "share"
    hostdir.mkdir()
    (hostdir / "in.txt").write_text("from host dir\n")
    proc = subprocess.run(
        [
            sys.executable, "-m", "tools.cli", "vm", "run", "--image", "shell",
            "--mount", f"/data={hostdir}:ro", "--mount", "/scratch=memory",
            "--env", "A=b", "--cwd", "/data", "--memory", "256", "--",
            "sh", "-c", "echo hello; cat in.txt; echo $A; env | grep -c LANEKIT_TEST; "
            "touch /data/x 2>/dev/null || echo read-only; echo s > /scratch/s; exit 7",
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "hello\nfrom host dir\nb\n0\nread-only\n"
    assert sorted(os.listdir(hostdir)) == ["in.txt"]


@pytest.mark.parametrize(
    ("image", "argv", "expected"),
    [
        ("python", ["python3", "-c", "print(6 * 7)"], b"42\n"),
        ("javascript", ["node", "-e", "console.log(6 * 7)"], b"42\n"),
    ],
)
def test_debian_images_build_and_boot(
    vm_home: Path, image: str, argv: list[str], expected: bytes
) -> None:
    """debootstrap from Debian's mirror (the build is the slow part), then boot to ready."""
    sandbox = Sandbox(image, home=vm_home, memory_mib=512)
    with sandbox.run() as m:
        assert m.exec(argv).stdout == expected
        # The image's own tools, found on $PATH, not the runtime busybox's applets.
        assert m.exec_text(["ls", "--version"]).startswith("ls (GNU coreutils)")
        path = m.exec_text(["readlink", "-f", "/proc/self/exe"], cwd="/usr")
        assert path == "/usr/bin/readlink\n"
    status = next(s for s in sandbox.registry.statuses() if s.id == image)
    assert status.healthy and status.digest


def test_private_runtime_directory(machine: SyncMachine) -> None:
    runtime = machine._machine.runtime
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    sockets = [p for p in runtime.iterdir() if stat.S_ISSOCK(p.stat().st_mode)]
    assert {p.name for p in sockets} >= {"nbd.sock", "agent.sock", "fs0.sock"}
    for sock in sockets:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, sock


def test_runtime_dirs_of_dead_launchers_are_swept(tmp_path: Path) -> None:
    done = subprocess.run(["sh", "-c", "cat /proc/$$/stat"], capture_output=True, text=True)
    dead_pid, start = done.stdout.split()[0], done.stdout.rpartition(")")[2].split()[19]
    dead, alive, unowned, reused = (tmp_path / f"lanekit-vm-{n}" for n in "abcd")
    for d in (dead, alive, unowned, reused):
        (d / "sub").mkdir(parents=True)
    (dead / "owner").write_text(f"{dead_pid}:{start}")
    (alive / "owner").write_text(process_identity(os.getpid()) or "")
    (reused / "owner").write_text(f"{os.getpid()}:1")  # our pid, another start time
    launcher._sweep_runtime_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lanekit-vm-b", "lanekit-vm-c"]


def runtime_dirs() -> set[Path]:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return set(base.glob("lanekit-vm-*"))


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_ctrl_c_or_kill_cleans_up(vm_home: Path, how: str) -> None:
    env = {**os.environ, "LANEKIT_HOME": str(vm_home)}
    before_procs = set(our_processes(vm_home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "vm", "run", "--image", "shell", "--memory", "256",
         "--mount", "/w=memory", "--", "sh", "-c", "echo up > /w/flag; echo up; sleep 600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    mine: set[Path] = set()  # this boot's runtime directory (other workers boot too)
    try:

        def booted() -> bool:
            new = [p for p in set(our_processes(vm_home)) - before_procs if "qemu-system" in p]
            mine.update(Path(d) for p in new for d in RUNTIME_DIR.findall(p))
            return bool(new)

        wait_for(booted, timeout=120)
        assert proc.stdout is not None
        ready = readable(proc.stdout, 180)  # the command runs (not a boot)
        said = proc.stdout.readline() if ready else b""
        assert said == b"up\n", proc.stderr.read() if proc.stderr else said
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            proc.kill()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else b""
    assert proc.returncode == (130 if how == "ctrl-c" else -signal.SIGKILL), stderr
    assert mine, "the boot's qemu named no runtime directory"

    def gone() -> bool:
        procs = [p for p in _lanekit_vm_lines() if any(str(d) in p for d in mine)]
        with open("/proc/mounts") as f:
            mounts = [line for line in f if any(str(d) in line for d in mine)]
        return not procs and not mounts

    wait_for(gone, timeout=30)
    if how == "kill-9":  # its runtime dir may be left: the next boot sweeps it away
        fresh = launcher._runtime_dir()
        try:
            assert not mine & runtime_dirs()
        finally:
            shutil.rmtree(fresh)
    assert not mine & runtime_dirs()


def test_cli_image_check(vm_home: Path) -> None:
    env = {**os.environ, "LANEKIT_HOME": str(vm_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "image", "check", "shell"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "shell: healthy"
    listing = subprocess.run(
        [sys.executable, "-m", "tools.cli", "image", "list"],
        capture_output=True, text=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    assert any(line.startswith("shell ") and "healthy (" in line for line in listing.splitlines())
