"""Lanes: what running detached under a supervisor, moving hosts and pausing cost.

Cases, all in one run on the same machine (two LANEKIT_HOMEs stand for two hosts, sharing
the kernel cache; one SeaweedFS):

- *boot to first exec result*: a sandbox booted in-process (``Sandbox.boot``, what
  ``vm run`` does; the baseline) vs ``lane.start()`` then an exec through the supervisor;
  the same lane started on the other host (root disk in S3, image fetched lazily); and
  resumed there from a memory snapshot (``lane.pause()`` on the first host);
- *exec round trip*: ``exec(["true"])`` on the in-process machine (baseline) vs through
  the supervisor's agent relay (``lane.connect()``), and ``lanekit lane exec NAME -- true``
  (what an agent that runs a process per command pays: interpreter, imports, connect);
- *fetched before the first exec*: every byte the other host's supervisor read from the
  store (its S3 client's GET bodies: definition, disk heads and maps, blocks) until its
  first exec result, against the image's size (goal: at most 5%);
- *takeover*: kill -9 of the first host's supervisor, then ``start(force=True)`` on the
  other host, to its first exec result;
- *lane stop* and *lane pause* (memory saved into S3, also per GiB of guest RAM; a mostly
  idle 256 MiB guest, and a 1 GiB guest holding 256 MiB of random data, which also pauses
  into the embedded default store, a local directory), the snapshot's stored size, and the
  pause against the store's ceiling: the same stored bytes PUT raw, as many at a time as a
  pause puts, right after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

import blockstore
from tools.s3server import S3Server
from vm.lanes import Lane, paused, zygote
from vm.launcher import Sandbox
from vm.machine import AgentMachine
from vm.transfer import image_disk

from .harness import Report

DIRECT = "in-process sandbox (vm run's way)"
LANE = "lane, started here (supervisor, relay)"
MOVED = "lane, started on the other host (disk in S3)"
RESUMED = "lane, resumed on the other host (memory from S3)"
RESUMED_SPAWNED = "lane, resumed on the other host, no warm zygote (supervisor spawned)"
CLI = "lanekit lane exec NAME -- true (a process per command)"
BOOT = "boot to first exec result"
EXEC = "exec round trip, p50"
FETCHED = "fetched from the store before the first exec"
FETCHED_SHARE = "fetched before the first exec, share of the image"
TAKEOVER = "takeover after kill -9 (--force), to first exec result"
PAUSE = "lane pause (memory into the store)"
PAUSE_PER_GIB = "lane pause per GiB of guest RAM"
PAUSE_VS_PUT = "lane pause / raw PUTs of its stored bytes"
MEMORY_MIB = 256
BIG_MIB, FILLED_MIB = 1024, 256
"""The second pause case: a 1 GiB guest holding this much incompressible data in tmpfs."""
BIG = f"{BIG_MIB} MiB guest, {FILLED_MIB} MiB of random data in memory (A to B)"
BIG_RESUMED = f"{BIG_MIB} MiB guest with {FILLED_MIB} MiB of data, resumed on the other host"
BIG_LOCAL = f"{BIG}, embedded store (file://)"
BIG_LOCAL_RESUMED = f"{BIG_RESUMED}, embedded store (file://)"
BIG_IDLE = f"{BIG_MIB} MiB guest, mostly idle (A to B)"
BIG_IDLE_RESUMED = f"{BIG_MIB} MiB guest, mostly idle, resumed on the other host"


async def _round_trips(machine: AgentMachine, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.monotonic()
        await machine.exec(["true"])
        times.append(time.monotonic() - start)
    return statistics.median(times)


async def _direct(home: Path, count: int) -> tuple[float, float]:
    start = time.monotonic()
    async with Sandbox("shell", home=home, memory_mib=256).boot() as machine:
        await machine.exec(["true"])
        boot = time.monotonic() - start
        return boot, await _round_trips(machine, count)


async def _lane_exec(lane: Lane, count: int) -> float:
    async with lane.connect() as machine:
        await machine.exec(["true"])
        return await _round_trips(machine, count) if count else 0.0


def _cli_round_trip(name: str, home: Path, count: int) -> float:
    env = {**os.environ, "LANEKIT_HOME": str(home)}
    times = []
    for _ in range(count):
        start = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "tools.cli", "lane", "exec", name, "--", "true"],
            env=env, check=True,
        )  # fmt: skip
        times.append(time.monotonic() - start)
    return statistics.median(times)


def _start_to_exec(lane: Lane) -> float:
    start = time.monotonic()
    lane.start()
    trio.run(_lane_exec, lane, 0)
    return time.monotonic() - start


def _bytes_read(lane: Lane) -> int | None:
    """What the lane's supervisor has read from its store so far (S3 stores count it)."""
    reply, sock = lane._control("status", 30)
    sock.close()
    read = reply.get("ok", {}).get("store_bytes_read")
    return None if read is None else int(read)


