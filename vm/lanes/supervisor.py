"""A running lane's supervisor: ``python -m vm.lanes.supervisor NAME STORE``.

Started detached (its own session, no PDEATHSIG: it outlives the command that started it);
what it starts (qemu, virtiofsd, the NBD server) is spawned by ``vm.proc`` inside it, so it
all dies with it, kill -9 included. It boots the lane's sandbox, which leases the lane's
root disk (the truth about who runs the lane), and serves two 0600 unix sockets in the
lane's run directory: ``agent.sock`` (the agent relay, see :mod:`.relay`) and
``control.sock`` (one JSON request per line: ``status``, ``stop``, ``pause``, ``checkpoint``).

A ``pause`` request saves the guest's memory through qemu's migration stream into the
store (see :mod:`.paused`) and ends; the next start, on any host with the same qemu, resumes
the guest where it was.

A supervisor that cannot renew its leases for longer than their TTL (the store cut off) is
fenced: the block store never commits for it again, even when the store answers again
(another host may have taken the lane over meanwhile). It says so in its log, in
``fenced.json`` of the run directory (what ``lane ls``/``info``/``exec`` here report), and
ends. ``LANEKIT_LEASE_TTL`` (seconds) sets the TTL of the leases it takes.

Signals follow ``tools/stopping.py``: the first SIGTERM/SIGINT (or a ``stop`` request) is
a clean stop (the guest syncs and powers off, the disk is flushed and its lease released);
a second one kills the guest at once and still flushes and releases the disk. One that
comes before the lane runs cancels its start (the guest killed, the leases released).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore.concurrency import first_failure
from blockstore.identity import process_identity

from ..errors import GuestAgentError
from ..launcher import Mount, Sandbox
from ..machine import Machine
from ..net import NetworkConfig
from ..snapshot import SnapshotError, check_pausable, load_memory, stream_memory
from ..state import lanekit_home
from ..volumes import VolumeAttachment, disk_name
from . import checkpoints, paused, runlock
from .definition import LaneDefinition, read_definition, root_disk_name, write_ended
from .process import AGENT_SOCKET, BUSY, CONSOLE, CONTROL_SOCKET, FENCED, IDENTITY, run_dir
from .relay import bind_unix, serve_relay

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GUEST_KILLED = 130
"""Exit status of a run whose guest was killed by a second stop signal (disk still flushed)."""
LEASE_TTL_ENV = "LANEKIT_LEASE_TTL"


def lease_ttl() -> float | None:
    """The TTL of the leases a supervisor takes (``LANEKIT_LEASE_TTL``), None: the default."""
    value = os.environ.get(LEASE_TTL_ENV)
    if not value:
        return None
    try:
        ttl = float(value)
    except ValueError:
        ttl = 0.0
    if not 1.0 <= ttl <= 3600.0:
        raise ValueError(f"{LEASE_TTL_ENV}={value!r}: give seconds between 1 and 3600")
    return ttl


def fence_reason(machine: Machine) -> str:
    """Why the machine's disks were fenced, as its leases tell."""
    stores = [machine.disk.store, *(d.store for d in machine.volumes.values())]
    for store in stores:
        lease = getattr(store, "lease", None)
        if getattr(store, "fenced", False) and lease is not None and lease.expired:
            return (
                f"fenced: the store was unreachable for longer than the lease TTL "
                f"({lease.ttl:g} s); this host never commits to the lane's disks again "
                "(what the guest wrote since its last durable flush is lost)"
            )
    return "fenced: another host took the lane's disk over"


def say(line: str) -> None:
    now = time.time()
    stamp = f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}"
    print(f"{stamp} lanekit-lane: {line}", file=sys.stderr, flush=True)


