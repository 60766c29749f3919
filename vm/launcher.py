"""Boot registered images as qemu microVMs: root disk over our NBD server, mounts over virtiofs.

A :class:`Sandbox` is a definition (image, cpus, memory, root disk); ``boot()`` starts one
VM from it and yields a :class:`Machine`. Everything a boot starts — the root disk and its
lease, the NBD server, virtiofsd and FUSE mounts, qemu, sockets, the private runtime
directory — is owned by one exit stack, so it is torn down in reverse order on every way
out: a normal exit, an exception, a timeout, Ctrl-C. ``stop()`` powers the guest off
(``sync``, remount read-only), then the root disk is flushed durably and its lease released.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import BaseImage, Disk
from blockstore.concurrency import blocking
from blockstore.serve.nbd import serve_device

from .accel import QEMU, choose_accelerator
from .agent import GuestAgent
from .errors import (
    BootError,
    ExecTimeout,
    GuestAgentError,
    HealthcheckFailed,
    ImageNotFoundError,
    VMError,
)
from .guest import AGENT_PORT_NAME
from .images import RECIPES
from .registry import ImageEntry
from .state import lanekit_home, state_paths

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SAFE_GUEST_PATH = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_.-")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    """The signal that ended the command, if one did (exit_code is then 128 + signal)."""

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class Mount:
    """``source``: a host directory, or a :mod:`vfs` filesystem object served over FUSE."""

    guest_path: str
    source: Any
    read_only: bool = False

    def __post_init__(self) -> None:
        path = self.guest_path
        if not path.startswith("/") or path == "/" or not set(path) <= _SAFE_GUEST_PATH:
            raise VMError(
                f"mount point {path!r} must be an absolute guest path other than / "
                "made of letters, digits and / _ . -"
            )
        if any(p in ("", ".", "..") for p in path.strip("/").split("/")):
            raise VMError(f"mount point {path!r} must be a normalised path")
        if isinstance(self.source, str | os.PathLike):
            directory = Path(self.source).absolute()
            if not directory.is_dir():
                raise VMError(f"mount source {directory} is not a directory")
            object.__setattr__(self, "source", directory)


@dataclasses.dataclass
class Metrics:
    guest_uptime_s: float
    host_cpu_s: float
    host_rss_bytes: int
    disk_bytes_read: int
    disk_bytes_written: int
    blocks_fetched: int
    blocks_uploaded: int


RUNTIME_PREFIX = "lanekit-vm-"
_OWNER = "owner"


def _process_identity(pid: int) -> str | None:
    """``pid:start-time``: a pid alone may be reused by another process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return f"{pid}:{fields[19]}"


def _sweep_runtime_dirs(base: Path) -> None:
    """Remove runtime dirs whose launcher died without cleaning up (kill -9): each names
    its owner; qemu and virtiofsd die with their parent, FUSE mounts unmount themselves."""
    for path in base.glob(f"{RUNTIME_PREFIX}*"):
        try:
            owner = (path / _OWNER).read_text()
        except OSError:
            continue  # not ours to judge, or already gone
        pid = owner.partition(":")[0]
        if pid.isdigit() and _process_identity(int(pid)) != owner:
            shutil.rmtree(path, ignore_errors=True)


def _runtime_dir() -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    _sweep_runtime_dirs(base)
    path = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=base))
    os.chmod(path, 0o700)
    identity = _process_identity(os.getpid())
    assert identity is not None
    (path / _OWNER).write_text(identity)
    return path


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


def _host_tsc_khz() -> int | None:
    """The host's TSC rate, which a TCG guest's TSC runs at, if the TSC is constant."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)
    except OSError:
        return None
    if "constant_tsc" not in info:
        return None
    for line in info.splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the launching thread dies (kill -9)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.asynccontextmanager
async def _process(argv: list[str], log: Path, name: str) -> AsyncIterator[trio.Process]:
    """A child in its own process group, killed with the group on the way out."""
    with open(log, "ab") as out:  # noqa: ASYNC230  (creating an empty log)
        proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                raise VMError(f"{name} (pid {proc.pid}) did not exit after SIGKILL")


async def _wait_for_socket(path: Path, proc: trio.Process, what: str, log: Path) -> None:
    """Wait for a child's unix socket, then make it owner-only (0600)."""
    with trio.move_on_after(30):
        while not path.exists():  # noqa: ASYNC240  (a stat in a polling loop)
            if proc.returncode is not None:
                raise BootError(f"{what} exited with {proc.returncode}: {_tail(log)}")
            await trio.sleep(0.02)
        os.chmod(path, 0o600)
        return
    raise BootError(f"{what} did not create {path} within 30 s: {_tail(log)}")


