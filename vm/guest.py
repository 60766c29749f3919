"""The guest runtime mounted at ``/lanekit`` in every boot: an init, the guest agent, helpers.

The runtime travels in the initramfs (see :mod:`vm.kernel`), not in the images: the
initramfs bind-mounts it over the image's empty ``/lanekit`` before handing over. So a
boot reads none of it over the root disk (a cold root disk in S3 fetches only the image's
own blocks), images hold only what their builder put in, and a new runtime reaches every
image without a rebuild.

The guest agent is lanekit's own (:mod:`vm.agent.guest`), run by the host's Python
interpreter with the shared libraries it loads, started through the copied dynamic loader
with ``--library-path``, so it runs the same in a busybox image and in a Debian one and
never mixes with the image's own libraries. busybox-static provides the init's tools. The
kernel command line tells the init which virtiofs tags to mount where
(``lanekit.mount=TAG:PATH:ro|rw``). qemu-guest-agent is carried only in the benchmark's
variant of the runtime (``lanekit.qga`` on the command line starts it), as a peer to
measure against.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from .agent import runtime as agent_runtime
from .errors import BuildError

QGA_BINARY = Path("/usr/sbin/qemu-ga")
BUSYBOX = Path("/bin/busybox")
LOADER_CACHE = Path("/etc/ld.so.cache")
AGENT_PORT_NAME = "org.lanekit.agent.0"
QGA_PORT_NAME = "org.qemu.guest_agent.0"
MOUNT_POINTS = ("workspace", "tmp", "mnt", "proc", "sys", "dev", "run", "root")
VARIANTS = ("default", "qga")
"""Runtime variants: ``qga`` adds qemu-guest-agent (for ``lanekit bench exec`` only)."""

AGENT_COMMAND = agent_runtime.agent_command('"$port"')

GUEST_INIT = rf"""#!/lanekit/busybox sh
# lanekit guest init: mount the usual filesystems and the per-boot virtiofs mounts,
# then keep the guest agent running and reap orphans.
bb=/lanekit/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
$bb mkdir -p /dev/pts /dev/shm
# One process for all of them (each costs ~10 ms under TCG). favordynmods (Linux 6.0+)
# spares the agent an RCU grace period (6-8 ms here) each time it enters a command's
# cgroup; an older kernel refuses it and gets cgroup2 without it.
$bb mount -a -T /lanekit/fstab \
    || $bb mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup 2>/dev/null
$bb hostname lanekit
$bb ip link set lo up 2>/dev/null
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        lanekit.mount=*)
            spec="${{arg#lanekit.mount=}}"
            tag="${{spec%%:*}}"; rest="${{spec#*:}}"; path="${{rest%:*}}"; mode="${{rest##*:}}"
            $bb mkdir -p "$path"
            $bb mount -t virtiofs -o "$mode" "$tag" "$path" \
                || echo "lanekit-init: cannot mount $tag at $path" >/dev/console
            ;;
        lanekit.volume=*)  # a volume: the virtio-blk disk with this serial, ext4
            spec="${{arg#lanekit.volume=}}"
            serial="${{spec%%:*}}"; rest="${{spec#*:}}"; path="${{rest%:*}}"; mode="${{rest##*:}}"
            dev=
            for b in /sys/block/vd*; do
                s=; read -r s <"$b/serial" 2>/dev/null
                [ "$s" = "$serial" ] && dev="/dev/${{b##*/}}"
            done
            [ "$mode" = ro ] && mode=ro,noload
            $bb mkdir -p "$path"
            [ -n "$dev" ] && $bb mount -t ext4 -o "$mode" "$dev" "$path" \
                || echo "lanekit-init: cannot mount volume $serial at $path" >/dev/console
            ;;
    esac
done
if [ -e /sys/class/net/eth0 ]; then  # a network device: the sandbox has networking (vm.net)
    # qemu's user networking: the guest, its gateway and its DNS (the host decides both).
    $bb ip link set eth0 up
    $bb ip addr add 10.0.2.15/24 dev eth0
    $bb ip route add default via 10.0.2.2 dev eth0
    if [ "$($bb cat /etc/resolv.conf 2>/dev/null)" != "nameserver 10.0.2.3" ]; then
        $bb rm -f /etc/resolv.conf
        echo "nameserver 10.0.2.3" >/etc/resolv.conf
    fi
fi
port=; qga=
for d in /sys/class/virtio-ports/*; do
    name=; read -r name <"$d/name"
    [ "$name" = "{AGENT_PORT_NAME}" ] && port="/dev/${{d##*/}}"
    [ "$name" = "{QGA_PORT_NAME}" ] && qga="/dev/${{d##*/}}"
done
if [ -z "$port$qga" ]; then
    echo "lanekit-init: no guest agent port" >/dev/console
    $bb poweroff -f