class _Supervisor:
    def __init__(self, name: str, run: Path) -> None:
        self.name = name
        self.run = run
        self.stop = trio.Event()
        self.stops = 0
        self.machine: Machine | None = None
        self.objects: blockstore.ObjectStore | None = None
        self.definition: LaneDefinition | None = None
        self.pausing = False
        self.paused = False
        """The memory is in the store and the machine stopped for it: this run ends paused."""
        self.reason = ""
        """Why the run ends (the first stop request's reason)."""
        self.exclusive = trio.Lock()
        self.starting: trio.CancelScope | None = None
        """Until the lane runs: a stop cancels its start (the disk's lease is released), or
        a stop while the guest boots would wait for the boot."""

    def request_stop(self, why: str) -> None:
        self.stops += 1
        if self.stops == 1:
            self.reason = why
            if self.starting is not None:
                say(f"{why}: abandoning the start")
                self.starting.cancel()
            else:
                say(f"{why}: stopping cleanly (guest sync and poweroff; again: kill the guest)")
            self.stop.set()
        else:
            say(f"{why} again: killing the guest now; what it had not synced is lost")
            if self.machine is not None:
                self.machine.qemu.kill_group()

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            async for signum in signals:
                self.request_stop(signal.Signals(signum).name)

    async def serve_control(self, *, task_status: trio.TaskStatus[None]) -> None:
        listener = await bind_unix(self.run / CONTROL_SOCKET)

        async def handle(stream: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                buffer = b""
                while b"\n" not in buffer:
                    data = await stream.receive_some(4096)
                    if not data or len(buffer) > 65536:
                        return
                    buffer += data
                try:
                    request = json.loads(buffer.partition(b"\n")[0])
                    op = request["op"]
                except (ValueError, KeyError, TypeError):
                    await stream.send_all(b'{"error": "not a control request"}\n')
                    return
                if op in ("pause", "checkpoint"):
                    async with self.exclusive:  # never both at once
                        if op == "pause":
                            answer = await self.pause()
                        else:
                            answer = await self.checkpoint(request.get("tag"))
                else:
                    answer = self.answer(op)
                await stream.send_all(json.dumps(answer).encode() + b"\n")
                if op in ("stop", "pause") and "ok" in answer:
                    await trio.sleep_forever()  # closed when the supervisor exits

        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(handle, [listener], handler_nursery=nursery)

    def answer(self, op: str) -> dict[str, Any]:
        if op == "status":
            read = _bytes_read(self.objects)
            return {"ok": {"name": self.name, "pid": os.getpid(), "store_bytes_read": read}}
        if op == "stop":
            self.request_stop("stop requested")
            return {"ok": "stopping"}
        return {"error": f"unknown request {op!r}"}

    async def pause(self) -> dict[str, Any]:
        """Save the guest's memory and the disk's state into the store, then end (see
        :mod:`.paused`); on any failure the guest runs on and the error is the answer."""
        machine = self.machine
        assert machine is not None and self.objects is not None and self.definition is not None
        if self.pausing or self.stop.is_set():
            return {"error": "the lane is stopping or pausing already"}
        try:
            check_pausable(machine)
        except SnapshotError as exc:
            return {"error": str(exc)}
        if self.definition.volumes:
            return {
                "error": "this lane has volumes: they would be free for other writers "
                "while its memory still expects their state; stop it instead"
            }
        self.pausing = True
        snapshot = paused.new_snapshot_id()
        objects = self.objects
        stored: list[paused.Uploaded] = []

        async def into_store(stream: trio.abc.ReceiveStream) -> None:
            """The memory into the store as qemu writes it, the disk's checkpoint beside
            it (the guest is stopped: its disk holds what that memory expects)."""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(machine.disk.checkpoint, paused.DISK_CHECKPOINT + snapshot)
                stored.append(await paused.upload_stream(objects, self.name, snapshot, stream))

        try:
            say(f"pausing: saving the guest's memory into the store (snapshot {snapshot})")
            began = time.monotonic()
            try:
                version = await stream_memory(machine, into_store)
                (uploaded,) = stored
                say(
                    f"memory: {uploaded.length / (1 << 20):.0f} MiB streamed into the store in "
                    f"{time.monotonic() - began:.2f} s (the disk's checkpoint beside it; "
                    f"{len(uploaded.raw)} of {len(uploaded.digests)} chunks incompressible)"
                )
                record = uploaded.record(snapshot, version)
                await trio.to_thread.run_sync(paused.write_record, objects, self.name, record)
            except BaseException:  # a stop cancelling the pause too: the lane stops unpaused
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(paused.discard, objects, self.name, {})
                    await _resume_after_failed_save(machine)
                self.pausing = False
                raise
        except Exception as exc:
            say(f"pause failed, the lane runs on: {first_cause(exc)}")
            return {"error": f"could not pause: {first_cause(exc)}"}
        say(f"paused: memory and disk state are in the store (snapshot {snapshot})")
        with contextlib.suppress(blockstore.BlockStoreError):  # best effort: rm takes the rest
            await trio.to_thread.run_sync(paused.discard_others, objects, self.name, snapshot)
        self.paused = True
        await machine.kill()
        self.stop.set()
        return {"ok": "paused"}

    async def checkpoint(self, tag: Any) -> dict[str, Any]:
        """Checkpoint the lane's disks as the running guest left them (see :mod:`.checkpoints`)."""
        assert self.machine is not None and self.objects is not None and self.definition
        if not isinstance(tag, str):
            return {"error": "a checkpoint needs a tag"}
        if self.pausing or self.stop.is_set():
            return {"error": "the lane is stopping or pausing"}
        try:
            record = await checkpoints.take_running(
                self.machine, self.objects, self.definition, tag
            )
        except Exception as exc:
            say(f"checkpoint {tag} failed, the lane runs on: {exc}")
            return {"error": f"could not checkpoint: {exc}"}
        say(f"checkpoint {tag}: the root disk and {len(record['volumes'])} volume(s)")
        return {"ok": {"tag": tag, "created": record["created"]}}

    async def watch_guest(self, machine: Machine) -> None:
        code = await machine.qemu.wait()
        if not self.stop.is_set() and not self.pausing:
            if machine.fenced:
                self.reason = fence_reason(machine)
                await trio.to_thread.run_sync(self.record_fenced, machine)
            else:
                self.reason = f"the guest stopped (qemu exit {code})"
            say(f"{self.reason}: the lane stops")
            self.stop.set()

    def record_fenced(self, machine: Machine) -> None:
        """Tell this host's lane commands at once (they cannot ask the store when it is
        the store that is gone): no agent socket any more, and why."""
        record = {"epoch": _epoch(machine), "reason": self.reason, "at": time.time()}
        tmp = self.run / f"{FENCED}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(self.run / FENCED)
        with contextlib.suppress(FileNotFoundError):
            (self.run / AGENT_SOCKET).unlink()

    async def limit_duration(self, seconds: float) -> None:
        await trio.sleep(seconds)
        if not self.stop.is_set() and not self.pausing:
            self.request_stop(f"max duration {_duration(seconds)} reached")


def _bytes_read(objects: object) -> int | None:
    """What this process has read from the store (S3 stores count it; wrappers hold the
    store as ``inner``)."""
    while objects is not None and not hasattr(objects, "bytes_read"):
        objects = getattr(objects, "inner", None)
    return None if objects is None else int(objects.bytes_read)


def first_cause(exc: BaseException) -> BaseException:
    """The real error inside a nursery's exception group (the error itself otherwise)."""
    return first_failure(exc) if isinstance(exc, BaseExceptionGroup) else exc


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"


async def _keep_console(machine: Machine, run: Path) -> None:
    """Make the run's console readable as ``run/console.log`` while it runs (a link into
    the boot's runtime directory) and after (a copy, before the runtime directory goes)."""
    link = run / CONSOLE

    def swap(make: Any) -> None:
        tmp = run / f"{CONSOLE}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        make(tmp)
        tmp.rename(link)

    await trio.to_thread.run_sync(swap, lambda tmp: tmp.symlink_to(machine.console_log))
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await trio.to_thread.run_sync(
                swap, lambda tmp: shutil.copyfile(machine.console_log, tmp)
            )


def _report(fd: int | None, line: str) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, line.encode() + b"\n")
            os.close(fd)


