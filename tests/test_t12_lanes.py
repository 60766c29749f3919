"""Lanes across two hosts: two LANEKIT_HOMEs (separate caches, supervisors, image stores;
the kernel cache shared, since a kernel is the host's) on one SeaweedFS.

The journey boots three times and is one test on purpose: every step needs the state the
one before it left (a lane running on A, then stopped, then running on B)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import blockstore
import blockstore.lease
from tests.blockdev import readable, wait_for
from tests.test_t4_cli_startup import loaded_after
from vm.lanes import Lane, LaneError, LaneStatus, zygote
from vm.lanes.cache import LaneCache
from vm.lanes.definition import root_disk_name, runner
from vm.launcher import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.slow]


class Host:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = {**env, "LANEKIT_HOME": str(home)}

    def lanekit(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *args], capture_output=True, timeout=timeout,
            env=self.env,
        )  # fmt: skip

    def supervisor(self, name: str) -> int:
        return int(json.loads((self.home / "lanes" / name / "supervisor.json").read_text())["pid"])


@pytest.fixture(scope="module")
def two_hosts(vm_home: Path, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[Host, Host, str, str]
]:  # fmt: skip
    built = Sandbox("shell", home=vm_home)
    built._local_image()  # host A has built the image, and the kernel B shares
    built.kernels.ensure(variant=built.runtime_variant)
    host_b = tmp_path_factory.mktemp("host-b")
    (host_b / "kernels").symlink_to(vm_home / "kernels")
    env = {**os.environ, **s3.env}
    store = f"s3://{s3.new_bucket()}/lanes"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.env.items():
            patch.setenv(key, value)
        yield Host(vm_home, env), Host(host_b, env), store, s3.endpoint
    # Lane starts go through the warm zygote (a fallback to a spawn would hide it).
    assert "forked supervisor" in (vm_home / "lanes" / zygote.LOG).read_text()
    for host in (vm_home, host_b):
        forget_lanes(host)


def forget_lanes(home: Path) -> None:
    """Kill what a failed test left running and forget its lanes, so that host A (the
    worker's shared ``vm_home``) lists no lanes of this test in the next one."""
    for identity in (home / "lanes").glob("*/supervisor.json"):
        record = json.loads(identity.read_text())
        if blockstore.process_identity(record["pid"]) == record["process"]:
            os.kill(record["pid"], signal.SIGKILL)
    cache = LaneCache.of(home)
    for lane in cache.all():
        cache.forget(lane.name)
    assert zygote.stop(home)


def loaded_by_lane_exec(host: Host, name: str) -> list[str]:
    """What of the heavy parts a ``lane exec`` to a lane running on ``host`` loads: none is
    the goal, since an agent's every command is a process of its own."""
    command = (
        f"from tools.cli import main\nassert main(['lane', 'exec', {name!r}, '--', 'true']) == 0"
    )
    return loaded_after(command, env=host.env)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def interactive_shell(host: Host, *args: str) -> tuple[int, bytes]:
    """``lanekit ARGS`` under a real terminal: a command, then ``exit 3``."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(host.env)
        os.execv(sys.executable, [sys.executable, "-m", "tools.cli", *args])
    seen = b""

    def until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            if readable(fd, 1):
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    break

    try:
        until(b"# ")
        os.write(fd, b"echo $((40+2))\n")
        until(b"42")
        os.write(fd, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), seen
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(blockstore.process_identity(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.1)


def test_a_lane_runs_detached_stops_and_moves_to_another_host(
    two_hosts: tuple[Host, Host, str, str],
) -> None:
    a, b, store, endpoint = two_hosts
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    assert a.lanekit("volume", "create", "data", "--size", "32M", *s3).returncode == 0
    made = a.lanekit(
        "lane", "create", "journey", "--image", "shell", "--memory", "256",
        "--volume", "data:/data", *s3,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    again = a.lanekit("lane", "create", "journey", "--image", "shell", *s3)
    assert again.returncode == 1 and b"exists" in again.stderr and b"Traceback" not in again.stderr

    started = a.lanekit("lane", "start", "journey")  # the CLI returns; the lane runs on
    assert started.returncode == 0, started.stderr
    assert b"running (here" in started.stdout
    run = a.home / "lanes" / "journey"
    for sock in ("agent.sock", "control.sock", "supervisor.json"):  # the last holds its env
        assert stat.S_IMODE((run / sock).stat().st_mode) == 0o600
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    supervisor_a = a.supervisor("journey")
    assert os.getsid(supervisor_a) == supervisor_a  # its own session: the CLI's end is not its

    done = a.lanekit(
        "lane", "exec", "journey", "--",
        "sh", "-c", "echo out; echo err >&2; echo v1 > /root/note; echo d1 > /data/x; sync; exit 3",
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (3, b"out\n"), done.stderr
    assert b"err\n" in done.stderr
    assert loaded_by_lane_exec(a, "journey") == []
    code, seen = interactive_shell(a, "lane", "exec", "-it", "journey", "--", "sh")
    assert code == 3, seen[-2000:]
    mounted = a.lanekit("lane", "exec", "journey", "--", "awk", "$2 == \"/data\" {print $3}",
                        "/proc/mounts")  # fmt: skip
    assert mounted.stdout == b"ext4\n", mounted.stderr
    no_pause = a.lanekit("lane", "pause", "journey")
    assert no_pause.returncode == 1 and b"this lane has volumes" in no_pause.stderr
    in_use = a.lanekit("volume", "rm", "data", *s3)
    assert in_use.returncode == 1 and b"attached for writing" in in_use.stderr, in_use.stderr

    async def two_at_once() -> list[str]:
        lane = Lane.get("journey", home=a.home)
        async with lane.connect() as m1, lane.connect() as m2:
            results: list[str] = ["", ""]

            async def one(i: int, machine: Any) -> None:
                results[i] = await machine.exec_text(["sh", "-c", f"sleep 1; echo {i}"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0, m1)
                nursery.start_soon(one, 1, m2)
            assert await m1.read_file("/root/note") == b"v1\n"
        return results

    assert trio.run(two_at_once) == ["0\n", "1\n"]

    # Host B sees the lane running elsewhere and may not start it.
    busy = b.lanekit("lane", "start", "journey", *s3)
    assert busy.returncode == 1 and b"is running on host" in busy.stderr, busy.stderr
    seen = json.loads(b.lanekit("lane", "ls", "--json").stdout)
    assert [(s["name"], s["state"], s["here"]) for s in seen] == [("journey", "running", False)]
    stopped_elsewhere = b.lanekit("lane", "stop", "journey")
    assert stopped_elsewhere.returncode == 1 and b"stop it there" in stopped_elsewhere.stderr

    qemu_a = children_of(supervisor_a)
    assert qemu_a
    stopped = a.lanekit("lane", "stop", "journey")
    assert stopped.returncode == 0 and b"stopped" in stopped.stdout, stopped.stderr
    wait_gone([supervisor_a, *qemu_a])
    assert not (run / "agent.sock").exists() and not (run / "control.sock").exists()
    seen = json.loads(a.lanekit("lane", "ls", "--json").stdout)
    assert [(s["state"], s["reason"]) for s in seen] == [("stopped", "stop requested")]
    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    assert runner(objects, "journey") is None
    not_running = a.lanekit("lane", "exec", "journey", "--", "true")
    assert not_running.returncode == 1 and b"not running on this host" in not_running.stderr

    # Host B, which built nothing, starts it with everything the guest wrote.
    moved = b.lanekit("lane", "start", "journey", *s3)
    assert moved.returncode == 0, moved.stderr
    note = b.lanekit("lane", "exec", "journey", "--", "cat", "/root/note", "/data/x")
    assert note.stdout == b"v1\nd1\n", note.stderr
    assert not (b.home / "images" / "sha256").exists()
    state_a = json.loads(a.lanekit("lane", "ls", "--json").stdout)
    assert [(s["state"], s["here"]) for s in state_a] == [("running", False)]
    b.lanekit("lane", "exec", "journey", "--", "sh", "-c", "echo v2 > /root/note; sync")

    # kill -9 of the supervisor: its qemu goes with it; the next ls and start clean up.
    supervisor_b = b.supervisor("journey")
    qemu_b = children_of(supervisor_b)
    os.kill(supervisor_b, signal.SIGKILL)
    wait_gone(qemu_b)
    seen = json.loads(b.lanekit("lane", "ls", "--json").stdout)
    assert [s["state"] for s in seen] == ["crashed"]  # its lease was never released
    assert "died" in seen[0]["reason"] and seen[0]["pid"] == supervisor_b
    assert not (b.home / "lanes" / "journey" / "agent.sock").exists()
    restarted = b.lanekit("lane", "start", "journey")
    assert restarted.returncode == 0, restarted.stderr
    note = b.lanekit("lane", "exec", "journey", "--", "cat", "/root/note")
    assert note.stdout == b"v2\n", note.stderr
    busy_rm = b.lanekit("lane", "rm", "journey")
    assert busy_rm.returncode == 1 and b"stop it first" in busy_rm.stderr

    # SIGTERM to the supervisor is a clean stop; a second one kills the guest, and the
    # disk is still flushed and released (tools/stopping.py's semantics).
    supervisor_b = b.supervisor("journey")
    qemu_b = children_of(supervisor_b)
    os.kill(supervisor_b, signal.SIGTERM)
    time.sleep(0.3)
    os.kill(supervisor_b, signal.SIGTERM)
    wait_gone([supervisor_b, *qemu_b], timeout=120)
    assert runner(objects, "journey") is None
    lease = blockstore.disk_info(objects, root_disk_name("journey"))["lease_holder"]
    assert lease is None  # released, not left to expire
    log = (b.home / "lanes" / "journey" / "supervisor.log").read_text()
    assert "SIGTERM: stopping cleanly" in log and "lane journey stopped" in log
    assert "SIGTERM again: killing the guest now" in log

    removed = b.lanekit("lane", "rm", "journey")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(b.lanekit("lane", "ls", "--json").stdout) == []
    assert json.loads(a.lanekit("lane", "ls", "--json").stdout) == []
    assert a.lanekit("volume", "rm", "data", *s3).returncode == 0
    assert a.lanekit("volume", "ls", *s3).stdout == b""


def test_lane_errors_are_one_line(two_hosts: tuple[Host, Host, str, str]) -> None:
    a, b, store, endpoint = two_hosts
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    for host, args, message in (
        (b, ("lane", "start", "nowhere"), b"give its --store (or set LANEKIT_STORE)"),
        (b, ("lane", "create", "x", "--image", "shell"), b"give --store URL or set LANEKIT_STORE"),
        (b, ("volume", "ls"), b"give --store URL or set LANEKIT_STORE"),
        (a, ("lane", "create", "x", "--image", "shell", "--max-duration", "0", *s3), b"0"),
        (a, ("lane", "create", "x", "--image", "shell", "--max-duration", "5y", *s3), b"5y"),
        (b, ("lane", "logs", "nowhere", *s3), b"no lane named"),
        (b, ("lane", "start", "nowhere", *s3), b"no lane named 'nowhere'"),
        (a, ("lane", "create", "x", "--image", "no-such-image", *s3), b"no-such-image"),
        (a, ("lane", "create", "bad/name", "--image", "shell", *s3), b"invalid lane name"),
        (a, ("lane", "exec", "nowhere", *s3, "--"), b"give the command to run"),
    ):
        done = host.lanekit(*args)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)
        assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") == 1, done.stderr

    # Never started on A, so its image was never copied into the store: B cannot boot it,
    # and says why (with the supervisor's log) instead of hanging.
    made = a.lanekit(
        "lane", "create", "unborn", "--image", "shell", "--label", "team=red", "--label", "k=1",
        *s3,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert a.lanekit("lane", "create", "other", "--image", "shell", *s3).returncode == 0
    # B has never seen either lane: LANEKIT_STORE is its --store.
    b_env = Host(b.home, {**b.env, "LANEKIT_STORE": store})
    listed = b_env.lanekit("lane", "ls")
    rows = [line.split("\t") for line in listed.stdout.decode().splitlines()]
    assert rows[0] == ["NAME", "STATUS", "HOST", "PID", "SINCE", "IMAGE", "STORE"], rows
    assert [(r[0], r[1], r[5], r[6]) for r in rows[1:]] == [
        ("other", "created", "shell", store), ("unborn", "created", "shell", store)
    ]  # fmt: skip
    for labels, names in (((), ["other", "unborn"]), (("team=red",), ["unborn"]),
                          (("team=red", "k=1"), ["unborn"]), (("team=red", "k=2"), []),
                          (("team=blue",), [])):  # fmt: skip
        args = [x for label in labels for x in ("--label", label)]
        seen = json.loads(b_env.lanekit("lane", "ls", "--json", *args).stdout)
        assert [s["name"] for s in seen] == names, labels
    info = json.loads(b_env.lanekit("lane", "info", "unborn").stdout)
    assert info["definition"]["labels"] == {"team": "red", "k": "1"}
    assert (info["status"]["state"], info["lease"], info["paused"]) == ("created", None, None)
    no_logs = b_env.lanekit("lane", "logs", "unborn")
    assert no_logs.returncode == 1 and b"never ran here" in no_logs.stderr
    assert a.lanekit("lane", "rm", "other").returncode == 0
    failed = b.lanekit("lane", "start", "unborn", *s3)
    assert failed.returncode == 1 and b"did not start" in failed.stderr, failed.stderr
    assert b"not on this host" in failed.stderr or b"not built" in failed.stderr, failed.stderr
    assert runner(blockstore.open_store(store, s3_endpoint=endpoint), "unborn") is None

    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    objects.put("lanes/unborn/paused", b"garbage")
    objects.put("lanes/unborn/memory/x/000000", b"a chunk")
    unreadable = b.lanekit("lane", "start", "unborn")
    assert unreadable.returncode == 1 and b"record is unreadable" in unreadable.stderr
    assert b"--cold" in unreadable.stderr
    cold = b.lanekit("lane", "start", "unborn", "--cold")  # discards it, then fails as before
    assert cold.returncode == 1 and b"did not start" in cold.stderr, cold.stderr
    assert list(objects.list("lanes/unborn/memory/")) == []
    with pytest.raises(blockstore.ObjectNotFound):
        objects.get("lanes/unborn/paused")

    objects.put("lanes/unborn/definition", b"{not json")
    broken = a.lanekit("lane", "ls")  # the others are still listed; this one says why
    assert broken.returncode == 0 and b"unborn\tunreadable: " in broken.stdout, broken.stderr
    assert b"definition is unreadable" in broken.stdout
    start = a.lanekit("lane", "start", "unborn")
    assert start.returncode == 1 and b"definition is unreadable" in start.stderr
    with pytest.raises(LaneError, match="unreadable"):
        Lane.get("unborn", home=a.home)
    objects.delete("lanes/unborn/definition")


def test_pause_here_resume_there(two_hosts: tuple[Host, Host, str, str]) -> None:
    """A running process survives a pause on A and a resume on B (memory through qemu's
    migration stream, in the store); a corrupted snapshot is refused, nothing lost."""
    a, b, store, endpoint = two_hosts
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    lane = Lane.create("napper", "shell", store=store, s3_endpoint=endpoint, memory_mib=256,
                       home=a.home)  # fmt: skip
    lane.start()
    counter = "echo $$; i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.2; done"

    async def start_counter() -> str:
        async with lane.connect() as machine:
            handle = await machine.exec_stream(["sh", "-c", counter])
            async for event in handle:
                return event.data.decode().strip()  # it runs on after we leave
        raise AssertionError("the counter printed nothing")

    pid = trio.run(start_counter)
    before = a.lanekit("lane", "exec", "napper", "--", "sh", "-c", "sleep 1; cat /root/count")
    counted = int(before.stdout)
    supervisor = a.supervisor("napper")
    qemu = children_of(supervisor)
    paused = a.lanekit("lane", "pause", "napper")
    assert paused.returncode == 0 and b"paused" in paused.stdout, paused.stderr
    wait_gone([supervisor, *qemu])
    assert [s["state"] for s in json.loads(b.lanekit("lane", "ls", "--json", *s3).stdout)] == [
        "paused"
    ]
    assert b.lanekit("lane", "pause", "napper", *s3).returncode == 1  # not running
    info = json.loads(b.lanekit("lane", "info", "napper").stdout)
    assert info["status"]["state"] == "paused" and info["paused"]["chunks"] > 0
    assert info["lease"]["state"] == "released" and info["paused"]["id"]

    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    chunks = sorted(i.key for i in objects.list("lanes/napper/memory/"))
    assert len(chunks) == info["paused"]["chunks"]
    first_chunk, last_chunk = objects.get(chunks[0]).data, objects.get(chunks[-1]).data
    objects.put(chunks[0], first_chunk[:-1] + bytes([first_chunk[-1] ^ 1]))
    corrupted = b.lanekit("lane", "start", "napper", *s3)
    assert corrupted.returncode == 1 and b"memory snapshot is corrupted" in corrupted.stderr
    assert b"chunk 0 does not match" in corrupted.stderr and b"stays paused" in corrupted.stderr
    assert [s["state"] for s in json.loads(b.lanekit("lane", "ls", "--json").stdout)] == ["paused"]
    objects.put(chunks[0], first_chunk)
    objects.delete(chunks[-1])  # truncated: the stream's end is gone
    truncated = b.lanekit("lane", "start", "napper")
    assert truncated.returncode == 1 and b"is missing" in truncated.stderr, truncated.stderr
    objects.put(chunks[-1], last_chunk)
    record = objects.get("lanes/napper/paused").data
    other_qemu = json.loads(record)
    other_qemu["qemu"]["qemu"]["minor"] += 1  # what a host with another qemu would have saved
    objects.put("lanes/napper/paused", json.dumps(other_qemu).encode())
    mismatched = b.lanekit("lane", "resume", "napper")
    assert mismatched.returncode == 1 and b"cannot load it" in mismatched.stderr
    assert b"Traceback" not in mismatched.stderr and len(mismatched.stderr.splitlines()) == 1
    assert [s["state"] for s in json.loads(b.lanekit("lane", "ls", "--json").stdout)] == ["paused"]
    objects.put("lanes/napper/paused", record)

    resumed = b.lanekit("lane", "resume", "napper")  # start resumes too (above)
    assert resumed.returncode == 0, resumed.stderr
    asked = time.time()
    after = b.lanekit(
        "lane", "exec", "napper", "--", "sh", "-c",
        f"kill -0 {pid} && a=$(cat /root/count) && sleep 1 && "
        "echo $a $(cat /root/count) $(date +%s)",
    )  # fmt: skip
    assert after.returncode == 0, after.stderr
    first, second, clock = (int(x) for x in after.stdout.split())
    assert counted <= first < second  # the same process, counting on from where it was
    assert asked - 2 <= clock <= time.time() + 2  # set to the host's after the resume
    with pytest.raises(blockstore.ObjectNotFound):  # spent before the guest ran again
        objects.get("lanes/napper/paused")

    def leftovers() -> list[str]:  # chunks, and the disk checkpoint that pinned its state
        disk = root_disk_name("napper")
        pinned = [t for t in blockstore.list_checkpoints(objects, disk) if t.startswith("paused-")]
        return [i.key for i in objects.list("lanes/napper/memory/")] + pinned

    deadline = time.monotonic() + 60  # they go in the background
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers() == []
    stopped = b.lanekit("lane", "stop", "napper")
    assert stopped.returncode == 0, stopped.stderr
    assert b.lanekit("lane", "rm", "napper").returncode == 0


def test_pause_and_resume_through_the_embedded_store(
    two_hosts: tuple[Host, Host, str, str], tmp_path: Path
) -> None:
    """The embedded default store (a directory) holds a paused lane's memory as S3 does:
    what a process keeps only in memory (tmpfs) survives a pause on A and a resume on B,
    and nothing of the lane is left in the store after ``rm``."""
    a, b, _, _ = two_hosts
    store = f"file://{tmp_path / 'store'}"
    lane = Lane.create("dozer", "shell", store=store, memory_mib=256, home=a.home)
    lane.start()
    counter = "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.2; done"

    async def run(argv: list[str], on: Lane) -> str:
        async with on.connect() as machine:
            return await machine.exec_text(argv)

    trio.run(run, ["sh", "-c", f"({counter}) >/dev/null 2>&1 &"], lane)  # it runs on
    counted = int(trio.run(run, ["sh", "-c", "sleep 1; cat /dev/shm/count"], lane))
    assert lane.pause().state == "paused"
    objects = blockstore.open_store(store)
    assert [i.key for i in objects.list("lanes/dozer/memory/")]  # the memory is in the store
    there = Lane.get("dozer", store=store, home=b.home)
    assert there.start().state == "running"  # resumed from the snapshot
    after = trio.run(
        run, ["sh", "-c", "a=$(cat /dev/shm/count); sleep 1; cat /dev/shm/count; echo $a"], there
    )
    second, first = (int(x) for x in after.split())
    assert counted <= first < second  # counting on from where it was on A
    there.stop()
    there.remove()
    assert [i.key for i in objects.list("lanes/dozer/")] == []


def test_a_stop_during_a_pause_ends_the_lane_stopped(
    two_hosts: tuple[Host, Host, str, str], tmp_path: Path
) -> None:
    """SIGTERM to the supervisor while it saves the memory: the save is cancelled and
    thrown away, the guest resumes and powers off cleanly, and the lane ends *stopped*
    (its end recorded, no snapshot), so the next start boots afresh."""
    a, _, _, _ = two_hosts
    store = f"file://{tmp_path / 'store'}"
    lane = Lane.create("halted", "shell", store=store, memory_mib=512, home=a.home)
    log = lane.log_paths()["supervisor"]
    fill = "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=200 2>/dev/null"  # a slow save

    async def run(argv: list[str]) -> str:
        async with lane.connect() as machine:
            return await machine.exec_text(argv)

    def pause(outcome: list[object]) -> None:
        try:
            outcome.append(lane.pause())
        except LaneError as exc:
            outcome.append(exc)

    def saving_since(seen: int) -> bool:
        return log.read_text().count("pausing: saving") > seen

    for _attempt in range(3):  # the signal must land while the memory is being saved
        lane.start()
        trio.run(run, ["sh", "-c", fill])
        pid = lane.status().pid
        assert pid is not None
        seen = log.read_text().count("pausing: saving")
        outcome: list[object] = []
        pausing = threading.Thread(target=pause, args=(outcome,))
        pausing.start()
        wait_for(functools.partial(saving_since, seen), timeout=60)
        os.kill(pid, signal.SIGTERM)
        pausing.join(120)
        wait_for(lambda: lane.status().state != "running", timeout=60)
        if isinstance(outcome[0], LaneStatus) and outcome[0].state == "paused":
            lane.start()  # it finished first: resume it and try again
            lane.stop()
            continue
        tail = log.read_text()[-3000:]
        assert "lane halted stopped (SIGTERM)" in tail, tail
        assert "lane halted paused" not in tail, tail
        assert lane.status().state == "stopped"
        objects = blockstore.open_store(store)
        assert [i.key for i in objects.list("lanes/halted/memory/")] == []
        assert lane.start().state == "running"
        assert trio.run(run, ["sh", "-c", "test -e /dev/shm/fill || echo fresh"]) == "fresh\n"
        lane.stop()
        lane.remove()
        return
    raise AssertionError("three pauses finished before the signal reached them")


def test_a_lane_keeps_its_network(two_hosts: tuple[Host, Host, str, str]) -> None:
    """A lane's network rules are stored with it and applied at every start: the allowed
    origin answers, everything else is refused; what cannot be stored is refused at create."""
    from tests.netorigins import HELLO, internet_namespace

    a, _, store, endpoint = two_hosts
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    for flag, why in (("--policy=os:getcwd", b"not a Python policy"),
                      ("--secret=TOKEN=x@origin.test --net=deny", b"secrets are not")):  # fmt: skip
        refused = a.lanekit("lane", "create", "leaky", "--image", "shell", *flag.split(), *s3)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert b"Traceback" not in refused.stderr
    with internet_namespace(str(Path(__file__).resolve().parent.parent)) as internet:
        made = a.lanekit(
            "lane", "create", "netted", "--image", "shell", "--memory", "256",
            "--allow", "origin.test:80", "--dns", "203.0.113.53", "--egress-netns", internet,
            *s3,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        try:
            started = a.lanekit("lane", "start", "netted")
            assert started.returncode == 0, started.stderr
            got = a.lanekit(
                "lane", "exec", "netted", "--", "wget", "-qO-", "http://origin.test/hello"
            )
            assert (got.returncode, got.stdout) == (0, HELLO), got.stderr
            other = a.lanekit(
                "lane", "exec", "netted", "--", "wget", "-qO-", "http://198.51.100.20:7/"
            )
            assert other.returncode != 0 and other.stdout == b"", other
        finally:
            a.lanekit("lane", "stop", "netted")
        assert a.lanekit("lane", "rm", "netted").returncode == 0


def race_start(a: Host, b: Host, name: str, objects: blockstore.ObjectStore) -> None:
    """Two hosts run `lane start NAME` at once; the loser must fail at the lease with one
    line and leave no process; the winner is the lease's holder (then killed with -9)."""
    racers = [
        subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "lane", "start", name],
            env=host.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for host in (a, b)
    ]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in racers):
            assert time.monotonic() < deadline, "neither start ended"
            time.sleep(0.05)
        first = 0 if racers[0].poll() is not None else 1
        if racers[first].returncode == 0:  # the winner booted before the loser got going
            first = 1 - first
            racers[first].wait(120)
        loser, winner = ((a, b)[first], racers[first]), ((a, b)[1 - first], racers[1 - first])
        _, error = loser[1].communicate(timeout=30)
        assert loser[1].returncode == 1, error
        assert error.count(b"\n") == 1 and b"Traceback" not in error, error
        assert f"lane {name!r} is".encode() in error and b"--force" in error, error
        with contextlib.suppress(FileNotFoundError):  # refused before it had one
            wait_gone([loser[0].supervisor(name)])
        supervisor = winner[0].supervisor(name)
        lease, _ = blockstore.lease.read_lease(objects, root_disk_name(name))
        assert lease is not None and lease["state"] == "held", lease
        assert lease["holder"]["pid"] == supervisor, (lease, supervisor)
        children = children_of(supervisor)
        os.kill(supervisor, signal.SIGKILL)
        wait_gone([supervisor, *children])
    finally:
        for racer in racers:
            racer.kill()
            racer.communicate()


