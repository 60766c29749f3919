"""Guest kernel and initramfs: Debian's cloud kernel, and a tiny initramfs built here.

The cloud kernel builds virtio, virtio_blk, virtiofs and friends as modules and ships no
``modules.dep`` we could use in a busybox initramfs, so the initramfs carries exactly the
modules we need and loads them in dependency order, computed here from each module's
``depends=`` field (``modinfo``). It also carries the guest runtime (:mod:`vm.guest`):
it mounts the root disk, bind-mounts the runtime at the root's ``/lanekit``, moves the
root over ``/`` and runs ``/lanekit/init`` there. (Not ``switch_root``: that empties the
initramfs, runtime included.) Both are cached under ``$LANEKIT_HOME/kernels/<version>/``
and rebuilt only when an input (kernel version, module set, scripts, host binaries)
changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cpio import CpioWriter
from .errors import KernelError
from .guest import runtime_files, runtime_fingerprint
from .proc import run_tool

KERNEL_PACKAGE = "linux-image-cloud-amd64"
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "fuse",
    "virtiofs",
    "overlay",
)

INIT_SCRIPT = r"""#!/lanekit/busybox sh
# lanekit initramfs: load the virtio modules, mount the root disk, put the guest runtime
# at its /lanekit, make it the root and run /lanekit/init there.
bb=/lanekit/busybox
$bb mount -t devtmpfs dev /dev
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
while read -r m; do
    $bb insmod /modules/$m.ko || echo "lanekit-initramfs: insmod $m failed" >/dev/console
done </modules.order
root=/dev/vda
rootflags=rw
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        lanekit.root=*) root="${arg#lanekit.root=}" ;;
        lanekit.rootflags=*) rootflags="${arg#lanekit.rootflags=}" ;;
        lanekit.poweroff) $bb poweroff -f ;;  # the benchmark's floor: kernel + modules only
    esac
done
$bb rm -rf /modules  # loaded: give their memory back
i=0
while [ ! -b "$root" ] && [ $i -lt 500 ]; do $bb usleep 10000; i=$((i + 1)); done
# Fewer, larger reads: each request costs the guest far more than its bytes do.
echo 1024 >"/sys/block/${root##*/}/queue/read_ahead_kb" 2>/dev/null
if ! $bb mount -t ext4 -o "$rootflags" "$root" /newroot; then
    echo "lanekit-initramfs: cannot mount $root" >/dev/console
    $bb poweroff -f
fi
if [ ! -d /newroot/lanekit ] && ! $bb mkdir /newroot/lanekit; then
    echo "lanekit-initramfs: $root has no /lanekit to mount the runtime on" >/dev/console
    $bb poweroff -f
