"""Takeovers: a forced one under load always completes and stops the old writer at once;
a lease whose holder died on this host is taken over without force."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import blockstore
from blockstore import (
    Fenced,
    LeaseHeld,
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    create_disk,
    disk_info,
    open_disk,
)
from blockstore.lease import read_lease
from blockstore.manifest import read_head
from tests.conftest import S3Endpoint

BS = 4096
OLD_BLOCKS = 2048


async def _takeover_round(new_store: Callable[[], ObjectStore], name: str, seed: int) -> None:
    """One writer writes and flushes without pause; a second one forces a takeover at a
    random instant. Each writer has its own store client, as two processes would."""
    rng = random.Random(seed)
    create_disk(new_store(), name, 2 * OLD_BLOCKS * BS, block_size=BS)
    acked: dict[int, bytes] = {}
    old_generations: list[int] = []
    takeover_generation: int | None = None
    old_error: BaseException | None = None
    old_done = trio.Event()

    async def old_writer() -> None:
        nonlocal old_error
        try:
            async with open_disk((new_store(), name)) as old:
                assert isinstance(old.store, blockstore.ObjectBlockStore)
                for block in range(OLD_BLOCKS):
                    data = rng.randbytes(BS)
                    await old.write(block * BS, data)
                    await old.flush()
                    old_generations.append(old.store.head.generation)
                    acked[block] = data
                raise AssertionError("the old writer was never fenced")
        except Fenced as e:
            old_error = e
        finally:
            old_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_writer)
        while len(acked) < 3:
            await trio.sleep(0.01)
        await trio.sleep(rng.uniform(0, 0.3))
        async with open_disk((new_store(), name), force=True) as new:
            assert isinstance(new.store, blockstore.ObjectBlockStore)
            takeover_generation = new.store.head.generation
            for j in range(4):
                block = OLD_BLOCKS + j
                data = rng.randbytes(BS)
                await new.write(block * BS, data)
                await new.flush()
                acked[block] = data
            with trio.fail_after(30):
                await old_done.wait()
    # An old flush may be acknowledged after the takeover returned (its reply can be slower
    # than the takeover's read and commit), but only one that committed before it.
    assert takeover_generation is not None
    late = [g for g in old_generations if g >= takeover_generation]
    assert not late, f"the old writer committed generations {late} after the takeover's"
    assert isinstance(old_error, Fenced), old_error
    async with open_disk((new_store(), name), writable=False) as check:
        for block, data in acked.items():
            assert await check.read(block * BS, BS) == data, f"acknowledged block {block} lost"


@pytest.mark.slow
async def test_forced_takeover_under_load_local(tmp_path: Path) -> None:
    for i in range(20):
        await _takeover_round(lambda: LocalObjectStore(tmp_path / "store"), f"d{i}", seed=i)


@pytest.mark.slow
async def test_forced_takeover_under_load_s3(s3: S3Endpoint) -> None:
    bucket = s3.new_bucket()
    clients: list[S3ObjectStore] = []

    def new_store() -> ObjectStore:
        clients.append(S3ObjectStore(bucket, client=s3.client()))
        return clients[-1]

    try:
        for i in range(10):
            await _takeover_round(new_store, f"d{i}", seed=100 + i)
    finally:
        for client in clients:
            client.close()


async def test_a_writer_whose_lease_was_broken_commits_nothing_more(tmp_path: Path) -> None:
    """No commit without a lease confirmed moments ago: once its lease is broken (here by
    `disk release --force`, before any new writer has committed a head) the writer's next
    flush fails, though its lease is far from expiring and its renewal is minutes away."""
    objects = LocalObjectStore(tmp_path / "store")
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d"), lease_ttl=3, lease_renew_interval=600) as old:
        await old.write(0, b"A" * BS)
        await old.flush()
        generation = disk_info(objects, "d")["generation"]
        blockstore.force_release(objects, "d")
        await trio.sleep(0.2)  # longer than ttl/30 since it last confirmed its lease
        await old.write(BS, b"B" * BS)
        with pytest.raises(Fenced, match="taken over"):
            await old.flush()
        assert disk_info(objects, "d")["generation"] == generation
        old._closed = True  # it may not flush on exit either


class _Interloper(LocalObjectStore):
    """A store on which another writer, one that ignores its lease (not lanekit's), commits
    a head between every head read and head write of ours."""

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if key == "disks/d/head" and if_match is not None:
            head, etag = read_head(self, "d")
            moved = dataclasses.replace(
                head, generation=head.generation + 1, commit_id=uuid.uuid4().hex
            )
            super().put(key, moved.encode(), if_match=etag)
        return super().put(key, data, if_none_match=if_none_match, if_match=if_match)


@pytest.mark.slow
async def test_a_takeover_against_a_writer_that_never_stops_gives_up_clearly(
    tmp_path: Path,
) -> None:
    """The takeover retries against the moving head only within its bound, then says so in
    one line and leaves no lease behind."""
    objects = LocalObjectStore(tmp_path / "store")
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d")):
        pass
    with trio.fail_after(30), pytest.raises(blockstore.BlockStoreError) as err:
        async with open_disk((_Interloper(tmp_path / "store"), "d"), force=True, lease_ttl=1):
            pass
    assert "could not fence the previous writer" in str(err.value)
    assert "\n" not in str(err.value)
    assert disk_info(objects, "d")["lease_holder"] is None


def _hold(url: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "hold", url, "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"
    return holder


def _kill(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait()
    if holder.stdout is not None:
        holder.stdout.close()


async def test_a_holder_killed_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/d"
    await blockstore.create(url, 64 * BS, block_size=BS)
    objects, name, _ = blockstore.resolve(url)
    holder = _hold(url)
    try:
        lease, _ = read_lease(objects, name)
        assert lease is not None and lease["holder"]["pid"] == holder.pid
        assert lease["holder"]["host_id"] == blockstore.host_identity()
        assert lease["holder"]["process"] == blockstore.process_identity(holder.pid)
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            async with open_disk(url):
                pass
    finally:
        _kill(holder)
    epoch = disk_info(objects, name)["epoch"]
    assert disk_info(objects, name)["lease_holder"] is None, "a dead holder holds nothing"
    with trio.fail_after(10):  # at once, not after the 60 s TTL
        async with open_disk(url) as disk:
            await disk.write(0, b"mine")
    info = disk_info(objects, name)
    assert info["epoch"] > epoch, "the takeover fences the dead holder as usual"


def _forge(objects: ObjectStore, name: str, **holder: object) -> None:
    obj = objects.get(f"disks/{name}/lease")
    lease = json.loads(obj.data)
    lease["holder"].update(holder)
    objects.put(f"disks/{name}/lease", json.dumps(lease).encode(), if_match=obj.etag)


async def test_only_a_holder_on_this_host_and_pid_namespace_is_judged(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/d"
    await blockstore.create(url, 64 * BS, block_size=BS)
    objects, name, _ = blockstore.resolve(url)
    holder = _hold(url)
    _kill(holder)
    here = blockstore.host_identity()
    assert here is not None
    boot, _, namespace = here.partition("/")
    for other_host in (f"{boot}/{int(namespace) + 1}", f"another-boot-id/{namespace}", None):
        # Another container on this kernel, another machine, an older lanekit: the pid
        # is not ours to judge, so its lease waits out its TTL (or a forced takeover).
        _forge(objects, name, host_id=other_host)
        with pytest.raises(LeaseHeld):
            async with open_disk(url):
                pass
    # This host, but the pid now names another process (ours): reused, so dead.
    _forge(objects, name, host_id=here, pid=os.getpid(), process=f"{os.getpid()}:1")
    async with open_disk(url) as disk:
        await disk.write(0, b"mine")


def test_process_and_host_identity() -> None:
    me = blockstore.process_identity(os.getpid())
    assert me is not None and me.startswith(f"{os.getpid()}:")
    assert me == blockstore.process_identity(os.getpid()), "stable for a live process"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert blockstore.process_identity(child.pid) is None
    assert blockstore.process_identity(0) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    with contextlib.suppress(subprocess.TimeoutExpired):
        # Not reaped yet: a zombie has exited, so it has no identity either.
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
    assert blockstore.process_identity(zombie.pid) is None
    zombie.wait()
    host = blockstore.host_identity()
    assert host is not None
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert host == f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