fi
[ -n "$port" ] && (
    while :; do
        {AGENT_COMMAND} 2>>/dev/console
        echo "lanekit-init: the guest agent exited ($?); restarting it" >/dev/console
        $bb sleep 0.2
    done
) &
if [ -n "$qga" ] && [ -x /lanekit/qemu-ga ]; then
    (
        while :; do
            /lanekit/lib/ld-linux-x86-64.so.2 --library-path /lanekit/lib /lanekit/qemu-ga \
                -m virtio-serial -p "$qga" -t /run -f /run/qemu-ga.pid
            $bb sleep 0.2
        done
    ) &
fi
echo "lanekit-init: ready" >/dev/console
while :; do
    wait
    $bb sleep 1
done
"""

FSTAB = """\
proc /proc proc defaults 0 0
sys /sys sysfs defaults 0 0
devpts /dev/pts devpts gid=5,mode=620 0 0
tmpfs /dev/shm tmpfs mode=1777,nosuid,nodev 0 0
tmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0
tmpfs /run tmpfs mode=755,nosuid,nodev 0 0
cgroup2 /sys/fs/cgroup cgroup2 nsdelegate,favordynmods 0 0
"""

POWEROFF = r"""#!/lanekit/busybox sh
# Orderly power-off: stop every process, flush, remount the root read-only, power off.
bb=/lanekit/busybox
$bb sync
kill -TERM -1 2>/dev/null  # the shell's builtin: spares this script
$bb usleep 200000
kill -KILL -1 2>/dev/null
$bb sync
for m in $($bb awk '$3 == "virtiofs" {print $2}' /proc/mounts); do $bb umount -l "$m"; done
for m in $($bb awk '$1 ~ /^\/dev\/vd[b-z]/ {print $2}' /proc/mounts); do
    $bb umount "$m" 2>/dev/null || $bb mount -o remount,ro "$m"  # volumes: clean for the next
done
$bb mount -o remount,ro / 2>/dev/null
$bb sync
$bb poweroff -f
"""


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries ``binary`` loads on this host, the dynamic loader included."""
    try:
        out = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot list the libraries of {binary}: {exc}") from None
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    if not any(p.name.startswith("ld-linux") for p in libs):
        raise BuildError(f"{binary} has no dynamic loader in ldd's output: {out!r}")
    return libs


def runtime_fingerprint(variant: str = "default") -> bytes:
    """What the runtime is built from, cheaply (no ``ldd``): the scripts, the agent, and
    the names, sizes and times of the binaries and of the loader cache, which ``ldconfig``
    rewrites whenever a library is installed or upgraded. A boot checks it; a change
    rebuilds."""
    fingerprint = hashlib.sha256(variant.encode())
    for text in (GUEST_INIT, FSTAB, POWEROFF):
        fingerprint.update(hashlib.sha256(text.encode()).digest())
    fingerprint.update(agent_runtime.fingerprint())
    binaries = [BUSYBOX, LOADER_CACHE] + ([QGA_BINARY] if variant == "qga" else [])
    for path in binaries:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            fingerprint.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
    return fingerprint.digest()


def runtime_files(variant: str = "default") -> dict[str, tuple[bytes | Path, int]]:
    """The runtime's files, by path under ``/lanekit``: contents (or a host file) and mode."""
    if variant not in VARIANTS:
        raise BuildError(f"unknown runtime variant {variant!r}")
    required = [BUSYBOX] + ([QGA_BINARY] if variant == "qga" else [])
    for path in required:
        if not path.is_file():
            raise BuildError(
                f"{path} is missing on this host: run tools/setup.sh "
                "(it installs busybox-static and qemu-guest-agent)"
            )
    files: dict[str, tuple[bytes | Path, int]] = {
        "busybox": (BUSYBOX, 0o755),
        "init": (GUEST_INIT.encode(), 0o755),
        "fstab": (FSTAB.encode(), 0o644),
        "poweroff": (POWEROFF.encode(), 0o755),
    }
    files.update(agent_runtime.agent_files())
    binaries = [agent_runtime.python_binary()]
    if variant == "qga":
        files["qemu-ga"] = (QGA_BINARY, 0o755)
        binaries.append(QGA_BINARY)
    for binary in binaries:
        for lib in shared_libraries(binary):
            files[f"lib/{lib.name}"] = (lib.resolve(), 0o755)
    return files


def prepare_tree(root: Path) -> None:
    """Give an image tree (in place) the mount points a boot needs, ``/lanekit`` included."""
    runtime = root / "lanekit"
    if runtime.is_symlink() or (runtime.exists() and not runtime.is_dir()):
        raise BuildError("the image tree has a /lanekit that is not a directory")
    for name in ("lanekit", *MOUNT_POINTS):
        point = root / name
        if point.is_symlink():
            point.unlink()
        point.mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)


def install_busybox_userland(root: Path) -> None:
    """A minimal userland: busybox and a symlink per applet in /bin and /sbin (shell image)."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for applet in applets:
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
    (root / "etc" / "hostname").write_text("lanekit\n")