def _takeover(crashed: Lane, there: Lane) -> float:
    """kill -9 of ``crashed``'s supervisor, then a forced start on the other host: seconds
    from the kill to the first exec result there."""
    pid = crashed._supervisor_pid()
    assert pid is not None
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    there.start(force=True)
    trio.run(_lane_exec, there, 0)
    return time.monotonic() - start


def _pause(
    report: Report, objects: blockstore.ObjectStore, lane: Lane, case: str, memory_mib: int
) -> None:
    """Pause ``lane``, timed; its time per GiB of guest RAM and its snapshot's stored size."""
    start = time.monotonic()
    lane.pause()
    seconds = time.monotonic() - start
    report.add(PAUSE, case, seconds)
    report.add(PAUSE_PER_GIB, case, seconds / (memory_mib / 1024))
    chunks = [objects.get(i.key).data for i in objects.list(f"lanes/{lane.name}/memory/")]
    report.add("memory snapshot stored", case, sum(map(len, chunks)) / (1 << 20))
    report.add(PAUSE_VS_PUT, case, seconds / _put_all(objects, chunks))


def _put_all(objects: blockstore.ObjectStore, chunks: list[bytes]) -> float:
    """Seconds to PUT ``chunks``, ``paused.PARALLEL`` at a time (then deleted)."""
    keys = [f"bench/ceiling/{uuid.uuid4().hex}" for _ in chunks]
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(paused.PARALLEL) as pool:
            list(pool.map(objects.put, keys, chunks))
        return time.monotonic() - start
    finally:
        for key in keys:
            objects.delete(key)


def _big_pause(
    report: Report, objects: blockstore.ObjectStore, store: str, endpoint: str | None,
    home_a: Path, home_b: Path, cases: tuple[str, str] = (BIG, BIG_RESUMED),
    filled_mib: int = FILLED_MIB,
) -> None:  # fmt: skip
    """Pause a big guest whose memory holds ``filled_mib`` of random data on A, resume on
    B; ``cases`` names the pause's and the resume's rows."""
    name = f"bench-big-{uuid.uuid4().hex[:8]}"
    lane = Lane.create(name, "shell", store=store, s3_endpoint=endpoint, memory_mib=BIG_MIB,
                       home=home_a)  # fmt: skip
    there = Lane.get(name, store=store, s3_endpoint=endpoint, home=home_b)
    try:
        lane.start()

        async def fill() -> None:
            async with lane.connect() as machine:
                fill = f"dd if=/dev/urandom of=/dev/shm/fill bs=1M count={filled_mib}"
                result = await machine.exec(["sh", "-c", fill])
                assert result.exit_code == 0, result.stderr_text

        if filled_mib:
            trio.run(fill)
        _pause(report, objects, lane, cases[0], BIG_MIB)
        report.add(BOOT, cases[1], _start_to_exec(there))
        there.stop()
    finally:
        for each in (lane, there):
            if each.running_here():
                each.stop()
        lane.remove()


def run(*, quick: bool = False) -> Report:
    repeats, count = (1, 5) if quick else (3, 30)
    report = Report("lanes", "Detached lanes: start, exec through the relay, move, pause.")
    report.metric(BOOT, "s", higher_is_better=False, baseline=DIRECT)
    report.metric(EXEC, "ms", higher_is_better=False, baseline=DIRECT)
    report.metric(FETCHED, "MiB", higher_is_better=False)
    report.metric(FETCHED_SHARE, "%", higher_is_better=False)
    report.metric(TAKEOVER, "s", higher_is_better=False)
    report.metric("lane stop", "s", higher_is_better=False)
    report.metric(PAUSE, "s", higher_is_better=False)
    report.metric(PAUSE_PER_GIB, "s/GiB", higher_is_better=False)
    report.metric("memory snapshot stored", "MiB", higher_is_better=False)
    report.metric(PAUSE_VS_PUT, "x", higher_is_better=False)
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-lanes-") as tmp:
        _measure(report, Path(tmp), repeats, count)
    report.notes += [
        f"1 vCPU, {MEMORY_MIB} MiB guests (one {BIG_MIB} MiB); shell image (busybox); TCG unless "
        "KVM works",
        "both hosts are one machine: kill -9 leaves a lease whose holder is known dead here, "
        "so the takeover does not wait for it with or without --force",
        "share of the image: fetched bytes / the image's size (its raw size on the host "
        "that built it); the other host shares the first one's kernel cache (a kernel and "
        "initramfs are the host's, not the lane's), so what it fetches is the image's and "
        "the lane disk's blocks and metadata",
        "pause: from the request to the supervisor's exit (memory streamed into the store, disk "
        "checkpoint, disk flushed, lease released); per GiB = that time / the guest's RAM. "
        f"The {MEMORY_MIB} MiB guest's memory is mostly free (zero pages cost little), so "
        f"fixed costs dominate its per-GiB figure (a mostly idle {BIG_MIB} MiB guest shows "
        f"what a bigger one costs); the other {BIG_MIB} MiB guest first writes "
        f"{FILLED_MIB} MiB from /dev/urandom into tmpfs, which lz4 cannot shrink (such "
        "chunks are stored uncompressed). 'raw PUTs of its stored bytes': the snapshot's "
        "chunks read back and PUT again as they are, as many at a time as a pause puts: the "
        "store's ceiling for that snapshot (on this machine SeaweedFS's own CPU, sharing "
        "the two cores with the supervisor and qemu, bounds it: about 13 ms of its CPU per MiB "
        "stored); the same guest also pauses into the embedded default store, a local "
        "directory (each chunk written and fsynced as a file)",
        "resume: from lane.start() on the other host to its first exec result (supervisor "
        "start, snapshot fetched from the store and streamed into qemu as it arrives, clock set)",
        "zygote: a host's first lane start leaves a warm zygote that forks the supervisors of "
        "its next starts for ten minutes (imports and the S3 model already loaded); every "
        "start here has one but the first of the first repeat on each host, and the case "
        "'no warm zygote' disables it (LANEKIT_ZYGOTE_IDLE=0), as a host idle for ten "
        "minutes",
        "times on a 2-core machine are noisy (compare the ratios of one run); sizes are exact",
    ]
    return report


