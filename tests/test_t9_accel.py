"""The KVM probe, with real qemu. This host has no usable /dev/kvm, so the probe's own
answer here is always "no"; what is checked is that it runs qemu as a child that dies
with this process and is reaped, whatever qemu does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vm import accel


def _children() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            continue
        if pid.isdigit() and int(stat.rpartition(")")[2].split()[1]) == os.getpid():
            found.append(stat)
    return found


def test_the_kvm_probe_leaves_no_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_access = os.access
    monkeypatch.setattr(
        accel.os, "access", lambda path, mode: path == "/dev/kvm" or real_access(path, mode)
    )
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    assert accel.kvm_boots(kernel, timeout=30) is False
    assert not [c for c in _children() if "qemu" in c]