fi
$bb mount --bind /lanekit /newroot/lanekit
$bb mount -o remount,bind,ro /newroot/lanekit
$bb mount --move /dev /newroot/dev
$bb umount /proc /sys
cd /newroot
$bb mount --move . /
exec $bb chroot . /lanekit/init
"""


@dataclasses.dataclass(frozen=True)
class KernelAssets:
    version: str
    kernel: Path
    initramfs: Path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    return run_tool(argv, " ".join(argv), error=KernelError, timeout=600, cwd=cwd)


def module_dependencies(paths: dict[str, Path], roots: Sequence[str]) -> dict[str, list[str]]:
    """``roots`` and everything they need, each with its ``depends=`` list (``modinfo``)."""
    deps: dict[str, list[str]] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in deps:
            continue
        if name not in paths:
            raise KernelError(f"module {name} is needed but the kernel package lacks it")
        raw = _run(["modinfo", "-F", "depends", str(paths[name])]).strip()
        deps[name] = [d.replace("-", "_") for d in raw.split(",") if d]
        pending.extend(deps[name])
    return deps


def load_order(deps: dict[str, list[str]]) -> list[str]:
    """The modules ordered so each comes after the modules it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise KernelError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dep in deps[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in sorted(deps):
        visit(name)
    return order


class KernelCache:
    """Kernels under ``root/<version>/``; ``ensure()`` fetches and builds what is missing."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def installed_versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if (p / "vmlinuz").is_file() and p.name[0] != "."
        )

    def ensure(self, refresh: bool = False, variant: str = "default") -> KernelAssets:
        """The newest cached kernel, fetching Debian's cloud kernel if none (or ``refresh``),
        and its initramfs with the runtime ``variant`` (see :data:`vm.guest.VARIANTS`)."""
        versions = self.installed_versions()
        stale = bool(versions) and not self._has_modules(versions[-1])
        version = self._fetch() if refresh or stale or not versions else versions[-1]
        initramfs = self._initramfs(version, variant)
        return KernelAssets(version, self.root / version / "vmlinuz", initramfs)

    def _has_modules(self, version: str) -> bool:
        """Whether a cached kernel carries every module the initramfs loads (a cache from
        before a module was added lacks it and is extracted again)."""
        modules = self.root / version / "modules"
        return all((modules / f"{m}.ko").is_file() for m in GUEST_MODULES)

    def _fetch(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".fetch-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o755)  # apt's _apt user downloads into it
            _run(["apt-get", "download", "-q", KERNEL_PACKAGE], cwd=work)
            meta = next(work.glob(f"{KERNEL_PACKAGE}_*.deb"))
            depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
            image_pkg = next(
                (d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")),
                None,
            )
            if image_pkg is None:
                raise KernelError(f"{KERNEL_PACKAGE} names no linux-image package: {depends!r}")
            version = image_pkg.strip().removeprefix("linux-image-")
            target = self.root / version
            if (target / "vmlinuz").is_file() and self._has_modules(version):
                return version
            _run(["apt-get", "download", "-q", image_pkg.strip()], cwd=work)
            deb = next(work.glob(f"{image_pkg.strip()}_*.deb"))
            tree = work / "tree"
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
            staged = work / version
            staged.mkdir()
            shutil.copy2(tree / "boot" / f"vmlinuz-{version}", staged / "vmlinuz")
            shutil.copy2(tree / "boot" / f"config-{version}", staged / "config")
            modules = staged / "modules"
            modules.mkdir()
            found = {p.stem.replace("-", "_"): p for p in tree.glob("lib/modules/*/kernel/**/*.ko")}
            for name, path in found.items():
                if name in GUEST_MODULES or name.startswith(("virtio", "fuse")):
                    shutil.copy2(path, modules / f"{name}.ko")
            missing = [m for m in GUEST_MODULES if not (modules / f"{m}.ko").exists()]
            if missing:
                raise KernelError(f"kernel {version} lacks modules {missing}")
            if target.exists():  # cached before a module was added: replace it whole
                old = work / "replaced"
                os.rename(target, old)
            os.rename(staged, target)
            return version

    def _initramfs(self, version: str, variant: str) -> Path:
        """Cached under a key of its inputs' names, sizes and times, so a boot that finds
        it runs no ``modinfo`` or ``ldd`` and hashes only the scripts."""
        directory = self.root / version
        paths = {p.stem: p for p in (directory / "modules").glob("*.ko")}
        inputs = hashlib.sha256(INIT_SCRIPT.encode() + repr(GUEST_MODULES).encode())
        inputs.update(runtime_fingerprint(variant))
        for path in sorted(paths.values()):
            st = path.stat()
            inputs.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        target = directory / f"initramfs-{variant}-{inputs.hexdigest()[:16]}.cpio"
        if target.is_file():
            return target
        wanted = load_order(module_dependencies(paths, GUEST_MODULES))
        tmp = directory / f".initramfs-{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            cpio = CpioWriter(f)
            for d in ("dev", "proc", "sys", "newroot", "modules", "lanekit", "lanekit/lib"):
                cpio.directory(d)
            cpio.char_device("dev/console", 5, 1, 0o600)
            cpio.file("init", INIT_SCRIPT.encode(), 0o755)
            made = {"lanekit", "lanekit/lib"}
            for name, (content, mode) in sorted(runtime_files(variant).items()):
                parts = f"lanekit/{name}".split("/")
                for i in range(2, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent not in made:
                        cpio.directory(parent)
                        made.add(parent)
                data = content.read_bytes() if isinstance(content, Path) else content
                cpio.file(f"lanekit/{name}", data, mode)
            cpio.file("modules.order", "".join(f"{m}\n" for m in wanted).encode(), 0o644)
            for name in wanted:
                cpio.file(f"modules/{name}.ko", paths[name].read_bytes(), 0o644)
            cpio.close()
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
        for old in directory.glob(f"initramfs-{variant}-*.cpio"):
            if old != target:
                old.unlink()
        for legacy in directory.glob("initramfs-" + "[0-9a-f]" * 16 + ".cpio"):
            legacy.unlink()  # from before runtime variants
        return target