class LaneSandbox(Sandbox):
    """The lane's sandbox; resuming, its qemu waits for the memory snapshot (``-incoming
    defer``) and gets it as soon as it runs."""

    resume_from: tuple[paused.SnapshotReader, dict[str, Any]] | None = None
    before_run: Callable[[], Awaitable[None]] | None = None
    """Awaited once the snapshot is loaded, before the resumed guest runs."""

    def extra_qemu_args(self, runtime: Path) -> list[str]:
        return ["-incoming", "defer", "-S"] if self.resume_from else []

    async def qemu_started(self, machine: Machine) -> None:
        if self.resume_from is not None:
            reader, saved_by = self.resume_from
            await load_memory(machine, reader.feed, saved_by, self.before_run)


async def _resume_after_failed_save(machine: Machine) -> None:
    from ..qmp import QMP

    with contextlib.suppress(Exception):
        qmp = await QMP.connect(machine.runtime / "qmp.sock")
        try:
            await qmp.execute("cont")
        finally:
            qmp.close()


async def _discard_chunks(
    objects: blockstore.ObjectStore, name: str, record: dict[str, Any]
) -> None:
    """After a resume, in the background: the loaded snapshot's chunks are garbage."""
    try:
        await trio.to_thread.run_sync(paused.discard, objects, name, record)
    except blockstore.BlockStoreError as exc:
        say(f"the resumed snapshot's chunks stay in the store ({exc})")