class Machine:
    """A booted sandbox. Commands and files go through the guest agent."""

    def __init__(
        self,
        sandbox: Sandbox,
        entry: ImageEntry,
        agent: GuestAgent,
        qemu: trio.Process,
        disk: Disk,
        runtime: Path,
        cwd: str,
    ) -> None:
        self.sandbox = sandbox
        self.entry = entry
        self.agent = agent
        self.qemu = qemu
        self.disk = disk
        self.runtime = runtime
        self.cwd = cwd
        self._healthy = False
        self._health_lock = trio.Lock()
        self._stopped = False

    @property
    def console_log(self) -> Path:
        return self.runtime / "console.log"

    def _check_running(self) -> None:
        if self._stopped:
            raise VMError("the sandbox has been stopped")
        if self.qemu.returncode is not None:
            raise VMError(
                f"the VM exited (qemu status {self.qemu.returncode}); console:\n"
                f"{_tail(self.console_log)}"
            )

    async def _exec(
        self,
        argv: Sequence[str],
        cwd: str | None,
        env: Mapping[str, str] | None,
        stdin: bytes | None,
        timeout: float | None,
    ) -> ExecResult:
        self._check_running()
        if not argv:
            raise VMError("exec needs a non-empty argv")
        environment = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        environment.update(env or {})
        for key, value in environment.items():
            if not key or "=" in key or "\0" in key + value:
                raise VMError(f"invalid environment variable {key!r}")
        pid = await self.agent.exec_start(
            "/lanekit/run",
            [cwd or self.cwd, *argv],
            [f"{k}={v}" for k, v in environment.items()],
            stdin,
        )
        deadline = trio.current_time() + timeout if timeout is not None else float("inf")
        # Poll often at first (a status request costs the guest about half a millisecond)
        # so a short command is seen to finish soon after it does.
        delay = 0.002
        killed = False
        while True:
            status = await self.agent.exec_status(pid)
            if status.get("exited"):
                break
            if not killed and trio.current_time() >= deadline:
                await self.agent.exec_start("/lanekit/kill-tree", [str(pid)], [], None)
                killed = True
            await trio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        sig = status.get("signal")
        code = 128 + int(sig) if sig is not None else int(status.get("exitcode", -1))
        result = ExecResult(code, status.get("out-data", b""), status.get("err-data", b""), sig)
        if killed:
            raise ExecTimeout(f"{argv[0]} ran past its {timeout} s timeout and was killed", result)
        return result

    async def wait_healthy(self) -> None:
        """Run the image's healthcheck until it passes or its timeout ends (once per boot)."""
        async with self._health_lock:
            if self._healthy:
                return
            hc = self.entry.healthcheck
            deadline = trio.current_time() + hc.timeout_ms / 1000
            registry = self.sandbox.registry
            while True:
                remaining = max(deadline - trio.current_time(), 0.5)
                try:
                    result = await self._exec(hc.argv, "/", None, None, remaining)
                except ExecTimeout as exc:
                    assert isinstance(exc.result, ExecResult)
                    result = exc.result
                if result.exit_code == hc.expected_exit_code:
                    self._healthy = True
                    with contextlib.suppress(ImageNotFoundError):
                        await trio.to_thread.run_sync(registry.mark_healthy, self.entry.id)
                    return
                if trio.current_time() >= deadline:
                    message = (
                        f"image {self.entry.id!r}: healthcheck {list(hc.argv)} exited "
                        f"{result.exit_code}, expected {hc.expected_exit_code}; "
                        f"stdout: {result.stdout_text[-500:]!r} "
                        f"stderr: {result.stderr_text[-500:]!r}"
                    )
                    with contextlib.suppress(ImageNotFoundError):
                        await trio.to_thread.run_sync(
                            registry.mark_unhealthy, self.entry.id, message
                        )
                    raise HealthcheckFailed(message)
                await trio.sleep(0.2)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run argv in the guest; raises :class:`ExecTimeout` (with the result) past ``timeout``."""
        await self.wait_healthy()
        return await self._exec(argv, cwd, env, stdin, timeout)

    async def exec_text(self, argv: Sequence[str], **kwargs: Any) -> str:
        """stdout as text; a non-zero exit is an error carrying stderr."""
        result = await self.exec(argv, **kwargs)
        if result.exit_code != 0:
            raise VMError(f"{list(argv)} exited {result.exit_code}: {result.stderr_text[-2000:]}")
        return result.stdout_text

    async def read_file(self, path: str) -> bytes:
        self._check_running()
        return await self.agent.read_file(path)

    async def write_file(self, path: str, data: bytes | str) -> None:
        self._check_running()
        await self.agent.write_file(path, data.encode() if isinstance(data, str) else data)

    async def list_dir(self, path: str) -> list[str]:
        result = await self._exec(
            ["/lanekit/busybox", "find", path, "-mindepth", "1", "-maxdepth", "1", "-print0"],
            "/", None, None, 60,
        )  # fmt: skip
        if result.exit_code != 0:
            raise VMError(f"cannot list {path}: {result.stderr_text.strip()}")
        return sorted(p.rsplit("/", 1)[-1] for p in result.stdout.decode().split("\0") if p)

    async def metrics(self) -> Metrics:
        self._check_running()
        uptime = float((await self.agent.read_file("/proc/uptime")).split()[0])
        with open(f"/proc/{self.qemu.pid}/stat") as f:  # noqa: ASYNC230  (procfs)
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = 0
        with open(f"/proc/{self.qemu.pid}/status") as f:  # noqa: ASYNC230  (procfs)
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        store_stats = getattr(self.disk.store, "stats", None)
        return Metrics(
            guest_uptime_s=uptime,
            host_cpu_s=cpu,
            host_rss_bytes=rss,
            disk_bytes_read=self.disk.stats.bytes_read,
            disk_bytes_written=self.disk.stats.bytes_written,
            blocks_fetched=getattr(store_stats, "blocks_fetched", 0),
            blocks_uploaded=getattr(store_stats, "blocks_uploaded", 0),
        )

    async def stop(self, timeout: float = 30.0) -> None:
        """Power the guest off (it syncs and remounts read-only); SIGKILL if it will not."""
        if self._stopped:
            return
        self._stopped = True
        if self.qemu.returncode is None:
            with trio.move_on_after(timeout):
                with contextlib.suppress(GuestAgentError, OSError, trio.BrokenResourceError):
                    with trio.move_on_after(5):
                        await self.agent.exec_start("/lanekit/poweroff", [], [], None)
                await self.qemu.wait()
        await self.kill()

    async def kill(self) -> None:
        """Stop qemu at once (the root disk keeps whatever the guest had flushed)."""
        self._stopped = True
        if self.qemu.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.qemu.pid, signal.SIGKILL)
            await self.qemu.wait()
        await self.agent.aclose()


class Sandbox:
    """A sandbox definition; boot it as many times as needed with per-boot mounts."""

    def __init__(
        self,
        image: str,
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        disk: str | None = None,
        disk_size: int | None = None,
        accel: str | None = None,
        home: Path | None = None,
        boot_timeout: float = 180.0,
        s3_endpoint: str | None = None,
        build_missing: bool = True,
    ) -> None:
        if not 1 <= cpus <= 64:
            raise VMError("cpus must be between 1 and 64")
        if not 64 <= memory_mib <= 65536:
            raise VMError("memory must be between 64 and 65536 MiB")
        self.image = image
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.disk_url = disk
        self.disk_size = disk_size
        self.accel = accel
        self.home = home or lanekit_home()
        self.boot_timeout = boot_timeout
        self.s3_endpoint = s3_endpoint
        self.build_missing = build_missing
        self.registry, self.images, self.kernels = state_paths(self.home)

    def _resolve_image(self) -> tuple[ImageEntry, Path]:
        entry = self.registry.lookup(self.image)
        if entry.digest is None or not self.images.has(entry.digest):
            if not (self.build_missing and entry.id in RECIPES):
                raise ImageNotFoundError(
                    f"image {entry.id!r} is registered but not built here: run "
                    f"`lanekit image build {entry.id}` or `lanekit image pull`"
                )
            meta = self.images.build_recipe(entry.id)
            entry = self.registry.pin(entry.id, meta.digest)
        assert entry.digest is not None
        return entry, self.images.path(entry.digest)

    @contextlib.asynccontextmanager
    async def _root_disk(self, runtime: Path, image: Path, digest: str) -> AsyncIterator[Disk]:
        """The root disk: on first use a copy-on-write disk over the image. A disk that
        was created without a base (an image imported into the object store, so a boot
        fetches every block from there) is opened as it is."""
        base: BaseImage | None = BaseImage(image, digest=digest)
        try:
            if self.disk_url is None:
                target: Any = (blockstore.LocalObjectStore(runtime / "root-store"), "root")
            else:
                target = self.disk_url
            objects, name, _ = blockstore.resolve(target, self.s3_endpoint)
            if name not in await trio.to_thread.run_sync(blockstore.list_disks, objects):
                assert base is not None
                size = max(self.disk_size or 0, base.size)
                with contextlib.suppress(blockstore.DiskExists):
                    await blockstore.create((objects, name), size, base=base)
            else:
                info = await trio.to_thread.run_sync(blockstore.disk_info, objects, name)
                if info["base_digest"] is None:
                    assert base is not None
                    base.close()
                    base = None
            async with blockstore.open_disk(
                (objects, name), base=base, spill_dir=str(runtime)
            ) as disk:
                yield disk
        finally:
            if base is not None:
                base.close()

    async def _host_filesystems(
        self, stack: contextlib.AsyncExitStack, runtime: Path, mounts: Sequence[Mount]
    ) -> list[Path]:
        """The host directory virtiofsd exports for each mount.

        Writable host directories are exported as they are. Filesystem objects, and host
        directories mounted read-only (enforced on the host, not by the guest's mount
        flags), are served by one FUSE mount — a :class:`vfs.Hub`, since a process can
        hold only one — with a top-level directory per mount.
        """
        import vfs

        members: dict[str, vfs.Filesystem] = {}
        for i, mount in enumerate(mounts):
            source = mount.source
            if isinstance(source, Path):
                if not mount.read_only:
                    continue
                source = vfs.PassthroughFS(source, read_only=True)
            members[f"fs{i}"] = vfs.ReadOnlyFS(source) if mount.read_only else source
        hub = runtime / "hub"
        if members:
            hub.mkdir()
            await stack.enter_async_context(vfs.mount(vfs.Hub(members), hub))
        return [
            hub / f"fs{i}" if f"fs{i}" in members else Path(m.source) for i, m in enumerate(mounts)
        ]

    @contextlib.asynccontextmanager
    async def _virtiofsd(
        self, runtime: Path, index: int, directory: Path, mount: Mount
    ) -> AsyncIterator[str]:
        """Run virtiofsd for one mount; yields the kernel command line fragment."""
        socket_path = runtime / f"fs{index}.sock"
        log = runtime / f"virtiofsd{index}.log"
        argv = [
            VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={directory}",
            "-o", "cache=auto", "-o", "xattr", "-o", "sandbox=chroot",
        ]  # fmt: skip
        async with _process(argv, log, "virtiofsd") as proc:
            await _wait_for_socket(socket_path, proc, "virtiofsd", log)
            mode = "ro" if mount.read_only else "rw"
            yield f"lanekit.mount=fs{index}:{mount.guest_path}:{mode}"

    def _qemu_argv(
        self, runtime: Path, accel: str, kernel: Path, initramfs: Path, cmdline: str, mounts: int
    ) -> list[str]:
        mem = f"{self.memory_mib}M"
        argv = [
            QEMU, "-name", "lanekit",
            "-M", "microvm,memory-backend=mem,pit=on",
            "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.cpus), "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none",
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(kernel), "-initrd", str(initramfs), "-append", cmdline,
            "-serial", f"file:{runtime / 'console.log'}",
            "-blockdev",
            f"driver=nbd,node-name=root,server.type=unix,server.path={runtime / 'nbd.sock'},"
            "export=root,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=qga,path={runtime / 'qga.sock'},server=on,wait=off",
            "-device", f"virtserialport,chardev=qga,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
        for i in range(mounts):
            argv += [
                "-chardev", f"socket,id=fs{i},path={runtime / f'fs{i}.sock'}",
                "-device", f"vhost-user-fs-device,queue-size=1024,chardev=fs{i},tag=fs{i}",
            ]  # fmt: skip
        return argv

    @contextlib.asynccontextmanager
    async def boot(
        self, mounts: Sequence[Mount] | Mapping[str, Any] = (), *, cwd: str = "/"
    ) -> AsyncIterator[Machine]:
        """Boot a VM; on exit it is stopped (or killed) and everything it started is gone."""
        if isinstance(mounts, Mapping):
            mounts = [Mount(path, source) for path, source in mounts.items()]
        if len({m.guest_path for m in mounts}) != len(mounts):
            raise VMError("two mounts at the same guest path")
        async with contextlib.AsyncExitStack() as stack:
            runtime = await trio.to_thread.run_sync(_runtime_dir)
            stack.callback(shutil.rmtree, runtime, True)
            entry, image = await trio.to_thread.run_sync(self._resolve_image)
            assets = await trio.to_thread.run_sync(self.kernels.ensure)
            accel = await trio.to_thread.run_sync(
                choose_accelerator, assets.kernel, self.home / "accel.json", self.accel
            )
            assert entry.digest is not None
            disk = await stack.enter_async_context(self._root_disk(runtime, image, entry.digest))
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            await nursery.start(
                lambda task_status: serve_device(
                    disk, f"unix:{runtime / 'nbd.sock'}", name="root", task_status=task_status
                )
            )
            cmdline = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
            tsc_khz = _host_tsc_khz() if accel == "tcg" else None
            if tsc_khz:
                # Under TCG the PIT calibration of the TSC fails now and then, and the
                # kernel then hangs early in boot; tell it the rate instead.
                cmdline += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
            exported = await self._host_filesystems(stack, runtime, mounts)
            for i, (mount, directory) in enumerate(zip(mounts, exported, strict=True)):
                fragment = self._virtiofsd(runtime, i, directory, mount)
                cmdline.append(await stack.enter_async_context(fragment))
            argv = self._qemu_argv(
                runtime, accel, assets.kernel, assets.initramfs, " ".join(cmdline), len(mounts)
            )
            qemu = await stack.enter_async_context(_process(argv, runtime / "qemu.log", "qemu"))
            agent = GuestAgent(str(runtime / "qga.sock"))
            machine = Machine(self, entry, agent, qemu, disk, runtime, cwd)
            stack.push_async_callback(_shielded, machine.stop)
            await _wait_for_socket(runtime / "qga.sock", qemu, "qemu", runtime / "qemu.log")
            with trio.move_on_after(self.boot_timeout) as waiting:
                async with trio.open_nursery() as boot:

                    async def watch_qemu() -> None:
                        await qemu.wait()
                        boot.cancel_scope.cancel()

                    boot.start_soon(watch_qemu)
                    await agent.wait_ready()
                    boot.cancel_scope.cancel()
            if qemu.returncode is not None:
                raise BootError(
                    f"qemu exited with {qemu.returncode} during boot: "
                    f"{_tail(runtime / 'qemu.log')}\nconsole:\n{_tail(machine.console_log)}"
                )
            if waiting.cancelled_caught:
                raise BootError(
                    f"the guest agent did not answer within {self.boot_timeout} s; "
                    f"console:\n{_tail(machine.console_log)}"
                )
            yield machine

    @contextlib.contextmanager
    def run(
        self, mounts: Sequence[Mount] | Mapping[str, Any] = (), *, cwd: str = "/"
    ) -> Iterator[SyncMachine]:
        """The blocking form of :meth:`boot`, for code that is not async."""
        with blocking(lambda: self.boot(mounts, cwd=cwd)) as (machine, token):
            yield SyncMachine(machine, token)


async def _shielded(fn: Any) -> None:
    with trio.CancelScope(shield=True):
        await fn()


class SyncMachine:
    """:class:`Machine`'s methods, callable from ordinary threads."""

    def __init__(self, machine: Machine, token: trio.lowlevel.TrioToken) -> None:
        self._machine = machine
        self._token = token

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)

    def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        return self._call(self._machine.exec, argv, **kwargs)

    def exec_text(self, argv: Sequence[str], **kwargs: Any) -> str:
        return self._call(self._machine.exec_text, argv, **kwargs)

    def read_file(self, path: str) -> bytes:
        return self._call(self._machine.read_file, path)

    def write_file(self, path: str, data: bytes | str) -> None:
        self._call(self._machine.write_file, path, data)

    def list_dir(self, path: str) -> list[str]:
        return self._call(self._machine.list_dir, path)

    def metrics(self) -> Metrics:
        return self._call(self._machine.metrics)

    def stop(self) -> None:
        self._call(self._machine.stop)

    def kill(self) -> None:
        self._call(self._machine.kill)
