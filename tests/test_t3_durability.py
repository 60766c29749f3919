"""Crash consistency, single writer with fencing, outages, checkpoints, forks and GC."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import trio
from botocore.config import Config

import blockstore
from blockstore import (
    DiskExists,
    Fenced,
    LeaseHeld,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectStore,
    ReadOnly,
    collect_garbage,
    create_disk,
    disk_info,
    fork_disk,
    open_disk,
)
from tests import workers
from tests.conftest import S3Endpoint
from tools.s3server import S3Server

BS = workers.BS


def _kill_loop(
    url: str,
    kills: int,
    env: dict[str, str],
    endpoint: str | None,
    seed0: int,
    run_for: tuple[float, float] = (0.4, 1.6),
) -> list[int]:
    """Run the crash writer, kill -9 it at random instants, and check each reopened state."""
    rng = random.Random(seed0)
    checked = []
    for i in range(kills):
        seed = seed0 * 1000 + i
        argv = [sys.executable, "-m", "tests.workers", "crash-writer", url, str(seed)]
        if endpoint:
            argv.append(endpoint)
        # Every run starts from the previous run's surviving state, so replay from there.
        before = trio.run(_read_all, url, endpoint)
        log = Path(env["LANEKIT_TEST_TMP"]) / f"writer-{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, env=env)
        time.sleep(rng.uniform(*run_for))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        buf = log.read_text()
        acks = [int(line.split()[1]) for line in buf.splitlines() if line.startswith("ack ")]
        acked = max(acks, default=0)
        after = trio.run(_read_all, url, endpoint)
        # The reopened disk is exactly some flushed state, never older than the last ack.
        ok = False
        state = bytearray(before)
        if acked == 0 and after == before:
            ok = True
        for k in range(1, acked + 3):
            for off, data in workers.round_writes(seed, k):
                state[off : off + len(data)] = data
            if k >= acked and bytes(state) == after:
                ok = True
                break
        assert ok, f"run {i}: reopened state matches no flushed state at or after ack {acked}"
        checked.append(acked)
    return checked


async def _read_all(url: str, endpoint: str | None) -> bytes:
    async with open_disk(url, writable=False, s3_endpoint=endpoint) as disk:
        return await disk.read(0, disk.size)


def _compacted(url: str, endpoint: str | None = None) -> bool:
    """Whether merges have been committed (runs below level 0 in the head)."""
    objects, name, _ = blockstore.resolve(url, endpoint)
    head, _ = blockstore.manifest.read_head(objects, name)
    return any(s.level >= 1 for s in head.segments)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3])
def test_kill9_mid_write_reopens_at_a_flushed_state_local(tmp_path: Path, seed: int) -> None:
    """25 kills per seed (50 in all) at random instants of writes (most of them partial:
    extents), flushes and the background merges and folds."""
    url = f"file://{tmp_path}/store/crashy"
    trio.run(lambda: blockstore.create(url, workers.BLOCKS * BS, block_size=BS))
    env = dict(os.environ, LANEKIT_TEST_TMP=str(tmp_path))
    acks = _kill_loop(url, 25, env, None, seed0=seed)
    assert max(acks) > 0, "the writer never got a flush acknowledged; the test proves nothing"
    assert _compacted(url), "no merge was ever committed: compaction was not exercised"


@pytest.mark.slow
def test_kill9_mid_write_reopens_at_a_flushed_state_s3(
    s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/lanes/crashy"
    env = dict(os.environ, LANEKIT_TEST_TMP=str(tmp_path), **s3.env)
    trio.run(lambda: blockstore.create(url, workers.BLOCKS * BS, block_size=BS))
    acks = _kill_loop(url, 8, env, s3.endpoint, seed0=2, run_for=(1.0, 2.5))
    assert max(acks) > 0
    assert _compacted(url, s3.endpoint)


async def test_two_writers_exactly_one_wins(s3: S3Endpoint) -> None:
    objects = s3.object_store()
    create_disk(objects, "d", 64 * BS, block_size=BS)
    results: list[str] = []
    all_tried = trio.Event()

    def tried(outcome: str) -> None:
        results.append(outcome)
        if len(results) == 4:
            all_tried.set()

    async def contender() -> None:
        try:
            async with open_disk((objects, "d")) as disk:
                tried("won")
                # Hold the lease until every contender has tried: on a slow machine a
                # late one could otherwise take it, rightly, after the winner let go.
                with trio.fail_after(120):
                    await all_tried.wait()
                await disk.write(0, b"x")
        except LeaseHeld as e:
            assert "in use by host" in str(e)
            assert str(os.getpid()) in str(e)
            tried("refused")

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(contender)
    assert sorted(results) == ["refused", "refused", "refused", "won"]


async def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/d"
    await blockstore.create(url, 64 * BS, block_size=BS)
    holder = subprocess.Popen(  # noqa: ASYNC220 - a separate process is the point
        [sys.executable, "-m", "tests.workers", "hold", url, "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LeaseHeld) as err:
            async with open_disk(url):
                pass
        assert f"pid {holder.pid}" in str(err.value)
        assert err.value.holder["pid"] == holder.pid
        info = disk_info(*blockstore.resolve(url)[:2])
        assert info["lease_holder"]["pid"] == holder.pid
        # A read-only open needs no lease.
        async with open_disk(url, writable=False) as disk:
            assert await disk.read(0, 4) == bytes(4)
    finally:
        holder.kill()
        holder.wait()
    # The holder died on this host: its lease is free at once (more in test_t3_takeover).
    async with open_disk(url) as disk:
        await disk.write(0, b"mine")


async def test_expired_lease_can_be_taken_without_force() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 16 * BS, block_size=BS)
    store = await blockstore.ObjectBlockStore.open(objects, "d", writable=True, lease_ttl=0.2)
    await trio.sleep(0.3)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, b"new owner")
    with pytest.raises(Fenced):
        await store.write_blocks({0: b"z" * BS})
        await store.flush()


async def test_takeover_fences_the_old_writer(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d")) as old:
        await old.write(0, b"A" * BS)
        await old.flush()
        old_epoch = disk_info(objects, "d")["epoch"]
        async with open_disk((objects, "d"), force=True) as new:
            assert disk_info(objects, "d")["epoch"] > old_epoch
            await old.write(BS, b"B" * BS)
            with pytest.raises(Fenced, match="fenced"):
                await old.flush()
            # Fenced forever: even a flush with nothing new fails.
            with pytest.raises(Fenced):
                await old.flush()
            await new.write(2 * BS, b"C" * BS)
        with pytest.raises(Fenced):
            await old.flush()
        old._closed = True  # it may not flush on exit either
    async with open_disk((objects, "d"), writable=False) as disk:
        data = await disk.read(0, 3 * BS)
    assert data == b"A" * BS + bytes(BS) + b"C" * BS


@contextlib.contextmanager
def _server_with_fast_failing_store(
    tmp_path: Path, bucket: str
) -> Iterator[tuple[S3Server, blockstore.S3ObjectStore]]:
    """A SeaweedFS the test may kill, and a store on it that gives up within seconds once
    the server is gone; the server is stopped however the test ends."""
    server = S3Server(tmp_path / "s3")
    server.start()
    try:
        server.client().create_bucket(Bucket=bucket)
        fast_fail = Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=1,
            read_timeout=2,
        )
        kwargs = dict(server.client_kwargs(), config=fast_fail)
        yield server, blockstore.S3ObjectStore(bucket, client=boto3.client("s3", **kwargs))
    finally:
        server.stop()


@pytest.mark.slow
async def test_s3_outage_mid_flush_fails_loudly_and_loses_nothing(tmp_path: Path) -> None:
    with _server_with_fast_failing_store(tmp_path, "outage") as (server, objects):
        create_disk(objects, "d", 1024 * BS, block_size=BS)
        acked = os.urandom(64 * BS)
        unacked = os.urandom(64 * BS)
        async with open_disk((objects, "d"), lease_ttl=600) as disk:
            await disk.write(0, acked)
            await disk.flush()
            await disk.write(64 * BS, unacked)
            port = server.ports[3]
            server.kill()
            with pytest.raises(blockstore.StoreUnavailable):
                await disk.flush()
            server.port = port
            server.start()
            await disk.flush()
            assert await disk.read(0, 128 * BS) == acked + unacked
        async with open_disk((objects, "d"), writable=False) as disk:
            assert await disk.read(0, 128 * BS) == acked + unacked


async def test_writes_spill_to_local_disk_while_s3_is_down_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """With SeaweedFS killed, writes beyond the memory budget go on (spilled to a local
    file) instead of stalling; once the server is back every byte reaches S3."""
    with _server_with_fast_failing_store(tmp_path, "spill") as (server, objects):
        create_disk(objects, "d", 1024 * BS, block_size=BS)
        data = os.urandom(512 * BS)
        async with open_disk(
            (objects, "d"),
            lease_ttl=600,
            dirty_memory=32 * BS,
            dirty_soft_limit=16 * BS,
            dirty_hard_limit=1024 * BS,
            spill_dir=str(tmp_path),
        ) as disk:
            port = server.ports[3]
            server.kill()
            for i in range(0, len(data), 8 * BS):
                await disk.write(i, data[i : i + 8 * BS])
            assert disk._spill is not None, "with S3 down, dirty data must spill, not stall"
            assert disk._dirty_mem <= 32 * BS + 8 * BS
            assert await disk.read(0, len(data)) == data
            server.port = port
            server.start()
            await disk.flush()
        async with open_disk((objects, "d"), writable=False) as disk:
            assert await disk.read(0, len(data)) == data
        # A caller's own error is what surfaces, not the lease release that fails with it.
        with pytest.raises(KeyError, match="the caller's"):
            async with open_disk((objects, "d"), lease_ttl=600):
                server.kill()
                raise KeyError("the caller's")


async def test_checkpoints_are_immutable_and_forks_are_isolated(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    create_disk(objects, "parent", 64 * BS, block_size=BS)
    async with open_disk((objects, "parent")) as disk:
        await disk.write(0, b"v1" * (BS // 2))
        await disk.checkpoint("one")
        await disk.write(0, b"v2" * (BS // 2))
    with pytest.raises(DiskExists):
        blockstore.checkpoint_disk(objects, "parent", "one")
    objects_before = {o.key for o in objects.list("packs/")}
    fork_disk(objects, "parent", "one", "child")
    assert {o.key for o in objects.list("packs/")} == objects_before, "a fork copies nothing"
    async with open_disk((objects, "child")) as child:
        assert await child.read(0, 2) == b"v1"
        await child.write(0, b"c!" * (BS // 2))
    async with open_disk((objects, "parent@one")) as cp:
        assert cp.read_only
        assert await cp.read(0, 2) == b"v1"
        with pytest.raises(ReadOnly):
            await cp.write(0, b"x")
    async with open_disk((objects, "parent"), writable=False) as disk:
        assert await disk.read(0, 2) == b"v2"
    async with open_disk((objects, "child"), writable=False) as disk:
        assert await disk.read(0, 2) == b"c!"
    info = disk_info(objects, "child")
    assert info["parent"] == "parent@one"
    assert disk_info(objects, "parent")["checkpoints"] == ["one"]


def _garbage_count(objects: ObjectStore) -> int:
    return len(list(objects.list("packs/"))) + len(list(objects.list("segments/")))


async def test_gc_deletes_only_unreachable_objects_while_writers_run(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    create_disk(objects, "a", 256 * BS, block_size=BS)
    create_disk(objects, "b", 256 * BS, block_size=BS)
    rng = random.Random(11)
    models = {"a": bytearray(256 * BS), "b": bytearray(256 * BS)}
    reports = []

    async def writer(name: str) -> None:
        async with open_disk((objects, name)) as disk:
            for round_ in range(30):
                for _ in range(10):
                    off = rng.randrange(250) * BS
                    data = rng.randbytes(rng.randrange(1, 3 * BS))
                    await disk.write(off, data)
                    models[name][off : off + len(data)] = data
                await disk.flush()
                if round_ == 10:
                    await disk.checkpoint("mid")
                    models[name + "@mid"] = bytearray(models[name])
                await trio.sleep(0.02)

    async def collector() -> None:
        for _ in range(15):
            await trio.sleep(0.1)
            reports.append(
                await trio.to_thread.run_sync(lambda: collect_garbage(objects, grace=0.5))
            )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "a")
        nursery.start_soon(writer, "b")
        nursery.start_soon(collector)
    await trio.sleep(0.6)
    reports.append(collect_garbage(objects, grace=0.5))
    assert sum(len(r.deleted) for r in reports) > 0, "overwrites left garbage to collect"
    for target, model in models.items():
        async with open_disk((objects, target), writable=False) as disk:
            assert await disk.read(0, disk.size) == model, target
    # A full pass with nothing running leaves exactly what is reachable.
    final = collect_garbage(objects, grace=0.0)
    assert _garbage_count(objects) == final.live_packs + final.live_segments
