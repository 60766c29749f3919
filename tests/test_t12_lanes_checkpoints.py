"""Lane checkpoints and forks, ``lane start --attach``, ``lane resume``, a lane's env and
mounts, and one supervisor per lane per host: real boots on a real SeaweedFS.

The first test is one journey on purpose (each step needs the state the one before left):
a running lane is checkpointed, written on, forked; the original is removed and its store
collected; two attached starts of the fork race, and the winner sees the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import blockstore
from tests.test_t12_lanes import Host, children_of, wait_gone
from tools.cli import main
from vm import volumes
from vm.lanes import Lane, LaneError
from vm.lanes.definition import root_disk_name
from vm.launcher import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def host(vm_home: Path, s3: Any) -> Iterator[tuple[Host, str, str]]:
    built = Sandbox("shell", home=vm_home)
    built._local_image()
    built.kernels.ensure(variant=built.runtime_variant)
    store = f"s3://{s3.new_bucket()}/forks"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.env.items():
            patch.setenv(key, value)
        yield Host(vm_home, {**os.environ, **s3.env}), store, s3.endpoint
    for identity in (vm_home / "lanes").glob("*/supervisor.json"):  # what a failure left
        known = json.loads(identity.read_text())
        if blockstore.process_identity(known["pid"]) == known["process"]:
            os.kill(known["pid"], signal.SIGKILL)


@pytest.fixture
def cli(
    capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, vm_home: Path
) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """``lanekit ARGS`` in this process (a new interpreter costs a second or more); commands
    that need a process of their own (exec, --attach, races) run as one."""
    monkeypatch.setenv("LANEKIT_HOME", str(vm_home))

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        capfdbinary.readouterr()
        code = main(list(args))
        out, err = capfdbinary.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def attach(host: Host, name: str, log: Path) -> subprocess.Popen[bytes]:
    """``lane start NAME --attach``: the supervisor in the foreground, its log to ``log``."""
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "lane", "start", name, "--attach"],
            env=host.env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip


def wait_running(name: str, logs: list[Path], runs: list[subprocess.Popen[bytes]]) -> int:
    """Which of the attached starts runs the lane (once it does)."""
    deadline = time.monotonic() + 300
    while True:
        for i, log in enumerate(logs):
            if f"lane {name} is running" in log.read_text():
                return i
        assert time.monotonic() < deadline and any(p.poll() is None for p in runs), [
            log.read_text() for log in logs
        ]
        time.sleep(0.2)


def one_line_error(done: subprocess.CompletedProcess[bytes], message: bytes) -> None:
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") == 1, done.stderr


def test_checkpoint_a_running_lane_fork_it_and_remove_the_original(
    host: tuple[Host, str, str], tmp_path: Path, cli: Callable[..., Any]
) -> None:
    a, store, endpoint = host
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the host\n")
    assert cli("volume", "create", "ckdata", "--size", "32M", *s3).returncode == 0
    made = cli(
        "lane", "create", "orig", "--image", "shell", "--memory", "256",
        "--volume", "ckdata:/data", "--env", "GREETING=lane", "--env", "WHO=lane",
        "--mount", f"/host={shared}:ro", *s3,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    orig_log = tmp_path / "orig.log"
    orig_run = attach(a, "orig", orig_log)  # the fixture kills it if the test fails
    wait_running("orig", [orig_log], [orig_run])

    # The lane's env reaches every exec, whose own -e wins; the mount is there, read-only.
    first = a.lanekit("lane", "exec", "orig", "--env", "WHO=exec", "--", "sh", "-c",
        "echo $GREETING $WHO; cat /host/hello; touch /host/x 2>/dev/null || echo ro; "
        "echo one > /root/a; echo vone > /data/a",  # no sync: the checkpoint makes it durable
    )  # fmt: skip
    assert first.stdout == b"lane exec\nfrom the host\nro\n", first.stderr
    one_line_error(cli("lane", "pause", "orig"), b"virtiofs mounts (/host)")

    # A checkpoint that fails half-way (the volume has the tag already) takes back what it
    # took and the lane runs on.
    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    blockstore.checkpoint_disk(objects, "volume.ckdata", "c0.lane.orig")
    one_line_error(cli("lane", "checkpoint", "orig", "c0"), b"could not checkpoint")
    assert "c0" not in blockstore.disk_info(objects, root_disk_name("orig"))["checkpoints"]
    assert list(objects.list("lanes/orig/checkpoints/")) == []

    took = cli("lane", "checkpoint", "orig", "c1")
    assert took.returncode == 0 and b"checkpoint c1" in took.stdout, took.stderr
    assert b"(running)" in took.stdout and b"1 volume" in took.stdout
    one_line_error(cli("lane", "checkpoint", "orig", "c1"), b"already has a checkpoint")
    one_line_error(cli("lane", "checkpoint", "orig", "bad/tag"), b"invalid checkpoint tag")
    later = a.lanekit(
        "lane", "exec", "orig", "--", "sh", "-c", "echo two > /root/b; echo vtwo > /data/b; sync"
    )
    assert later.returncode == 0, later.stderr

    forked = cli("lane", "fork", "orig@c1", "copy")
    assert forked.returncode == 0, forked.stderr
    one_line_error(cli("lane", "fork", "orig@nope", "other"), b"no checkpoint 'nope'")
    blockstore.create_disk(objects, "volume.half.ckdata", 1 << 20)  # in the way of the fork
    one_line_error(cli("lane", "fork", "orig@c1", "half"), b"'volume.half.ckdata' already exists")
    assert not {root_disk_name("half")} & set(blockstore.list_disks(objects))
    assert "half" not in [s.name for s in Lane.list(store=store, s3_endpoint=endpoint)]
    volumes.delete_disk(objects, "volume.half.ckdata")
    one_line_error(cli("lane", "fork", "orig@c1", "copy"), b"a lane named 'copy' exists")
    one_line_error(cli("lane", "fork", "orig", "other"), b"NAME@TAG")
    info = json.loads(cli("lane", "info", "orig").stdout)
    assert [(c["tag"], c["running"], c["volumes"]) for c in info["checkpoints"]] == [
        ("c1", True, ["ckdata"])
    ]
    copy_info = json.loads(cli("lane", "info", "copy").stdout)
    assert copy_info["definition"]["forked_from"] == {"lane": "orig", "checkpoint": "c1"}
    assert [v["name"] for v in copy_info["volumes"]] == ["copy.ckdata"]

    both = a.lanekit(
        "lane", "exec", "orig", "--", "cat", "/root/a", "/root/b", "/data/a", "/data/b"
    )  # fmt: skip
    assert both.stdout == b"one\ntwo\nvone\nvtwo\n", both.stderr  # the original: untouched

    # A second stop signal to an attached lane kills the guest: exit 130, and its disk is
    # still flushed and released (what the guest synced is kept).
    qemu = children_of(orig_run.pid)
    orig_run.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    orig_run.send_signal(signal.SIGTERM)
    assert orig_run.wait(timeout=120) == 130
    wait_gone(qemu)
    assert "SIGTERM again: killing the guest now" in orig_log.read_text()
    assert blockstore.disk_info(objects, root_disk_name("orig"))["lease_holder"] is None

    # A stopped lane is checkpointed directly; resume wants a paused lane.
    orig = Lane.get("orig", home=a.home)
    assert orig.checkpoint("c2")["running"] is False
    assert [c["tag"] for c in orig.checkpoints()] == ["c1", "c2"]
    one_line_error(cli("lane", "resume", "orig"), b"is not paused (it is stopped)")

    # Removing the original keeps what the fork shares with it, even through a full GC.
    removed = cli("lane", "rm", "orig")
    assert removed.returncode == 0, removed.stderr
    assert b"its forks copy keep everything they share" in removed.stdout
    assert list(objects.list("lanes/orig/")) == []
    assert blockstore.disk_info(objects, "volume.ckdata")["checkpoints"] == [
        "c0.lane.orig"
    ]  # the test's own
    assert blockstore.collect_garbage(objects, grace=0).deleted

    # Two attached starts of the fork at once: one wins and supervises it in the
    # foreground (its log on stderr); the other touches nothing of the winner's.
    logs = [tmp_path / f"attached-{i}.log" for i in range(2)]
    racers = [attach(a, "copy", log) for log in logs]
    try:
        won = wait_running("copy", logs, racers)
        attached, loser = racers[won], racers[1 - won]
        assert loser.wait(timeout=60) == 1
        lost = logs[1 - won].read_bytes()
        assert b"already" in lost or b"is starting here" in lost or b"running here" in lost, lost
        assert a.supervisor("copy") == attached.pid
        run = a.home / "lanes" / "copy"
        files = ("supervisor.json", "agent.sock", "control.sock")
        before = {f: (run / f).stat().st_ino for f in files}
        late = subprocess.run(  # past the CLI's own check: the supervisor's lock decides
            [sys.executable, "-m", "vm.lanes.supervisor", "copy", store, "--s3-endpoint", endpoint],
            env=a.env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert late.returncode == 1 and b"starting or running on this host already" in late.stderr
        assert {f: (run / f).stat().st_ino for f in files} == before

        seen = a.lanekit(
            "lane", "exec", "copy", "--", "sh", "-c",
            "cat /root/a /data/a /host/hello; echo $GREETING; "
            "test -e /root/b || test -e /data/b || echo 'nothing later'",
        )  # fmt: skip
        assert seen.stdout == b"one\nvone\nfrom the host\nlane\nnothing later\n", seen.stderr
        qemu = children_of(attached.pid)
        attached.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        assert attached.wait(timeout=120) == 0
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    wait_gone(qemu)
    text = logs[won].read_text()
    assert "SIGINT: stopping cleanly" in text and "lane copy stopped" in text, text
    assert "SIGINT: stopping cleanly" in (run / "supervisor.log").read_text()
    assert Lane.get("copy", home=a.home).status().state == "stopped"

    assert cli("lane", "rm", "copy").returncode == 0
    for volume in ("copy.ckdata", "ckdata"):
        assert cli("volume", "rm", volume, *s3).returncode == 0
    assert [d for d in blockstore.list_disks(objects) if not d.startswith("image-")] == []


def test_lane_env_mounts_and_verbs_refuse_bad_input(
    host: tuple[Host, str, str], cli: Callable[..., Any]
) -> None:
    a, store, endpoint = host
    s3 = ("--store", store, "--s3-endpoint", endpoint)
    for args, message in (
        (("--env", "NOEQUALS"), b"--env 'NOEQUALS': use KEY=VALUE"),
        (("--mount", "/x"), b"use GUEST=HOSTDIR[:ro]"),
        (("--mount", "/x=memory"), b"host directories"),
        (("--mount", "relative=/tmp"), b"absolute guest path"),
    ):
        one_line_error(cli("lane", "create", "bad", "--image", "shell", *args, *s3), message)
    made = cli("lane", "create", "away", "--image", "shell", "--mount", "/m=/no/such/dir", *s3)
    assert made.returncode == 0, made.stderr
    for start in (("start",), ("start", "--attach"), ("resume",)):
        done = cli("lane", *start, "away")
        message = b"is not paused (it is created)" if start == ("resume",) else b"/no/such/dir"
        one_line_error(done, message)
    one_line_error(cli("lane", "checkpoint", "away", "t"), b"has never started")
    assert not (a.home / "lanes" / "away" / "supervisor.json").exists()

    objects = blockstore.open_store(store, s3_endpoint=endpoint)
    objects.put("lanes/away/paused", json.dumps({"id": "x", "chunks": []}).encode())
    one_line_error(cli("lane", "checkpoint", "away", "t"), b"is paused")
    objects.delete("lanes/away/paused")

    # A definition written before env and mounts existed still loads.
    current = json.loads(objects.get("lanes/away/definition").data)
    for key in ("env", "mounts", "forked_from"):
        del current[key]
    objects.put("lanes/away/definition", json.dumps(current).encode())
    old = Lane.get("away", home=a.home).definition
    assert (old.env, old.mounts, old.forked_from) == ({}, (), None)
    with pytest.raises(LaneError, match="not paused"):
        Lane.get("away", home=a.home).resume()
    assert cli("lane", "rm", "away").returncode == 0
    with pytest.raises(blockstore.DiskNotFound):
        blockstore.disk_info(objects, root_disk_name("away"))