async def _set_clock(machine: Machine) -> None:
    """The guest's clock stood still while it was paused; set it to now."""
    with contextlib.suppress(GuestAgentError):  # an agent from before set_time: date(1)
        await (await machine.session()).call("set_time", seconds=time.time())
        return
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    result = await machine.exec(["date", "-u", "-s", now])
    if result.exit_code != 0:
        say(f"could not set the guest's clock: {result.stderr_text.strip()}")


async def supervise(
    name: str,
    store: str,
    s3_endpoint: str | None,
    ready_fd: int | None,
    cold: bool = False,
    force: bool = False,
) -> int:
    home = lanekit_home()
    run = run_dir(home, name)
    supervisor = _Supervisor(name, run)
    reported = False
    async with trio.open_nursery() as outer:
        supervisor.starting = outer.cancel_scope
        outer.start_soon(supervisor.watch_signals)
        try:
            objects = await trio.to_thread.run_sync(
                lambda: blockstore.open_store(store, s3_endpoint=s3_endpoint)
            )
            definition = await trio.to_thread.run_sync(read_definition, objects, name)
            supervisor.objects, supervisor.definition = objects, definition
            await trio.to_thread.run_sync(write_identity, run, definition.env)
            if cold:  # whatever the snapshot holds, readable or not
                say("starting cold: a memory snapshot is discarded")
                await trio.to_thread.run_sync(paused.discard, objects, name, {})
            record = await trio.to_thread.run_sync(paused.read_paused, objects, name)
            reader = None
            if record is not None:
                say(f"resuming from the memory snapshot {record['id']}")
                reader = paused.SnapshotReader(objects, name, record)
                outer.start_soon(reader.fetch_all)
            sandbox = LaneSandbox(
                definition.image, cpus=definition.cpus, memory_mib=definition.memory_mib,
                disk=(objects, root_disk_name(name)), disk_size=definition.disk_size,
                force=force, home=home, s3_endpoint=s3_endpoint, notice=say, lease_ttl=lease_ttl(),
                network=NetworkConfig.from_dict(definition.network) if definition.network else None,
                volumes=[
                    VolumeAttachment(v.path, (objects, disk_name(v.name)), v.read_only, v.name)
                    for v in definition.volumes
                ],
            )  # fmt: skip
            if reader is not None and record is not None:
                sandbox.resume_from = (reader, record["qemu"])
                # From here on a crash must never load this memory over a disk that moved on.
                sandbox.before_run = partial(trio.to_thread.run_sync, paused.forget, objects, name)
            mounts = [Mount(m.path, Path(m.host_path), m.read_only) for m in definition.mounts]
            async with sandbox.boot(mounts) as machine:
                supervisor.machine = machine
                epoch = _epoch(machine)
                await machine.session()
                if record is not None:
                    await _set_clock(machine)
                    outer.start_soon(_discard_chunks, objects, name, record)
                async with trio.open_nursery() as servers:
                    await servers.start(serve_relay, run / AGENT_SOCKET, machine.session)
                    await servers.start(supervisor.serve_control)
                    servers.start_soon(supervisor.watch_guest, machine)
                    servers.start_soon(_keep_console, machine, run)
                    if definition.max_duration is not None:
                        servers.start_soon(supervisor.limit_duration, definition.max_duration)
                    supervisor.starting = None
                    _report(ready_fd, "ready")
                    reported = True
                    say(f"lane {name} is running (pid {os.getpid()})")
                    await supervisor.stop.wait()
                    servers.cancel_scope.cancel()
                fenced = machine.fenced
            if fenced:
                raise blockstore.Fenced(supervisor.reason.removeprefix("fenced: "))
            if supervisor.paused:
                say(f"lane {name} paused")
            else:
                say(f"lane {name} stopped ({supervisor.reason})")
                if epoch is not None:
                    await trio.to_thread.run_sync(
                        write_ended, objects, name, epoch, supervisor.reason
                    )
        except blockstore.Fenced as exc:
            say(
                f"fenced: {exc}; this supervisor stops and never commits again "
                "(what the guest wrote since is not on the disk)"
            )
            outer.cancel_scope.cancel()
            return 1
        except blockstore.LeaseHeld as exc:
            holder = exc.holder
            busy = (
                f"lane {name!r} is in use by host {holder.get('host')} pid {holder.get('pid')} "
                "(it runs there, or won this start): stop it there, or take it over with --force"
            )
            say(f"error: {busy} ({exc})")
            if not reported:
                _report(ready_fd, BUSY + busy)
            outer.cancel_scope.cancel()
            return 1
        except Exception as exc:
            say(f"error: {exc}")
            if not reported:
                _report(ready_fd, f"error: {exc}")
            outer.cancel_scope.cancel()
            return 1
        finally:
            for sock in (AGENT_SOCKET, CONTROL_SOCKET):
                with contextlib.suppress(FileNotFoundError):
                    (run / sock).unlink()
        outer.cancel_scope.cancel()
    if not reported:  # a stop cancelled the start
        say(f"lane {name} stopped while starting ({supervisor.reason})")
        _report(ready_fd, f"error: stopped while starting ({supervisor.reason})")
        return 1
    return GUEST_KILLED if supervisor.stops > 1 else 0


