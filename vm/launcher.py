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
import dataclasses
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from blockstore.concurrency import Services, blocking, first_failure
from blockstore.identity import process_identity
from blockstore.serve.fusefile import clear_dead_fuse_mount
from blockstore.serve.nbd import serve_device

from .accel import QEMU, choose_accelerator
from .agent.patches import Patch, apply_patches
from .errors import BootError, GuestAgentError, ImageNotFoundError, VMError
from .guest import AGENT_PORT_NAME
from .images import RECIPES, not_built_message
from .machine import Machine, SyncMachine, check_resources, describe_exit, tail
from .net import Network, NetworkConfig, as_config, open_network
from .proc import Child, open_child
from .registry import ImageEntry
from .rootdisk import DiskOptions, RootDisk, root_disk
from .state import lanekit_home, state_paths
from .volumes import VolumeAttachment, attach_volumes, check_guest_path

log = logging.getLogger(__name__)

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@dataclasses.dataclass(frozen=True)
class Mount:
    """``source``: a host directory, or a :mod:`vfs` filesystem object served over FUSE."""

    guest_path: str
    source: Any
    read_only: bool = False

    def __post_init__(self) -> None:
        check_guest_path(self.guest_path)
        if isinstance(self.source, str | os.PathLike):
            directory = Path(self.source).absolute()
            if not directory.is_dir():
                raise VMError(f"mount source {directory} is not a directory")
            object.__setattr__(self, "source", directory)


RUNTIME_PREFIX = "lanekit-vm-"
_OWNER = "owner"


def _sweep_runtime_dirs(base: Path) -> None:
    """Remove runtime dirs whose launcher died without cleaning up (kill -9): each names
    its owner; qemu and virtiofsd die with their parent, and the hub's FUSE mount unmounts
    itself, but for fusermount3's race with a killed server (see clear_dead_fuse_mount),
    which leaves it dead: it is cleared here, else the directory could never go."""
    for path in base.glob(f"{RUNTIME_PREFIX}*"):
        try:
            owner = (path / _OWNER).read_text()
        except OSError:
            continue  # not ours to judge, or already gone
        pid = owner.partition(":")[0]
        if pid.isdigit() and process_identity(int(pid)) != owner:
            with contextlib.suppress(OSError):
                clear_dead_fuse_mount(path / "hub")
            shutil.rmtree(path, ignore_errors=True)


def _runtime_dir() -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    _sweep_runtime_dirs(base)
    path = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=base))
    os.chmod(path, 0o700)
    identity = process_identity(os.getpid())
    assert identity is not None
    (path / _OWNER).write_text(identity)
    return path


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


@contextlib.asynccontextmanager
async def _process(
    argv: list[str], log: Path, name: str, preexec: Callable[[], None] | None = None
) -> AsyncIterator[Child]:
    """A child in its own process group, killed with the group on the way out."""
    with open(log, "ab") as out:  # noqa: ASYNC230  (creating an empty log)
        proc = await open_child(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=preexec
        )
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            proc.kill_group()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                raise VMError(f"{name} (pid {proc.pid}) did not exit after SIGKILL")


async def _wait_for_socket(path: Path, proc: Child, what: str, log: Path) -> None:
    """Wait for a child's unix socket, then make it owner-only (0600)."""
    with trio.move_on_after(30):
        while not path.exists():  # noqa: ASYNC240  (a stat in a polling loop)
            if proc.returncode is not None:
                raise BootError(f"{what} exited with {proc.returncode}: {tail(log)}")
            await trio.sleep(0.02)
        os.chmod(path, 0o600)
        return
    raise BootError(f"{what} did not create {path} within 30 s: {tail(log)}")


