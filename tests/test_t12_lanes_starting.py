"""A lane caught starting can always be stopped, and a start that ends without its answer
leaves no supervisor behind: `lane stop` cancels a boot under way (SIGTERM), kills a
supervisor that does not answer (SIGSTOP) and releases what a dead one (kill -9) held; a
start interrupted with Ctrl-C, or without an answer in time, stops its supervisor on the
way out. Each ends with the lane stopped, its disk's lease released, no process left."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore.lease import read_lease
from tests.test_t12_lanes import Host, children_of, two_hosts, wait_gone  # noqa: F401
from vm.lanes import Lane, LaneError, zygote
from vm.lanes.definition import root_disk_name

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def kill_all(caught: dict[int, str | None]) -> None:
    """SIGKILL each process still alive as the same process (pids are reused)."""
    for pid, identity in caught.items():
        if identity is not None and blockstore.process_identity(pid) == identity:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)  # one the test stopped
    wait_gone(list(caught))


def qemu_of(pid: int) -> list[int]:
    """The lane's qemu among the supervisor's children (on its root disk over NBD, not
    the accelerator probe before it)."""
    found = []
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"qemu-system" in argv[0] and any(b"driver=nbd" in a for a in argv):
                found.append(child)
    return found


@contextlib.contextmanager
def booting(host: Host, name: str) -> Iterator[tuple[subprocess.Popen[bytes], int, list[int]]]:
    """``lanekit lane start NAME`` caught mid-boot: the command still waits for its answer,
    the supervisor holds the lane's disk and runs qemu, which is frozen (SIGSTOP) so that
    the boot lasts as long as the test needs. Yields (the command, the supervisor, its
    qemu); whatever the test did, all of them are killed at the end."""
    start = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "lane", "start", name], env=host.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    caught: dict[int, str | None] = {}
    try:
        deadline = time.monotonic() + 300
        qemu: list[int] = []
        while not qemu:
            assert start.poll() is None, start.communicate()
            assert time.monotonic() < deadline, "qemu never started"
            time.sleep(0.05)
            with contextlib.suppress(OSError, ValueError, KeyError):
                supervisor = host.supervisor(name)
                qemu = qemu_of(supervisor)
        caught = {p: blockstore.process_identity(p) for p in [supervisor, *qemu]}
        for pid in qemu:
            os.kill(pid, signal.SIGSTOP)
        log = (host.home / "lanes" / name / "supervisor.log").read_text()
        assert f"lane {name} is running" not in log  # caught starting, not running
        yield start, supervisor, qemu
    finally:
        start.kill()
        start.communicate()
        kill_all(caught)


def ended_stopped(host: Host, lane: Lane) -> dict[str, Any]:
    """The lane's state as `lane ls` shows it, which must be stopped, with its root disk's
    lease released; the state."""
    (status,) = [s for s in json.loads(host.lanekit("lane", "ls", "--json").stdout)
                 if s["name"] == lane.name]  # fmt: skip
    assert status["state"] == "stopped", status
    lease, _ = read_lease(lane.objects, root_disk_name(lane.name))
    assert lease is not None and lease["state"] == "released", lease
    return dict(status)


def new_lane(host: Host, store: str, endpoint: str, name: str) -> Lane:
    return Lane.create(name, "shell", store=store, s3_endpoint=endpoint, memory_mib=256,
                       home=host.home)  # fmt: skip


def removed(host: Host, name: str) -> None:
    rm = host.lanekit("lane", "rm", name)
    assert rm.returncode == 0, rm.stderr


def test_lane_stop_cancels_a_start_under_way(
    two_hosts: tuple[Host, Host, str, str],  # noqa: F811
) -> None:
    a, _, store, endpoint = two_hosts
    lane = new_lane(a, store, endpoint, "hasty")
    with booting(a, "hasty") as (start, supervisor, qemu):
        stop = a.lanekit("lane", "stop", "hasty")
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.split(b"\t")[:2] == [b"hasty", b"stopped"]
        wait_gone([supervisor, *qemu])
        _, err = start.communicate(timeout=120)
        assert start.returncode == 1
        assert b"stopped while starting (SIGTERM)" in err, err
    ended_stopped(a, lane)
    removed(a, "hasty")


def test_lane_stop_kills_a_starting_supervisor_that_does_not_answer(
    two_hosts: tuple[Host, Host, str, str],  # noqa: F811
) -> None:
    a, _, store, endpoint = two_hosts
    lane = new_lane(a, store, endpoint, "frozen")
    with booting(a, "frozen") as (start, supervisor, qemu):
        os.kill(supervisor, signal.SIGSTOP)
        stop = a.lanekit("lane", "stop", "frozen")
        assert stop.returncode == 0, stop.stderr
        wait_gone([supervisor, *qemu])
        start.communicate(timeout=120)
        assert start.returncode == 1  # its supervisor died without an answer
    status = ended_stopped(a, lane)
    assert "was killed" in status["reason"]
    removed(a, "frozen")


def test_lane_stop_ends_a_lane_whose_starting_supervisor_was_killed(
    two_hosts: tuple[Host, Host, str, str],  # noqa: F811
) -> None:
    a, _, store, endpoint = two_hosts
    lane = new_lane(a, store, endpoint, "felled")
    with booting(a, "felled") as (start, supervisor, qemu):
        os.kill(supervisor, signal.SIGKILL)
        wait_gone([supervisor, *qemu])
        start.communicate(timeout=120)
        assert start.returncode == 1
        stop = a.lanekit("lane", "stop", "felled")
        assert stop.returncode == 0, stop.stderr
    status = ended_stopped(a, lane)
    assert "after a crash" in status["reason"]
    removed(a, "felled")


def test_a_start_interrupted_with_ctrl_c_stops_its_supervisor(
    two_hosts: tuple[Host, Host, str, str],  # noqa: F811
) -> None:
    a, _, store, endpoint = two_hosts
    lane = new_lane(a, store, endpoint, "hesitant")
    with booting(a, "hesitant") as (start, supervisor, qemu):
        start.send_signal(signal.SIGINT)
        _, err = start.communicate(timeout=120)
        assert start.returncode == 130, err
        assert b"Traceback" not in err, err
        wait_gone([supervisor, *qemu])
    ended_stopped(a, lane)
    removed(a, "hesitant")


def test_a_start_without_an_answer_in_time_stops_its_supervisor(
    two_hosts: tuple[Host, Host, str, str],  # noqa: F811
) -> None:
    a, _, store, endpoint = two_hosts
    lane = new_lane(a, store, endpoint, "laggard")
    zygote_log = a.home / "lanes" / zygote.LOG
    forks = zygote_log.read_text().count("forked supervisor")
    try:
        with pytest.raises(LaneError, match="no answer within 1 s"):
            lane.start(timeout=1)  # no lane boots in a second under TCG
    finally:
        pids = re.findall(r"forked supervisor (\d+)", zygote_log.read_text())[forks:]
        caught = {int(p): blockstore.process_identity(int(p)) for p in pids}
        try:
            assert len(caught) == 1, pids
            wait_gone(list(caught))  # gone on its own: stopped by the start that gave up
        finally:
            kill_all(caught)
    assert lane.status().state in ("created", "stopped")  # however far it got
    assert not lane.running_here()
    removed(a, "laggard")
