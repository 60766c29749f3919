"""A lane whose store goes away for longer than the lease TTL: a SeaweedFS of the test's own
(the session's is shared) is frozen with SIGSTOP, then woken."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore
from blockstore.lease import read_lease
from tests.test_t12_lanes import Host, children_of, forget_lanes, wait_gone
from tools.s3server import S3Server
from vm.lanes import Lane
from vm.lanes.definition import root_disk_name
from vm.launcher import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.slow]

TTL = 6.0


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "seaweedfs")
    server.start()
    try:
        yield server
    finally:
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGCONT)  # whatever the test did to it
        server.stop()


def head_of(objects: blockstore.ObjectStore, disk: str) -> tuple[int, int]:
    info = blockstore.disk_info(objects, disk)
    return info["epoch"], info["generation"]


def settled_head(objects: blockstore.ObjectStore, disk: str) -> tuple[int, int]:
    """The head once background commits (flushes, compaction) have stopped moving it."""
    seen = head_of(objects, disk)
    deadline = time.monotonic() + 30
    while True:
        time.sleep(1.0)
        now = head_of(objects, disk)
        if now == seen or time.monotonic() > deadline:
            return now
        seen = now


def test_a_lane_that_loses_its_store_is_fenced_and_another_host_takes_over(
    vm_home: Path, own_s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = Sandbox("shell", home=vm_home)
    built._local_image()
    built.kernels.ensure(variant=built.runtime_variant)
    host_b = tmp_path / "host-b"
    host_b.mkdir()
    (host_b / "kernels").symlink_to(vm_home / "kernels")
    for key, value in own_s3.env.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, "LANEKIT_LEASE_TTL": f"{TTL:g}"}
    a, b = Host(vm_home, env), Host(host_b, env)
    bucket = "cutoff"
    own_s3.client().create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/lanes"
    s3 = ("--store", store, "--s3-endpoint", own_s3.endpoint)
    objects = blockstore.open_store(store, s3_endpoint=own_s3.endpoint)
    disk = root_disk_name("cutoff")
    assert own_s3.process is not None
    weed = own_s3.process.pid

    made = a.lanekit("lane", "create", "cutoff", "--image", "shell", "--memory", "256", *s3)
    assert made.returncode == 0, made.stderr
    started = a.lanekit("lane", "start", "cutoff")
    assert started.returncode == 0, started.stderr
    supervisor_a = a.supervisor("cutoff")
    qemu_a = children_of(supervisor_a)
    try:
        wrote = a.lanekit("lane", "exec", "cutoff", "--", "sh", "-c", "echo kept > /root/f; sync")
        assert wrote.returncode == 0, wrote.stderr
        epoch_a, generation = settled_head(objects, disk)

        # The store freezes for longer than the TTL: A notices at the TTL, while it is
        # still gone, says why in its log, and takes its agent socket away.
        os.killpg(weed, signal.SIGSTOP)
        try:
            log = a.home / "lanes" / "cutoff" / "supervisor.log"
            deadline = time.monotonic() + TTL + 30
            while "unreachable for longer than the lease TTL" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            assert not (a.home / "lanes" / "cutoff" / "agent.sock").exists()
        finally:
            os.killpg(weed, signal.SIGCONT)
        wait_gone([supervisor_a, *qemu_a], timeout=120)

        # The store is back: A committed nothing since (nor ever will: it is gone, and it
        # went without releasing the lease), and says why it stopped.
        assert head_of(objects, disk) == (epoch_a, generation)
        (status,) = [s for s in Lane.list(home=a.home) if s.name == "cutoff"]
        assert status.state == "crashed", status
        assert status.reason and status.reason.startswith("fenced: the store was unreachable")
        refused = a.lanekit("lane", "exec", "cutoff", "--", "true")
        assert refused.returncode == 1 and b"Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.count(b"\n") == 1 and b"unreachable" in refused.stderr

        # Another host takes it over (the lease expired: no --force) with what A had made
        # durable before the outage; A sees it run there.
        taken = b.lanekit("lane", "start", "cutoff", *s3)
        assert taken.returncode == 0, taken.stderr
        seen = b.lanekit("lane", "exec", "cutoff", "--", "cat", "/root/f")
        assert seen.stdout == b"kept\n", seen.stderr
        lease, _ = read_lease(objects, disk)
        assert lease is not None and lease["state"] == "held"
        epoch_b = lease["epoch"]
        assert epoch_b > epoch_a and head_of(objects, disk)[0] == epoch_b
        assert [(s.state, s.here) for s in Lane.list(home=a.home) if s.name == "cutoff"] == [
            ("running", False)
        ]
        assert b.lanekit("lane", "stop", "cutoff").returncode == 0
        assert head_of(objects, disk)[0] == epoch_b
    finally:
        for host in (a, b):  # the store goes with the test: so does every trace of the lane
            forget_lanes(host.home)