@contextlib.contextmanager
def _no_zygote() -> Iterator[None]:
    """Starts spawn their supervisor, as a host that started no lane in ten minutes."""
    os.environ[zygote.IDLE_ENV] = "0"
    try:
        yield
    finally:
        del os.environ[zygote.IDLE_ENV]


def _measure(report: Report, tmp: Path, repeats: int, count: int) -> None:
    try:
        _measure_hosts(report, tmp, repeats, count)
    finally:
        for home in (tmp / "host-a", tmp / "host-b"):
            zygote.stop(home)


def _measure_hosts(report: Report, tmp: Path, repeats: int, count: int) -> None:
    home_a, home_b = tmp / "host-a", tmp / "host-b"
    built = Sandbox("shell", home=home_a)
    built._local_image()
    built.kernels.ensure(variant=built.runtime_variant)
    home_b.mkdir()
    (home_b / "kernels").symlink_to(home_a / "kernels")
    (tmp / "s3").mkdir()
    with S3Server(tmp / "s3") as server:
        server.client().create_bucket(Bucket="lanes")
        os.environ.update(server.env)
        store, endpoint = "s3://lanes/bench", server.endpoint
        objects = blockstore.open_store(store, s3_endpoint=endpoint)
        for _ in range(repeats):
            boot, trip = trio.run(_direct, home_a, count)
            report.add(BOOT, DIRECT, boot)
            report.add(EXEC, DIRECT, trip * 1000)

            name = f"bench-{uuid.uuid4().hex[:8]}"
            lane = Lane.create(name, "shell", store=store, s3_endpoint=endpoint,
                               memory_mib=MEMORY_MIB, home=home_a)  # fmt: skip
            there: Lane | None = None
            try:
                report.add(BOOT, LANE, _start_to_exec(lane))
                report.add(EXEC, LANE, trio.run(_lane_exec, lane, count) * 1000)
                commands = max(3, count // 3)
                report.add(EXEC, CLI, _cli_round_trip(name, home_a, commands) * 1000)
                start = time.monotonic()
                lane.stop()
                report.add("lane stop", LANE, time.monotonic() - start)

                there = Lane.get(name, store=store, s3_endpoint=endpoint, home=home_b)
                report.add(BOOT, MOVED, _start_to_exec(there))
                fetched = _bytes_read(there)
                if fetched is not None:
                    image_size = blockstore.disk_info(
                        objects, image_disk(str(lane.definition.image.digest))
                    )["size"]
                    report.add(FETCHED, MOVED, fetched / (1 << 20))
                    report.add(FETCHED_SHARE, MOVED, 100 * fetched / image_size)
                _pause(report, objects, there, MOVED, MEMORY_MIB)

                report.add(BOOT, RESUMED, _start_to_exec(lane))
                lane.pause()
                with _no_zygote():
                    report.add(BOOT, RESUMED_SPAWNED, _start_to_exec(lane))
                report.add(TAKEOVER, MOVED, _takeover(lane, there))
                there.stop()
                _big_pause(report, objects, store, endpoint, home_a, home_b)
                _big_pause(report, objects, store, endpoint, home_a, home_b,
                           (BIG_IDLE, BIG_IDLE_RESUMED), filled_mib=0)  # fmt: skip
                local = f"file://{tmp / 'local-store'}"
                _big_pause(report, blockstore.open_store(local), local, None, home_a, home_b,
                           (BIG_LOCAL, BIG_LOCAL_RESUMED))  # fmt: skip
            finally:
                for each in (lane, there):
                    if each is not None and each.running_here():
                        each.stop()
                lane.remove()
