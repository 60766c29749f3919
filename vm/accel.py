"""Choose KVM when it really runs our guest kernel, else TCG; probe once per host and cache.

``/dev/kvm`` existing is not enough: on some hosts it is a paravirtual KVM that only runs
specially built kernels. So the probe boots the guest kernel under KVM with no root disk
and expects the kernel's own panic message ("VFS: Unable to mount root") within a few
seconds. The answer is cached per (host kernel, qemu, guest kernel).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import VMError
from .proc import spawn

ACCELERATORS = ("kvm", "tcg")
ENV_FORCE = "LANEKIT_ACCEL"
QEMU = "qemu-system-x86_64"


def _qemu_identity() -> str:
    """Which qemu binary this is (path, size, time): a stat, not a run, on every boot."""
    path = shutil.which(QEMU)
    if path is None:
        raise VMError(f"{QEMU} is not installed; run tools/setup.sh")
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def kvm_boots(kernel: Path, timeout: float = 20.0) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="lanekit-kvm-probe-") as tmp:
        log = Path(tmp) / "console.log"
        argv = [
            QEMU, "-accel", "kvm", "-M", "microvm", "-cpu", "host", "-m", "128",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
            "-serial", f"file:{log}",
        ]  # fmt: skip
        try:
            # Dies with this process (PDEATHSIG): a killed command leaves no probe behind.
            probe = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        try:
            probe.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
        try:
            text = log.read_text(errors="replace")
        except FileNotFoundError:
            return False
        return "Unable to mount root" in text or "Kernel panic" in text


def choose_accelerator(kernel: Path, cache_file: Path, forced: str | None = None) -> str:
    """``forced`` (or ``$LANEKIT_ACCEL``) wins; otherwise the cached or probed answer."""
    forced = forced or os.environ.get(ENV_FORCE) or None
    if forced is not None:
        if forced not in ACCELERATORS:
            raise VMError(f"unknown accelerator {forced!r}: use one of {', '.join(ACCELERATORS)}")
        return forced
    key = f"{os.uname().release}|{_qemu_identity()}|{kernel.parent.name}"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cache = json.loads(cache_file.read_text())
        except (FileNotFoundError, ValueError):
            cache = {}
        if key not in cache:
            cache[key] = "kvm" if kvm_boots(kernel) else "tcg"
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.rename(tmp, cache_file)
        return str(cache[key])
