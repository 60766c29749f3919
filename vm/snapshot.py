"""Memory snapshots of a running sandbox through qemu's migration stream.

:func:`stream_memory` stops the guest and has qemu write its memory and device state into
a pipe (an ``fd:`` migration) that the caller reads as it comes, so the stream can go to
the store while qemu still writes it. The migration is not live: the guest is stopped
first (qemu drains and flushes its disks then), so the disks hold exactly what that memory
expects. :func:`load_memory` feeds such a stream, as it is fetched, to a qemu
started with ``-incoming defer -S`` and the same hardware (``Sandbox._qemu_argv`` fixes
machine type, CPU model and device order) and lets the guest run on.

Limits of qemu 7.2, checked here: vhost-user-fs (virtiofs) devices block migration, so a
sandbox with host filesystems cannot be saved; TCG state loads only into TCG with the same
qemu version, machine type and CPU model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .errors import VMError
from .machine import Machine
from .qmp import QMP, QMPError

MAX_BANDWIDTH = 8 << 30
"""bytes/s: qemu's default migration bandwidth (128 MiB/s) would make a save crawl."""
MIGRATION_TIMEOUT = 600.0
PIPE_SIZE = 1 << 20
"""The migration pipe's buffer (Linux's default unprivileged maximum)."""
PIPE_NAME = "lanekit-memory"


class SnapshotError(VMError):
    """A memory snapshot cannot be taken, or cannot be loaded here."""


def check_pausable(machine: Machine) -> None:
    if machine.mounts:
        paths = ", ".join(m.guest_path for m in machine.mounts)
        raise SnapshotError(
            f"this sandbox has virtiofs mounts ({paths}): qemu 7.2 cannot migrate "
            "vhost-user-fs devices, so its memory cannot be saved; stop it instead"
        )


async def _wait_migration(qmp: QMP, poll: float = 0.05) -> dict[str, Any]:
    with trio.move_on_after(MIGRATION_TIMEOUT):
        while True:
            status: dict[str, Any] = await qmp.execute("query-migrate") or {}
            if status.get("status") in ("completed", "failed", "cancelled"):
                return status
            await trio.sleep(poll)
    raise SnapshotError(f"qemu's migration did not finish within {MIGRATION_TIMEOUT:.0f} s")


async def stream_memory(
    machine: Machine, consume: Callable[[trio.abc.ReceiveStream], Awaitable[None]]
) -> dict[str, Any]:
    """Stop the guest and have qemu write its memory and device state into a pipe that
    ``consume`` reads as it comes (to EOF, the end of the stream); returns the qemu version
    that wrote it. If qemu or ``consume`` fails, the migration is cancelled and the guest
    runs on (nothing lost)."""
    check_pausable(machine)
    qmp = await QMP.connect(machine.runtime / "qmp.sock")
    try:
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await qmp.execute("stop")
        try:
            read_fd, write_fd = os.pipe()
            stream = trio.lowlevel.FdStream(read_fd)
            try:
                with contextlib.suppress(OSError):  # a bigger pipe: fewer wake-ups
                    fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                try:
                    await qmp.send_fd(write_fd, PIPE_NAME)
                finally:
                    os.close(write_fd)  # qemu's copy is the only writer: EOF is the end
                await qmp.execute("migrate", {"uri": f"fd:{PIPE_NAME}"})
                try:
                    await consume(stream)
                except BaseException:
                    with trio.CancelScope(shield=True), contextlib.suppress(QMPError):
                        await stream.aclose()
                        await qmp.execute("migrate_cancel")
                    raise
            finally:
                await stream.aclose()
            status = await _wait_migration(qmp)
            if status.get("status") != "completed":
                raise SnapshotError(f"qemu could not save the memory: {status.get('error-desc')}")
        except BaseException:
            with trio.CancelScope(shield=True):
                await _wait_migration_end(qmp)
                await qmp.execute("cont")
            raise
        return qmp.version
    finally:
        qmp.close()


async def _wait_migration_end(qmp: QMP) -> None:
    """A cancelled migration ends before the guest may run again."""
    with trio.move_on_after(30), contextlib.suppress(QMPError):
        while True:
            status = (await qmp.execute("query-migrate") or {}).get("status")
            if status not in ("setup", "active", "cancelling", "device", "pre-switchover"):
                return
            await trio.sleep(0.05)


async def save_memory(machine: Machine, path: Path) -> dict[str, Any]:
    """:func:`stream_memory` into a file."""

    async def into_file(stream: trio.abc.ReceiveStream) -> None:
        async with await trio.open_file(path, "wb") as f:
            while data := await stream.receive_some(PIPE_SIZE):
                await f.write(data)

    return await stream_memory(machine, into_file)


async def load_memory(
    machine: Machine,
    feed: Callable[[trio.abc.SendStream], Awaitable[None]],
    saved_by: dict[str, Any],
    before_run: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Load a stream :func:`stream_memory` produced into this qemu (started with
    ``-incoming defer -S``) as ``feed`` writes it into a pipe, so qemu loads while the rest
    of the stream is still being fetched; then ``before_run`` (the guest has all its memory
    and has not run yet) and let the guest run. An error of ``feed`` wins over qemu's
    complaint about the stream it cut short."""
    qmp = await QMP.connect(machine.runtime / "qmp.sock")
    try:
        if qmp.version.get("qemu") != saved_by.get("qemu"):
            raise SnapshotError(
                f"the memory snapshot was saved by qemu {_version(saved_by)}; this host has "
                f"qemu {_version(qmp.version)}, which cannot load it"
            )
        read_fd, write_fd = os.pipe()
        stream = trio.lowlevel.FdStream(write_fd)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            try:
                await qmp.send_fd(read_fd, PIPE_NAME)
            finally:
                os.close(read_fd)  # qemu's copy is the only reader
            try:
                await qmp.execute("migrate-incoming", {"uri": f"fd:{PIPE_NAME}"})
            except QMPError as exc:
                raise SnapshotError(f"qemu refused the memory snapshot: {exc}") from None
            try:
                await feed(stream)
            except trio.BrokenResourceError:
                pass  # qemu stopped reading: its migration status says why
        finally:
            await stream.aclose()
        status = await _wait_migration(qmp, poll=0.01)
        if status.get("status") != "completed":
            raise SnapshotError(
                f"qemu could not load the memory snapshot: {status.get('error-desc', status)}"
            )
        if before_run is not None:
            await before_run()
        await qmp.execute("cont")
    finally:
        qmp.close()


def _version(version: dict[str, Any]) -> str:
    q = version.get("qemu") or {}
    return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