def test_force_takeover_fencing_a_start_race_and_max_duration(
    two_hosts: tuple[Host, Host, str, str],
) -> None:
    """kill -9 on A, B takes over with --force and sees A's synced writes; a cut-off B
    (SIGSTOP) is taken over by A with --force and, woken, is fenced and stops; two hosts
    starting a lane at once: one wins, the other fails at the lease before booting; a
    lane with a max duration stops itself, and says so."""
    a, b, store, endpoint = two_hosts
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    assert a.lanekit("volume", "create", "scratch", "--size", "32M", *s3).returncode == 0
    made = a.lanekit(
        "lane", "create", "mover", "--image", "shell", "--memory", "256",
        "--volume", "scratch:/scratch", "--label", "team=blue", *s3,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert a.lanekit("lane", "start", "mover").returncode == 0
    wrote = a.lanekit(
        "lane",
        "exec",
        "mover",
        "--",
        "sh",
        "-c",
        "echo a1 > /root/note; echo s1 > /scratch/x; sync",
    )
    assert wrote.returncode == 0, wrote.stderr
    supervisor_a = a.supervisor("mover")
    info = json.loads(a.lanekit("lane", "info", "mover").stdout)
    assert info["status"]["state"] == "running" and info["status"]["here"]
    assert info["lease"]["holder"]["pid"] == supervisor_a and info["lease"]["epoch"] >= 1
    assert info["definition"]["labels"] == {"team": "blue"} and info["paused"] is None
    assert [(v["name"], v["path"], v["writer"]["pid"]) for v in info["volumes"]] == [
        ("scratch", "/scratch", supervisor_a)
    ]
    logs = a.lanekit("lane", "logs", "mover")
    assert b"==> supervisor" in logs.stdout and b"lane mover is running" in logs.stdout
    assert b"==> console" in logs.stdout, logs.stdout[-2000:]
    row = a.lanekit("lane", "ls").stdout.decode().splitlines()[1].split("\t")
    assert row[:4] == ["mover", "running", f"{info['lease']['holder']['host']} (here)",
                       str(supervisor_a)] and row[5:] == ["shell", store]  # fmt: skip

    # kill -9 of A's supervisor: crashed; B takes over at once, with A's synced writes.
    qemu_a = children_of(supervisor_a)
    os.kill(supervisor_a, signal.SIGKILL)
    wait_gone([supervisor_a, *qemu_a])
    assert [s["state"] for s in json.loads(b.lanekit("lane", "ls", "--json", *s3).stdout)] == [
        "crashed"
    ]
    taken = b.lanekit("lane", "start", "mover", "--force", *s3)
    assert taken.returncode == 0 and b"running (here" in taken.stdout, taken.stderr
    seen = b.lanekit(
        "lane", "exec", "mover", "--", "sh", "-c",
        "cat /root/note /scratch/x; echo b1 > /root/note; echo s2 > /scratch/x; sync",
    )  # fmt: skip
    assert seen.stdout == b"a1\ns1\n", seen.stderr

    # B cut off (SIGSTOP): its lease is live, so A needs --force; woken, B is fenced.
    supervisor_b = b.supervisor("mover")
    qemu_b = children_of(supervisor_b)
    os.kill(supervisor_b, signal.SIGSTOP)
    try:
        refused = a.lanekit("lane", "start", "mover")
        assert refused.returncode == 1 and b"take it over with --force" in refused.stderr
        forced = a.lanekit("lane", "start", "mover", "--force")
        assert forced.returncode == 0, forced.stderr
    finally:
        os.kill(supervisor_b, signal.SIGCONT)
    wait_gone([supervisor_b, *qemu_b], timeout=90)
    log_b = (b.home / "lanes" / "mover" / "supervisor.log").read_text()
    assert "fenced" in log_b and "never commits again" in log_b, log_b[-2000:]
    supervisor_a = a.supervisor("mover")
    seen = json.loads(b.lanekit("lane", "ls", "--json").stdout)
    assert [(s["state"], s["here"], s["pid"]) for s in seen] == [("running", False, supervisor_a)]
    after = a.lanekit(
        "lane", "exec", "mover", "--", "sh", "-c", "cat /root/note /scratch/x; echo a2 > /root/n2"
    )
    assert after.stdout == b"b1\ns2\n", after.stderr
    epoch_a = json.loads(a.lanekit("lane", "info", "mover").stdout)["lease"]["epoch"]
    assert a.lanekit("lane", "stop", "mover").returncode == 0
    # Nothing of B's landed after A took over: the head is still A's epoch.
    assert blockstore.disk_info(objects, root_disk_name("mover"))["epoch"] == epoch_a
    status = json.loads(b.lanekit("lane", "ls", "--json").stdout)[0]
    assert (status["state"], status["reason"], status["epoch"]) == (
        "stopped", "stop requested", epoch_a
    )  # fmt: skip

    # Both hosts start the lane at the same moment: one wins, the other fails at the lease
    # (before its VM boots: its console log is untouched) with one line.
    consoles = {id(h): os.lstat(h.home / "lanes" / "mover" / "console.log") for h in (a, b)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "lane", "start", "mover"],
            env=host.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for host in (a, b)
    ]
    outputs = [p.communicate(timeout=300) for p in racers]
    results = [(p.returncode, *out) for p, out in zip(racers, outputs, strict=True)]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    winner, loser = (a, b) if results[0][0] == 0 else (b, a)
    error = results[[a, b].index(loser)][2]
    assert error.count(b"\n") == 1 and b"Traceback" not in error, error
    assert b"lane 'mover' is" in error and b"--force" in error, error
    before, now = consoles[id(loser)], os.lstat(loser.home / "lanes" / "mover" / "console.log")
    assert (before.st_ino, before.st_mtime_ns) == (now.st_ino, now.st_mtime_ns)
    assert winner.lanekit("lane", "stop", "mover").returncode == 0

    # A lane with a max duration stops itself cleanly, and says so in its log and in ls.
    made = a.lanekit("lane", "create", "brief", "--image", "shell", "--memory", "256",
                     "--max-duration", "2s", *s3)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert a.lanekit("lane", "start", "brief").returncode == 0
    following = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "lane", "logs", "brief", "--follow"],
        env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_gone([a.supervisor("brief")], timeout=60)
        followed, _ = following.communicate(timeout=30)  # it ends with the lane
    finally:
        following.kill()
        following.wait()
    assert following.returncode == 0 and b"lane brief stopped (max duration" in followed
    log = (a.home / "lanes" / "brief" / "supervisor.log").read_text()
    assert "max duration 2s reached: stopping cleanly" in log, log[-2000:]
    assert "lane brief stopped (max duration 2s reached)" in log, log[-2000:]
    row = b.lanekit("lane", "ls", *s3).stdout.decode().splitlines()[1].split("\t")
    assert row[:2] == ["brief", "stopped (max duration 2s reached)"], row

    # Ten more real races of two `lane start`s: one wins each, the other fails with one line
    # and leaves nothing. Each winner is killed (-9) once the loser is out, before its guest
    # boots: its lease, held by a dead process of this host, is free for the next race.
    for _ in range(10):
        race_start(a, b, "brief", objects)
    for host, name in ((a, "mover"), (a, "brief")):
        assert host.lanekit("lane", "rm", name).returncode == 0
    assert a.lanekit("volume", "rm", "scratch", *s3).returncode == 0