class Sandbox:
    """A sandbox definition; boot it as many times as needed with per-boot mounts.

    ``image``: a registry id, or an :class:`~vm.registry.ImageEntry` (with its digest) for
    an image this host's registry need not know. ``disk``, the root disk:

    - ``None``: ephemeral, discarded at stop;
    - a disk URL (``file:///DIR/NAME``, ``s3://BUCKET/PREFIX/NAME``, ``URL@TAG``);
    - ``(object_store, name)``: the disk ``name`` in any :class:`blockstore.ObjectStore`
      (your own subclass included), created on the image at first use, leased, fenced;
    - an :class:`blockstore.ObjectStore` alone: its disk named ``root``;
    - a :class:`blockstore.BlockStore`: your own block storage for the copy-on-write
      blocks over the image (torkbot's ``rootfs.cow``); there is no lease, so attach it
      to one running sandbox at a time, and always over the same image.

    ``volumes``: block-store disks with a filesystem, attached at guest paths (see
    :mod:`vm.volumes`). ``lease_ttl``: how long a crashed holder's leases on the disks
    outlive it.
    """

    runtime_variant = "default"
    """Which guest runtime the initramfs carries (see ``vm.guest.VARIANTS``)."""

    def __init__(
        self,
        image: str | ImageEntry,
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        disk: RootDisk = None,
        disk_size: int | None = None,
        accel: str | None = None,
        home: Path | None = None,
        boot_timeout: float = 180.0,
        s3_endpoint: str | None = None,
        build_missing: bool = True,
        patches: Sequence[Patch] = (),
        force: bool = False,
        lease_wait: float | None = None,
        notice: Callable[[str], None] | None = None,
        network: NetworkConfig | str | None = None,
        volumes: Sequence[VolumeAttachment] = (),
        lease_ttl: float | None = None,
    ) -> None:
        check_resources(cpus, memory_mib)
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
        self.patches = list(patches)
        self.force = force
        self.lease_wait = lease_wait
        self.notice = notice or (lambda line: log.info("%s", line))
        self.network = as_config(network)
        """The sandbox's network (:mod:`vm.net`); ``none``, no network device, by default."""
        self.volumes = list(volumes)
        self.lease_ttl = lease_ttl
        self.registry, self.images, self.kernels = state_paths(self.home)

    def _entry(self) -> ImageEntry:
        if isinstance(self.image, ImageEntry):
            return self.image
        return self.registry.lookup(self.image)

    def _local_image(self) -> tuple[str, Path]:
        """The registry image's (digest, path) on this host, built first if it is a
        built-in recipe this host has not built (saying so: it takes a while)."""
        entry = self._entry()
        if isinstance(self.image, ImageEntry) and entry.digest is not None:
            if not self.images.has(entry.digest):
                raise ImageNotFoundError(
                    f"image sha256:{entry.digest} ({entry.id}) is not on this host: "
                    f"`lanekit image pull sha256:{entry.digest} --store URL`"
                )
            return entry.digest, self.images.path(entry.digest)
        if entry.digest is None or not self.images.has(entry.digest):
            if not (self.build_missing and entry.id in RECIPES):
                raise ImageNotFoundError(not_built_message(entry))
            self.notice(f"building image {entry.id!r} for its first use on this host")
            meta = self.images.build_recipe(entry.id)
            entry = self.registry.pin(entry.id, meta.digest)
        assert entry.digest is not None
        return entry.digest, self.images.path(entry.digest)

    def _disk_options(self) -> DiskOptions:
        return DiskOptions(
            self.disk_url, self.disk_size, self.s3_endpoint, self.force, self.lease_wait,
            self.notice, self.lease_ttl,
        )  # fmt: skip

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
        if not isinstance(mount.source, Path):
            # A vfs filesystem is edited by host code while the guest runs (the Paths
            # API): the guest revalidates attributes on every look, so it never sees new
            # bytes at an old size (virtiofs keeps them 1 s otherwise).
            argv += ["-o", "timeout=0"]
        async with _process(argv, log, "virtiofsd") as proc:
            await _wait_for_socket(socket_path, proc, "virtiofsd", log)
            mode = "ro" if mount.read_only else "rw"
            yield f"lanekit.mount=fs{index}:{mount.guest_path}:{mode}"

    def _qemu_argv(
        self,
        runtime: Path,
        accel: str,
        kernel: Path,
        initramfs: Path,
        cmdline: str,
        mounts: int,
        devices: Sequence[str] = (),
    ) -> list[str]:
        mem = f"{self.memory_mib}M"
        # vhost-user (virtiofsd) needs the guest's RAM in a shared memfd. Without mounts it
        # is private anonymous memory: a page the guest never touched then costs nothing
        # when a memory snapshot reads it (a memfd allocates every page read from it: the
        # pause of a 1 GiB guest spent 2.5 s filling 640 MiB it then sent as zeros).
        backend = (
            f"memory-backend-memfd,id=mem,size={mem},share=on"
            if mounts
            else f"memory-backend-ram,id=mem,size={mem}"
        )
        argv = [
            QEMU, "-name", "lanekit",
            "-M", "microvm,memory-backend=mem,pit=on",
            "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.cpus), "-m", mem,
            "-object", backend,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none",
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(kernel), "-initrd", str(initramfs), "-append", cmdline,
            "-serial", f"file:{runtime / 'console.log'}",
            "-blockdev",
            f"driver=nbd,node-name=root,server.type=unix,server.path={runtime / 'nbd.sock'},"
            "export=root,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={runtime / 'agent.sock'},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            "-qmp", f"unix:{runtime / 'qmp.sock'},server=on,wait=off",
        ]  # fmt: skip
        for i in range(mounts):
            argv += [
                "-chardev", f"socket,id=fs{i},path={runtime / f'fs{i}.sock'}",
                "-device", f"vhost-user-fs-device,queue-size=1024,chardev=fs{i},tag=fs{i}",
            ]  # fmt: skip
        return argv + list(devices) + self.extra_qemu_args(runtime)

    async def qemu_started(self, machine: Machine) -> None:
        """Called once qemu runs, before the guest agent is awaited (a resume feeds qemu
        its memory snapshot here: see :mod:`vm.snapshot`)."""

    def extra_qemu_args(self, runtime: Path) -> list[str]:
        """More qemu arguments for one boot (the benchmarks add serial ports)."""
        return []

    @contextlib.asynccontextmanager
    async def boot(
        self, mounts: Sequence[Mount] | Mapping[str, Any] = (), *, cwd: str = "/"
    ) -> AsyncIterator[Machine]:
        """Boot a VM; on exit it is stopped (or killed) and everything it started is gone.
        Errors come out as themselves, not wrapped in exception groups."""
        try:
            async with self._boot(mounts, cwd) as machine:
                yield machine
        except BaseExceptionGroup as group:
            raise first_failure(group) from None

    @contextlib.asynccontextmanager
    async def _boot(
        self, mounts: Sequence[Mount] | Mapping[str, Any], cwd: str
    ) -> AsyncIterator[Machine]:
        if isinstance(mounts, Mapping):
            mounts = [Mount(path, source) for path, source in mounts.items()]
        if len({m.guest_path for m in mounts}) != len(mounts):
            raise VMError("two mounts at the same guest path")
        async with contextlib.AsyncExitStack() as stack:
            runtime = await trio.to_thread.run_sync(_runtime_dir)
            stack.callback(shutil.rmtree, runtime, True)
            entry = await trio.to_thread.run_sync(self._entry)
            assets = await trio.to_thread.run_sync(
                lambda: self.kernels.ensure(variant=self.runtime_variant)
            )
            accel = await trio.to_thread.run_sync(
                choose_accelerator, assets.kernel, self.home / "accel.json", self.accel
            )
            disk = await stack.enter_async_context(
                root_disk(self._disk_options(), runtime, self.images, self._local_image)
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            services = Services(nursery)
            stack.callback(services.close)
            nbd = f"unix:{runtime / 'nbd.sock'}"
            await services.start(functools.partial(serve_device, disk, nbd, name="root"))
            cmdline = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
            tsc_khz = _host_tsc_khz() if accel == "tcg" else None
            if tsc_khz:
                # Under TCG the PIT calibration of the TSC fails now and then, and the
                # kernel then hangs early in boot; tell it the rate instead.
                cmdline += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
            volumes = await stack.enter_async_context(
                attach_volumes(self.volumes, runtime, services, self._disk_options())
            )
            cmdline += volumes.cmdline
            exported = await self._host_filesystems(stack, runtime, mounts)
            for i, (mount, directory) in enumerate(zip(mounts, exported, strict=True)):
                fragment = self._virtiofsd(runtime, i, directory, mount)
                cmdline.append(await stack.enter_async_context(fragment))
            argv = self._qemu_argv(
                runtime, accel, assets.kernel, assets.initramfs, " ".join(cmdline), len(mounts),
                volumes.qemu_args,
            )  # fmt: skip
            network = None
            if self.network.enabled:  # set up, rules and all, before qemu can send a packet
                network = await stack.enter_async_context(
                    open_network(self.network, runtime.name, services)
                )
                argv += network.qemu_args()
            qemu = await stack.enter_async_context(
                _process(
                    argv, runtime / "qemu.log", "qemu", network.join_hook() if network else None
                )
            )
            machine = Machine(self, entry, qemu, disk, runtime, cwd, services)
            machine.accel = accel
            machine.network = network
            machine.volumes = volumes.disks
            machine.mounts = list(mounts)
            stack.push_async_callback(_shielded, machine.stop)
            services.start_soon(self._watch_fencing, machine)
            if network is not None:
                services.start_soon(self._watch_network, machine, network)
            await _wait_for_socket(runtime / "qmp.sock", qemu, "qemu", runtime / "qemu.log")
            await self.qemu_started(machine)
            await self._wait_for_agent(machine)
            if network is not None:
                await network.prepare_guest(machine.fs, machine.exit_code_of)
            if self.patches:
                await apply_patches(await machine.session(), self.patches)
            yield machine

    async def _watch_fencing(self, machine: Machine) -> None:
        """A newer writer took the root disk over: stop the guest at once, so it does not
        go on working on writes that can never reach the disk."""
        stores = [machine.disk.store, *(d.store for d in machine.volumes.values())]
        while not any(getattr(store, "fenced", False) for store in stores):
            await trio.sleep(0.5)
        machine.fenced = True
        self.notice(
            "fenced: this host may no longer commit to the disk (another host took it over, "
            "or the store was out of reach for longer than the lease TTL); the sandbox "
            "stops, and what it wrote since then is not on the disk"
        )
        await machine.kill()

    async def _watch_network(self, machine: Machine, network: Network) -> None:
        """A secret went where it may not, and its action is block-and-terminate: kill the
        sandbox at once, as after fencing."""
        reason = await network.wait_terminated()
        machine.terminated = reason
        self.notice(f"terminated: {reason}")
        await machine.kill()

    async def _wait_for_agent(self, machine: Machine) -> None:
        """Until the guest agent answers; if the guest dies or hangs instead, a BootError
        with the console's last lines and the likely cause."""
        log = machine.runtime / "qemu.log"
        await _wait_for_socket(machine.agent_socket, machine.qemu, "qemu", log)
        failure: BaseException | None = None
        with trio.move_on_after(self.boot_timeout) as waiting:
            async with trio.open_nursery() as boot:

                async def watch_qemu() -> None:
                    await machine.qemu.wait()
                    boot.cancel_scope.cancel()

                boot.start_soon(watch_qemu)
                try:
                    await machine.session()
                except (GuestAgentError, VMError) as exc:
                    failure = exc
                boot.cancel_scope.cancel()
        if failure is not None:  # the channel may break a moment before qemu is gone
            with trio.move_on_after(2):
                await machine.qemu.wait()
        console = tail(machine.console_log)
        qemu_log = tail(machine.runtime / "qemu.log")
        hint = boot_hint(console, machine.accel)
        if machine.qemu.returncode is not None:
            raise BootError(
                f"the guest did not boot: {describe_exit(machine.qemu.returncode)}{hint}"
                f"\nconsole:\n{console}\nqemu log:\n{qemu_log}"
            )
        if waiting.cancelled_caught:
            raise BootError(
                f"the guest agent did not answer within {self.boot_timeout:.0f} s{hint}"
                f"\nconsole:\n{console}"
            )
        if failure is not None:
            raise BootError(f"the guest agent failed: {failure}\nconsole:\n{console}")

    @contextlib.contextmanager
    def run(
        self, mounts: Sequence[Mount] | Mapping[str, Any] = (), *, cwd: str = "/"
    ) -> Iterator[SyncMachine]:
        """The blocking form of :meth:`boot`, for code that is not async."""
        with blocking(lambda: self.boot(mounts, cwd=cwd)) as (machine, token):
            yield SyncMachine(machine, token)


def boot_hint(console: str, accel: str) -> str:
    """The likely cause of a boot that failed, from what the guest printed."""
    if accel == "kvm" and "lanekit-initramfs" not in console:
        return (
            " (it ran under KVM, which on some hosts cannot run lanekit's guest kernel, a "
            "paravirtual KVM for one: try --accel tcg, or unset LANEKIT_ACCEL)"
        )
    if "cannot mount /dev/vda" in console:
        return (
            " (the root disk holds no filesystem lanekit can boot: a blank disk, or one "
            "not made from a lanekit image?)"
        )
    if "has no /lanekit" in console:
        return " (the root disk is not a lanekit image: build it with `lanekit image build`)"
    if "Kernel panic" in console:
        return " (the guest kernel panicked)"
    return ""


async def _shielded(fn: Any) -> None:
    with trio.CancelScope(shield=True):
        await fn()
