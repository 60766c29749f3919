"""Lanes: named durable sandboxes that live in an object store and run detached.

``Lane.create`` writes a lane's definition into its store; ``lane.start()`` starts a
supervisor process on this host that boots it (see :mod:`.supervisor`) and returns once it
runs; ``lane.connect()`` gives a machine (exec, fs) through the supervisor; ``lane.stop()``
stops it cleanly. Any host that reaches the store can start a stopped lane: its root disk,
with everything the guest wrote, is in the store, and so is its base image.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import blockstore
from blockstore import ObjectStore
from blockstore.disks import delete_disk
from blockstore.identity import process_identity
from blockstore.lease import holder_is_dead

from ..errors import VMError
from ..machine import AgentMachine, check_resources
from ..net import NetworkConfig
from ..registry import ImageEntry
from ..state import lanekit_home, state_paths
from ..volumes import check_guest_path, disk_name, read_volume, volume_info
from . import checkpoints as checkpointing
from . import runlock
from .cache import LaneCache
from .definition import (
    LaneDefinition,
    LaneMount,
    LaneVolume,
    delete_definition,
    delete_ended,
    list_lane_names,
    read_definition,
    read_ended,
    release_dead_lease,
    root_disk_name,
    root_lease,
    storable_network,
    write_definition,
    write_ended,
)
from .errors import LaneBusy, LaneError, LaneNotFound, check_lane_name
from .paused import discard, read_paused
from .process import (
    AGENT_SOCKET,
    BUSY,
    CONSOLE,
    CONTROL_SOCKET,
    IDENTITY,
    Tee,
    connect_running,
    control_request,
    end_process,
    live_supervisor,
    log_tail,
    read_fenced,
    run_dir,
    spawn_supervisor,
)

START_TIMEOUT = 600.0
STOP_TIMEOUT = 120.0
PAUSE_TIMEOUT = 600.0
EXIT_POLL = 0.02
"""Seconds between looks for a stopping supervisor's exit (a look reads a small file)."""
KILL_AFTER = 30.0
"""Seconds a supervisor that cannot be asked to stop (it serves no control socket until
its guest runs, or it does not answer) gets to end after SIGTERM before it is killed."""


