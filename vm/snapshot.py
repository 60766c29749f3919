"""Memory snapshots of a running sandbox through qemu's migration stream.

:func:`save_memory` stops the guest and has qemu write its memory and device state to a
file (a non-live migration: the guest is stopped first, so the disks, flushed after it,
hold exactly what that memory expects). :func:`load_memory` feeds such a file to a qemu
started with ``-incoming defer`` and the same hardware (``Sandbox._qemu_argv`` fixes
machine type, CPU model and device order) and lets the guest run on.

Limits of qemu 7.2, checked here: vhost-user-fs (virtiofs) devices block migration, so a
sandbox with host filesystems cannot be saved; TCG state loads only into TCG with the same
qemu version, machine type and CPU model.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import trio

from .errors import VMError
from .machine import Machine
from .qmp import QMP, QMPError

MAX_BANDWIDTH = 8 << 30
"""bytes/s: qemu's default migration bandwidth (128 MiB/s) would make a save crawl."""
MIGRATION_TIMEOUT = 600.0


class SnapshotError(VMError):
    """A memory snapshot cannot be taken, or cannot be loaded here."""


def check_pausable(machine: Machine) -> None:
    if machine.mounts:
        paths = ", ".join(m.guest_path for m in machine.mounts)
        raise SnapshotError(
            f"this sandbox has virtiofs mounts ({paths}): qemu 7.2 cannot migrate "
            "vhost-user-fs devices, so its memory cannot be saved; stop it instead"
        )


async def _wait_migration(qmp: QMP) -> dict[str, Any]:
    with trio.move_on_after(MIGRATION_TIMEOUT):
        while True:
            status: dict[str, Any] = await qmp.execute("query-migrate") or {}
            if status.get("status") in ("completed", "failed", "cancelled"):
                return status
            await trio.sleep(0.05)
    raise SnapshotError(f"qemu's migration did not finish within {MIGRATION_TIMEOUT:.0f} s")


async def save_memory(machine: Machine, path: Path) -> dict[str, Any]:
    """Stop the guest and write its memory and device state to ``path``; returns the qemu
    version that wrote it. On failure the guest runs on (nothing lost)."""
    check_pausable(machine)
    qmp = await QMP.connect(machine.runtime / "qmp.sock")
    try:
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await qmp.execute("stop")
        try:
            await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
            status = await _wait_migration(qmp)
            if status.get("status") != "completed":
                raise SnapshotError(f"qemu could not save the memory: {status.get('error-desc')}")
        except BaseException:
            with trio.CancelScope(shield=True):
                await qmp.execute("cont")
            raise
        return qmp.version
    finally:
        qmp.close()


async def load_memory(machine: Machine, path: Path, saved_by: dict[str, Any]) -> None:
    """Load what :func:`save_memory` wrote into this (``-incoming defer``) qemu and run."""
    qmp = await QMP.connect(machine.runtime / "qmp.sock")
    try:
        if qmp.version.get("qemu") != saved_by.get("qemu"):
            raise SnapshotError(
                f"the memory snapshot was saved by qemu {_version(saved_by)}; this host has "
                f"qemu {_version(qmp.version)}, which cannot load it"
            )
        try:
            await qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
        except QMPError as exc:
            raise SnapshotError(f"qemu refused the memory snapshot: {exc}") from None
        status = await _wait_migration(qmp)
        if status.get("status") != "completed":
            raise SnapshotError(
                f"qemu could not load the memory snapshot: {status.get('error-desc', status)}"
            )
        running = await qmp.execute("query-status")
        if not (running or {}).get("running"):
            await qmp.execute("cont")
    finally:
        qmp.close()


def _version(version: dict[str, Any]) -> str:
    q = version.get("qemu") or {}
    return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
