"""kill -9 of a resuming supervisor, at several instants from fetching the memory snapshot
to running the guest: each time the lane is either still paused with its whole snapshot
(a resume then continues its processes) or no longer paused at all (its memory was loaded
and is spent; a start boots its disk), never paused with a snapshot it may not load; and
what such a kill leaves in the store goes at the next pause or at rm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

import blockstore
from tests.test_t12_lanes import Host, children_of, two_hosts, wait_gone  # noqa: F401
from vm.lanes import Lane
from vm.lanes.definition import root_disk_name

pytestmark = [pytest.mark.vm, pytest.mark.slow]

KILL_AFTER = (0.0, 0.3, 0.6, 0.9, 1.5)
"""Seconds after the supervisor says it is resuming (it fetches, boots, loads, runs)."""


def _state(host: Host, name: str) -> str:
    (status,) = [s for s in json.loads(host.lanekit("lane", "ls", "--json").stdout)
                 if s["name"] == name]  # fmt: skip
    return str(status["state"])


def test_a_resume_killed_at_any_instant_keeps_the_snapshot_or_spends_it(
    two_hosts: tuple[Host, Host, str, str],  # noqa: F811
) -> None:
    a, _, store, endpoint = two_hosts
    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    lane = Lane.create("phoenix", "shell", store=store, s3_endpoint=endpoint, memory_mib=256,
                       home=a.home)  # fmt: skip
    lane.start()
    counter = "i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.2; done"

    async def start_counter() -> str:
        async with lane.connect() as machine:
            await machine.exec(["sh", "-c", "echo kept > /root/durable; sync"])
            handle = await machine.exec_stream(["sh", "-c", f"echo $$; {counter}"])
            async for event in handle:
                return event.data.decode().strip()
        raise AssertionError("the counter printed nothing")

    pid = trio.run(start_counter)
    assert a.lanekit("lane", "pause", "phoenix").returncode == 0
    log = a.home / "lanes" / "phoenix" / "supervisor.log"
    try:
        state, states = "paused", []
        for delay in KILL_AFTER:
            seen = log.read_text().count("resuming from the memory snapshot")
            start = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "lane", "start", "phoenix"],
                env=a.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while log.read_text().count("resuming from the memory snapshot") == seen:
                assert time.monotonic() < deadline and start.poll() is None, log.read_text()
                time.sleep(0.02)
            time.sleep(delay)
            supervisor = a.supervisor("phoenix")
            qemu = children_of(supervisor)
            os.kill(supervisor, signal.SIGKILL)
            start.wait(60)
            wait_gone([supervisor, *qemu])
            state = _state(a, "phoenix")
            states.append(state)
            chunks = list(objects.list("lanes/phoenix/memory/"))
            if state == "paused":
                record = json.loads(objects.get("lanes/phoenix/paused").data)
                assert len(chunks) == len(record["chunks"])  # the whole snapshot is kept
                continue
            with pytest.raises(blockstore.ObjectNotFound):  # spent: it can never load again
                objects.get("lanes/phoenix/paused")
            break

        assert states[0] == "paused", states  # killed as it began to fetch: nothing loaded
        started = a.lanekit("lane", "start", "phoenix")
        assert started.returncode == 0, started.stderr
        after = a.lanekit(
            "lane", "exec", "phoenix", "--", "sh", "-c",
            # The counter's own command line, not just its pid: a fresh boot reuses pids
            # (this very grep may get the counter's pid, hence a pattern that cannot match
            # its own command line).
            f"cat /root/durable; grep -qs 'root/cou[n]t' /proc/{pid}/cmdline && echo running"
            " || echo gone",
        )  # fmt: skip
        assert after.returncode == 0, after.stderr
        # Still paused: the counter resumes; spent: the disk boots without it.
        assert after.stdout == (b"kept\nrunning\n" if state == "paused" else b"kept\ngone\n")
        # The next pause keeps only its own snapshot: what a killed resume left goes.
        assert a.lanekit("lane", "pause", "phoenix").returncode == 0
        snapshot = json.loads(objects.get("lanes/phoenix/paused").data)
        keys = [i.key for i in objects.list("lanes/phoenix/memory/")]
        assert len(keys) == len(snapshot["chunks"])
        assert all(k.startswith(f"lanes/phoenix/memory/{snapshot['id']}/") for k in keys)
        pinned = blockstore.list_checkpoints(objects, root_disk_name("phoenix"))
        assert [t for t in pinned if t.startswith("paused-")] == [f"paused-{snapshot['id']}"]
    finally:
        if lane.running_here():
            lane.stop()
    assert a.lanekit("lane", "rm", "phoenix").returncode == 0
    assert list(objects.list("lanes/phoenix/")) == []