@dataclasses.dataclass(frozen=True)
class LaneStatus:
    name: str
    store: str
    state: str
    """``created`` (never started), ``starting`` (its supervisor here has not got the
    lease yet), ``running`` (somewhere: see ``host``/``here``), ``paused`` (its memory in
    the store: a start resumes it), ``stopped``, or ``crashed`` (its last run's holder
    died or lost the store without releasing the lease: the next start takes over)."""
    here: bool
    """Run by a supervisor on this host (this ``$LANEKIT_HOME``)."""
    host: str | None = None
    pid: int | None = None
    epoch: int | None = None
    error: str | None = None
    """Why the lane's state cannot be read (state ``unreadable``)."""
    since: float | None = None
    """When it entered this state (Unix time), as far as the store tells."""
    image: str | None = None
    reason: str | None = None
    """Why its last run ended (a clean stop's reason, or a crash's)."""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Lane:
    """A lane in its store, seen from this host. Methods other than :meth:`connect` block
    (call them from a thread in async code)."""

    def __init__(
        self,
        definition: LaneDefinition,
        objects: ObjectStore,
        store: str,
        s3_endpoint: str | None,
        home: Path,
    ) -> None:
        self.definition = definition
        self.objects = objects
        self.store = store
        self.s3_endpoint = s3_endpoint
        self.home = home

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def run_dir(self) -> Path:
        return run_dir(self.home, self.name)

    # ------------------------------------------------------------ finding lanes

    @classmethod
    def create(
        cls,
        name: str,
        image: str | ImageEntry,
        *,
        store: str,
        s3_endpoint: str | None = None,
        cpus: int = 1,
        memory_mib: int = 512,
        disk_size: int | None = None,
        labels: Mapping[str, str] | None = None,
        network: NetworkConfig | Mapping[str, Any] | None = None,
        volumes: Sequence[LaneVolume] = (),
        max_duration: float | None = None,
        env: Mapping[str, str] | None = None,
        mounts: Sequence[LaneMount] = (),
        home: Path | None = None,
    ) -> Lane:
        """A new lane on an image built here (its digest goes into the definition; the
        image itself is copied into the store at the first start). ``volumes`` must exist
        in the lane's store (:func:`vm.volumes.create_volume`). ``network`` is stored with
        the definition, so it is plain data: rules and presets, no Python callback and no
        secrets (their values would sit in the store). ``max_duration`` (seconds): each
        start runs at most this long, then its supervisor stops it cleanly. ``env``: the
        environment of every command run in it (a command's own variables win). ``mounts``:
        host directories at guest paths (virtiofs) wherever it starts; a lane with mounts
        cannot be paused (qemu cannot migrate virtiofs)."""
        home = home or lanekit_home()
        check_lane_name(name)
        check_resources(cpus, memory_mib)
        for key in env or {}:
            if not key or "=" in key or "\0" in key:
                raise LaneError(f"invalid environment variable {key!r}")
        mounts = [dataclasses.replace(m, host_path=os.path.abspath(m.host_path)) for m in mounts]
        for mount in mounts:
            check_guest_path(mount.path, "mount point")
        paths = [m.path for m in mounts] + [v.path for v in volumes]
        if len(set(paths)) != len(paths):
            raise LaneError("two mounts or volumes at the same guest path")
        if max_duration is not None and not max_duration > 0:
            raise LaneError(f"max duration {max_duration!r}: give a positive number of seconds")
        network = storable_network(network)
        entry = image if isinstance(image, ImageEntry) else state_paths(home)[0].lookup(image)
        if entry.digest is None:
            raise LaneError(f"image {entry.id!r} is not built here: `lanekit image build`")
        definition = LaneDefinition(
            name, entry, cpus, memory_mib, disk_size, dict(labels or {}), dict(network or {}),
            time.time(), tuple(volumes), max_duration, dict(env or {}), tuple(mounts),
        )  # fmt: skip
        objects = blockstore.open_store(store, s3_endpoint=s3_endpoint)
        for volume in volumes:
            check_guest_path(volume.path, "volume path")
            read_volume(objects, volume.name)
        write_definition(objects, definition)
        LaneCache.of(home).put(name, store, s3_endpoint, "created")
        return cls(definition, objects, store, s3_endpoint, home)

    @classmethod
    def get(
        cls,
        name: str,
        *,
        store: str | None = None,
        s3_endpoint: str | None = None,
        home: Path | None = None,
    ) -> Lane:
        """A lane this host knows, or any lane of ``store`` (a host that never saw it)."""
        home = home or lanekit_home()
        check_lane_name(name)
        cached = LaneCache.of(home).get(name)
        if store is None:
            if cached is None:
                raise LaneError(
                    f"this host knows no lane {name!r}: give its --store (or set LANEKIT_STORE)"
                )
            store, s3_endpoint = cached.store, s3_endpoint or cached.s3_endpoint
        elif cached is not None and cached.store != store:
            raise LaneError(f"this host knows a lane {name!r} in another store ({cached.store})")
        objects = blockstore.open_store(store, s3_endpoint=s3_endpoint)
        lane = cls(read_definition(objects, name), objects, store, s3_endpoint, home)
        if cached is None:
            LaneCache.of(home).put(name, store, s3_endpoint, "stopped")
        return lane

    @classmethod
    def list(
        cls,
        *,
        store: str | None = None,
        s3_endpoint: str | None = None,
        home: Path | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[LaneStatus]:
        """Every lane of ``store``, or every lane this host knows, with its state read from
        the store now (and the cache brought up to date); with ``labels``, only the lanes
        that carry all of them (an unreadable lane carries none)."""
        wanted = dict(labels or {})
        home = home or lanekit_home()
        if store is not None:
            objects = blockstore.open_store(store, s3_endpoint=s3_endpoint)
            names = [(n, store, s3_endpoint) for n in list_lane_names(objects)]
        else:
            names = [(c.name, c.store, c.s3_endpoint) for c in LaneCache.of(home).all()]
        statuses = []
        for name, lane_store, endpoint in names:
            try:
                lane = cls.get(name, store=lane_store, s3_endpoint=endpoint, home=home)
            except LaneNotFound:
                if store is None:  # removed elsewhere
                    LaneCache.of(home).forget(name)
                continue
            except LaneError as exc:
                if not wanted:
                    statuses.append(
                        LaneStatus(name, lane_store, "unreadable", False, error=str(exc))
                    )
                continue
            if wanted.items() <= lane.definition.labels.items():
                statuses.append(lane.status())
        return statuses

    # ------------------------------------------------------------ state

    def _supervisor_pid(self) -> int | None:
        """This host's live supervisor of the lane, if there is one; a dead one's leftovers
        (sockets, identity) are removed here."""
        record = live_supervisor(self.run_dir)
        if record is not None:
            return int(record["pid"])
        with runlock.if_free(self.run_dir) as free:
            if free:  # a dead supervisor's leftovers, not a starting one's files
                for leftover in (AGENT_SOCKET, CONTROL_SOCKET, IDENTITY):
                    with contextlib.suppress(FileNotFoundError):
                        (self.run_dir / leftover).unlink()
        return None

    def running_here(self) -> bool:
        """Whether a supervisor of the lane runs on this host (no store access)."""
        return self._supervisor_pid() is not None

    def status(self) -> LaneStatus:
        lease = root_lease(self.objects, self.name)
        local = self._supervisor_pid()
        holder: dict[str, Any] = lease["holder"] if lease else {}
        if lease is not None and lease["live"]:
            status = LaneStatus(
                self.name, self.store, "running", local is not None and holder.get("pid") == local,
                holder.get("host"), holder.get("pid"), lease["epoch"], since=lease["since"]
            )  # fmt: skip
        elif local is not None:
            status = LaneStatus(self.name, self.store, "starting", True, pid=local)
        else:
            status = self._status_at_rest(lease)
        LaneCache.of(self.home).put(
            self.name, self.store, self.s3_endpoint, status.state, status.host, status.pid
        )
        return dataclasses.replace(
            status, image=self.definition.image.id, labels=dict(self.definition.labels)
        )

    def _status_at_rest(self, lease: dict[str, Any] | None) -> LaneStatus:
        """Nobody runs it: paused, crashed (a held lease nobody renews), stopped or created."""
        try:
            record = read_paused(self.objects, self.name)
        except LaneError:  # a snapshot, unreadable: a start says so, --cold discards it
            record = {}
        if record is not None:
            return LaneStatus(self.name, self.store, "paused", False, since=record.get("saved"))
        if lease is None:
            return LaneStatus(
                self.name, self.store, "created", False, since=self.definition.created
            )
        holder = lease["holder"]
        if lease.get("state") == "held":
            fenced = read_fenced(self.run_dir)
            reason = (
                fenced["reason"]
                if fenced and fenced.get("epoch") == lease["epoch"]
                else f"its supervisor (host {holder.get('host')}, pid {holder.get('pid')}) "
                "died or lost the store without stopping it"
            )
            return LaneStatus(
                self.name, self.store, "crashed", False, holder.get("host"), holder.get("pid"),
                lease["epoch"], since=lease["renewed"], reason=reason
            )  # fmt: skip
        ended = read_ended(self.objects, self.name)
        reason = ended["reason"] if ended and ended.get("epoch") == lease["epoch"] else None
        return LaneStatus(
            self.name, self.store, "stopped", False, holder.get("host"), holder.get("pid"),
            lease["epoch"], since=lease["renewed"], reason=reason
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        """Everything known about the lane (JSON-ready): definition, state, its root disk's
        lease (holder, epoch), its volumes (with their writers), its memory snapshot."""
        status = self.status()
        lease = root_lease(self.objects, self.name)
        try:
            record = read_paused(self.objects, self.name)
            paused: dict[str, Any] | None = None
            if record is not None:
                paused = {
                    "id": record.get("id"), "saved": record.get("saved"),
                    "qemu": record.get("qemu"), "chunks": len(record["chunks"]),
                }  # fmt: skip
        except LaneError as exc:
            paused = {"error": str(exc)}
        volumes = []
        for volume in self.definition.volumes:
            entry: dict[str, Any] = dataclasses.asdict(volume)
            try:
                entry.update(volume_info(self.objects, volume.name))
            except (VMError, blockstore.BlockStoreError) as exc:
                entry["error"] = str(exc)
            volumes.append(entry)
        return {
            "definition": self.definition.to_json(),
            "status": status.to_json(),
            "lease": lease,
            "volumes": volumes,
            "paused": paused,
            "checkpoints": self.checkpoints(),
            "logs": {name: str(path) for name, path in self.log_paths().items()},
        }

    def log_paths(self) -> dict[str, Path]:
        """This host's logs of the lane: its supervisor's, and the guest console of its
        current (or last) run here."""
        return {"supervisor": self.run_dir / "supervisor.log", "console": self.run_dir / CONSOLE}

    # ------------------------------------------------------------ running

    def start(
        self, timeout: float = START_TIMEOUT, *, cold: bool = False, force: bool = False
    ) -> LaneStatus:
        """Start the lane's supervisor here; returns once the guest runs. A paused lane
        resumes where it was, unless ``cold`` (its memory snapshot is discarded and it boots
        from its disk). ``force`` takes the lane over at once from a holder on another host
        that is dead or cut off (it is fenced: it can never commit again). LaneError if it
        runs already, here or (without ``force``) elsewhere, or does not come up (with the
        supervisor's log); LaneBusy if another host (or start here) won the start."""
        log_path = self.run_dir / "supervisor.log"
        args = self._supervisor_args(cold, force)
        answer = spawn_supervisor(args, log_path, self.home, timeout, self._abandon_start)
        if answer.startswith(BUSY):
            raise LaneBusy(answer.removeprefix(BUSY))
        if answer.startswith("error: "):  # the supervisor said why: that is the whole story
            raise LaneError(f"lane {self.name!r} did not start: {answer.removeprefix('error: ')}")
        if answer != "ready":
            tail = log_tail(log_path)
            raise LaneError(
                f"lane {self.name!r} did not start: {answer or 'its supervisor died'}\n{tail}"
            )
        return self.status()

    def _abandon_start(self, pid: int) -> None:
        """A start that stopped waiting for its answer (interrupted, or none in time): its
        supervisor is stopped, not left booting a lane nobody waits for."""
        process = process_identity(pid)
        if process is not None:
            self._end_supervisor(pid, process, KILL_AFTER)

    def _supervisor_args(self, cold: bool, force: bool) -> builtins.list[str]:
        """Check that the lane may start here; the supervisor's arguments."""
        status = self.status()
        if status.state in ("running", "starting") and (status.here or not force):
            where = "here" if status.here else f"on host {status.host} (pid {status.pid})"
            hint = "" if status.here else ": stop it there, or take it over with --force"
            raise LaneError(f"lane {self.name!r} is {status.state} {where}{hint}")
        for mount in self.definition.mounts:
            if not os.path.isdir(mount.host_path):
                raise LaneError(
                    f"lane {self.name!r} mounts {mount.host_path} at {mount.path}, and this "
                    "host has no such directory"
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args = [self.name, self.store]
        if self.s3_endpoint:
            args += ["--s3-endpoint", self.s3_endpoint]
        return args + ["--cold"] * cold + ["--force"] * force

    def run(self, *, cold: bool = False, force: bool = False) -> int:
        """Be the lane's supervisor in this process (``lane start --attach``) until the lane
        stops: its log goes to stderr (and to the log file). The first SIGINT/SIGTERM stops
        it cleanly, a second kills the guest (the disk is still flushed and released).
        Returns 0 after a clean stop, 130 if the guest was killed, 1 if it failed or was
        fenced. Call it from the main thread (it handles the signals)."""
        from .supervisor import main

        args = self._supervisor_args(cold, force)
        with open(self.run_dir / "supervisor.log", "a") as log:
            terminal = sys.stderr
            sys.stderr = Tee(terminal, log)
            try:
                return main(args)
            finally:
                sys.stderr = terminal

    def resume(self, timeout: float = START_TIMEOUT) -> LaneStatus:
        """Resume a paused lane here (what :meth:`start` does with a paused lane); LaneError
        if it is not paused."""
        state = self.status().state
        if state != "paused":
            raise LaneError(
                f"lane {self.name!r} is not paused (it is {state}): nothing to resume"
                + (
                    "; `lanekit lane start` boots it"
                    if state in ("stopped", "created", "crashed")
                    else ""
                )
            )
        return self.start(timeout)

    def checkpoint(self, tag: str, timeout: float = PAUSE_TIMEOUT) -> dict[str, Any]:
        """Checkpoint the lane's root disk and volumes under ``tag``, with its definition as
        it is: a stopped lane's disks directly, a running lane's through its supervisor
        (the guest syncs first, so what it wrote is in). A fork (:meth:`fork`) makes a new
        lane of it. LaneError if the tag is taken, or the lane is paused, starting, never
        started, or runs on another host."""
        checkpointing.check_tag(self.name, tag)
        status = self.status()
        if status.state == "running" and status.here:
            reply, sock = self._control("checkpoint", timeout, tag=tag)
            sock.close()
            if "error" in reply:
                raise LaneError(f"lane {self.name!r}: {reply['error']}")
            return checkpointing.read_checkpoint(self.objects, self.name, tag)
        if status.state == "running":
            raise LaneError(
                f"lane {self.name!r} runs on host {status.host} (pid {status.pid}): "
                "checkpoint it there"
            )
        if status.state == "paused":
            raise LaneError(
                f"lane {self.name!r} is paused: its disks belong to its memory snapshot; "
                "resume it, then checkpoint"
            )
        if status.state == "starting":
            raise LaneError(f"lane {self.name!r} is starting: checkpoint it once it runs")
        return checkpointing.take_stopped(self.objects, self.definition, tag)

    def checkpoints(self) -> builtins.list[dict[str, Any]]:
        """The lane's checkpoints: tag, when, whether it was running, volumes."""
        return checkpointing.summaries(self.objects, self.name)

    def fork(self, tag: str, new_name: str) -> Lane:
        """A new lane ``new_name`` in this lane's store, made of its checkpoint ``tag``: the
        definition as it was then, forks of its disks (nothing copied; its volume ``V``
        becomes the volume ``NEW.V``). This lane is untouched."""
        definition = checkpointing.fork(self.objects, self.name, tag, new_name)
        LaneCache.of(self.home).put(new_name, self.store, self.s3_endpoint, "stopped")
        return Lane(definition, self.objects, self.store, self.s3_endpoint, self.home)

    def _control(self, op: str, timeout: float, **fields: Any) -> tuple[dict[str, Any], Any]:
        return control_request(self.name, self.run_dir, op, timeout, **fields)

    def stop(self, timeout: float = STOP_TIMEOUT) -> LaneStatus:
        """Stop the lane cleanly (the guest syncs and powers off, the disk is flushed and
        released); returns once its supervisor is gone. A lane still starting here has its
        start cancelled; one that crashed here (its supervisor died) has its disks'
        leases released: either way it ends stopped."""
        return self._end("stop", timeout)

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> LaneStatus:
        """Save the running guest's memory (qemu's migration stream) and its disk's state
        into the store and end; the next :meth:`start`, on any host with the same qemu,
        resumes its processes where they were. Refused for lanes with volumes."""
        return self._end("pause", timeout)

    def _end(self, op: str, timeout: float) -> LaneStatus:
        status = self.status()
        if op == "stop" and status.state == "crashed":
            return self._stop_crashed(status)
        if op == "stop" and status.state == "starting" and status.pid is not None:
            return self._stop_unasked(status.pid, timeout)
        if status.state != "running":
            raise LaneError(f"lane {self.name!r} is not running")
        if not status.here:
            raise LaneError(
                f"lane {self.name!r} runs on host {status.host} (pid {status.pid}): stop it there"
            )
        pid = status.pid
        try:
            reply, sock = self._control(op, timeout)
        except LaneError:  # its guest still boots (no control socket yet), or it hangs
            if op != "stop" or pid is None:
                raise
            return self._stop_unasked(pid, timeout)
        sock.close()
        if "error" in reply:
            raise LaneError(f"lane {self.name!r}: {reply['error']}")
        deadline = time.monotonic() + timeout
        while pid is not None and self._supervisor_pid() == pid:
            if time.monotonic() > deadline:
                raise LaneError(f"lane {self.name!r} did not {op} within {timeout:.0f} s")
            time.sleep(EXIT_POLL)
        status = self.status()
        if op == "pause" and status.state != "paused":
            raise LaneError(
                f"lane {self.name!r} did not pause (it is {status.state}):\n"
                f"{log_tail(self.run_dir / 'supervisor.log')}"
            )
        return status

    def _stop_unasked(self, pid: int, timeout: float) -> LaneStatus:
        """Stop this host's supervisor ``pid`` of the lane without its control socket."""
        record = live_supervisor(self.run_dir)
        if record is not None and int(record["pid"]) == pid:
            self._end_supervisor(pid, str(record["process"]), min(timeout, KILL_AFTER))
        return self.status()

    def _end_supervisor(self, pid: int, process: str, grace: float) -> None:
        """SIGTERM stops the supervisor cleanly (or cancels its start); one that has not
        ended within ``grace`` seconds is killed (what it started dies with it) and the
        leases its dead process holds are released here, so the lane is stopped, not
        crashed."""
        if end_process(pid, process, grace):
            self._release_dead(process, f"its supervisor (pid {pid}) did not end within "
                               f"{grace:.0f} s of SIGTERM and was killed")  # fmt: skip

    def _stop_crashed(self, status: LaneStatus) -> LaneStatus:
        """A crashed lane whose holder died on this host: its leases are released (nothing
        can write through them any more). One held from another host cannot be judged here."""
        lease = root_lease(self.objects, self.name)
        holder = lease["holder"] if lease else {}
        if not holder_is_dead(holder):
            raise LaneError(
                f"lane {self.name!r} crashed on host {status.host} (pid {status.pid}): "
                "`lanekit lane start` takes it over"
            )
        self._release_dead(str(holder["process"]), f"stopped after a crash: {status.reason}")
        return self.status()

    def _release_dead(self, process: str, reason: str) -> None:
        disks = [disk_name(v.name) for v in self.definition.volumes]
        for disk in disks:
            release_dead_lease(self.objects, disk, process)
        epoch = release_dead_lease(self.objects, root_disk_name(self.name), process)
        if epoch is not None:
            write_ended(self.objects, self.name, epoch, reason)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AgentMachine]:
        """The running lane's machine (exec, exec_stream, fs), through its supervisor on
        this host; the lane goes on running when this ends."""
        async with connect_running(self.name, self.definition.env, self.home) as machine:
            yield machine

    def remove(self) -> builtins.list[str]:
        """Delete a stopped lane: its definition, root disk and checkpoints (blocks go at
        ``disk gc``; its volumes stay). Returns the lanes forked from it: they lose nothing
        (a fork's disks reference what they share with it, and ``disk gc`` keeps that)."""
        state = self.status().state
        if state in ("running", "starting"):
            raise LaneError(f"lane {self.name!r} is {state}: stop it first")
        forks = checkpointing.forks_of(self.objects, self.name, list_lane_names(self.objects))
        discard(self.objects, self.name, {})  # every snapshot, and what a crash left
        checkpointing.remove_all(self.objects, self.definition)
        delete_ended(self.objects, self.name)
        delete_definition(self.objects, self.name)
        delete_disk(self.objects, root_disk_name(self.name))
        LaneCache.of(self.home).forget(self.name)
        return forks