def _epoch(machine: Machine) -> int | None:
    lease = getattr(machine.disk.store, "lease", None)
    return None if lease is None else int(lease.epoch)


def write_identity(run: Path, env: Mapping[str, str] | None = None) -> None:
    """Who the supervisor is (pid and start time), for the clients and the next cleanup;
    once the definition is read, also the environment every command of the lane gets, so
    that a client on this host needs nothing from the store (``connect_running``)."""
    identity: dict[str, Any] = {"pid": os.getpid(), "process": process_identity(os.getpid())}
    if env is not None:
        identity["env"] = dict(env)
    tmp = run / f"{IDENTITY}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the env may hold secrets
    with open(fd, "w") as f:
        f.write(json.dumps(identity))
    tmp.rename(run / IDENTITY)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lanekit-lane-supervisor")
    p.add_argument("name")
    p.add_argument("store")
    p.add_argument("--s3-endpoint")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--cold", action="store_true", help="discard a memory snapshot")
    p.add_argument("--force", action="store_true", help="take the lane's leases over")
    args = p.parse_args(argv)
    run = run_dir(lanekit_home(), args.name)
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o700)  # its logs and records are the lane's, as its sockets are
    lock = runlock.take(run)
    if lock is None:  # another start won: its identity and sockets are left alone
        busy = f"lane {args.name!r} is starting or running on this host already"
        say(f"error: {busy}")
        _report(args.ready_fd, BUSY + busy)
        return 1
    try:
        with contextlib.suppress(FileNotFoundError):
            (run / FENCED).unlink()
        write_identity(run)
        return trio.run(
            supervise, args.name, args.store, args.s3_endpoint, args.ready_fd, args.cold,
            args.force,
        )  # fmt: skip
    finally:
        os.close(lock)


if __name__ == "__main__":
    sys.exit(main())
