"""Disk semantics over the reference block store and over a user-written block store."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import trio
import trio.lowlevel

import blockstore
from blockstore import (
    BaseImage,
    BaseMismatch,
    BlockValue,
    CorruptBlock,
    Disk,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectStore,
    OutOfRange,
    ReadOnly,
    create_disk,
    open_disk,
)
from tests.conftest import S3Endpoint

BS = 4096


async def _random_ops(disk: Disk, model: bytearray, rng: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        op = rng.random()
        off = rng.randrange(size)
        n = rng.randrange(1, min(3 * BS, size - off) + 1)
        if op < 0.5:
            data = rng.randbytes(n) if rng.random() < 0.7 else bytes(n)
            await disk.write(off, data)
            model[off : off + n] = data
        elif op < 0.6:
            await disk.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        elif op < 0.65:
            await disk.trim(off, n)
            model[off : off + n] = bytes(n)
        elif op < 0.7:
            await disk.flush()
        else:
            assert await disk.read(off, n) == model[off : off + n]


@pytest.mark.parametrize("backend", ["memory", "local", "s3"])
async def test_random_io_matches_model_across_reopen(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    objects: ObjectStore
    if backend == "memory":
        objects = MemoryObjectStore()
    elif backend == "local":
        objects = LocalObjectStore(tmp_path)
    else:
        s3: S3Endpoint = request.getfixturevalue("s3")
        objects = s3.object_store()
    size = 64 * BS + 1024
    create_disk(objects, "d", size, block_size=BS)
    model = bytearray(size)
    rng = random.Random(7)
    async with open_disk((objects, "d"), cache_bytes=8 * BS, dirty_memory=4 * BS) as disk:
        await _random_ops(disk, model, rng, 400)
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, size) == model
        await _random_ops_read_only(disk, model, rng)
        # Stats kept incrementally across ~20 commits (and compactions) match a recount.
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        assert store.head.generation > 16
        assert (store.head.stored_blocks, store.head.stored_bytes) == await store.recount()


async def _random_ops_read_only(disk: Disk, model: bytearray, rng: random.Random) -> None:
    for _ in range(50):
        off = rng.randrange(len(model))
        n = rng.randrange(0, len(model) - off + 1)
        assert await disk.read(off, n) == model[off : off + n]
    with pytest.raises(ReadOnly):
        await disk.write(0, b"x")


async def test_base_image_copy_on_write(tmp_path: Path) -> None:
    base_path = tmp_path / "base.img"
    base_data = os.urandom(16 * BS + 512)
    base_path.write_bytes(base_data)
    objects = MemoryObjectStore()
    await blockstore.create((objects, "d"), 0, block_size=BS, base=base_path)
    model = bytearray(base_data)
    async with open_disk((objects, "d"), base=base_path) as disk:
        assert disk.size == len(base_data)
        assert await disk.read(0, len(model)) == model
        await disk.write(BS + 10, b"new")
        model[BS + 10 : BS + 13] = b"new"
        await disk.write_zeroes(3 * BS, 2 * BS)
        model[3 * BS : 5 * BS] = bytes(2 * BS)
        await disk.write(6 * BS, bytes(BS))
        model[6 * BS : 7 * BS] = bytes(BS)
        assert await disk.read(0, len(model)) == model
    async with open_disk((objects, "d"), base=base_path, writable=False) as disk:
        assert await disk.read(0, len(model)) == model
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        # Zero blocks over a base are metadata only: one data block stored.
        assert store.head.stored_blocks == 1
        runs = await disk.extents(0, 8 * BS)
        assert (2 * BS, blockstore.HOLE | blockstore.ZERO_FLAG) in runs
    # The base is part of the disk's identity.
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(len(base_data)))
    with pytest.raises(BaseMismatch, match="same base image"):
        async with open_disk((objects, "d"), base=other):
            pass
    with pytest.raises(BaseMismatch, match="pass that image"):
        async with open_disk((objects, "d")):
            pass
    # A refused open leaves no lease behind.
    async with open_disk((objects, "d"), base=BaseImage(base_path)) as disk:
        assert await disk.read(BS + 10, 3) == b"new"


async def test_zero_blocks_are_never_stored_and_trim_drops_blocks() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 32 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, os.urandom(8 * BS))
        await disk.write(8 * BS, bytes(8 * BS))
        await disk.flush()
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        assert store.head.stored_blocks == 8
        await disk.trim(0, 4 * BS)
        await disk.write_zeroes(4 * BS, 2 * BS)
        await disk.flush()
        assert store.head.stored_blocks == 2
        assert await disk.read(0, 6 * BS) == bytes(6 * BS)
        runs = await disk.extents(0, 32 * BS)
        assert runs == [
            (6 * BS, blockstore.HOLE | blockstore.ZERO_FLAG),
            (2 * BS, 0),
            (24 * BS, blockstore.HOLE | blockstore.ZERO_FLAG),
        ]


async def test_out_of_range_and_overflow_are_refused() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 8 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        for off, n in ((8 * BS, 1), (-1, 1), (0, 8 * BS + 1), (2**63, 2**63), (1, -1)):
            with pytest.raises(OutOfRange):
                await disk.read(off, n)
        with pytest.raises(OutOfRange):
            await disk.write(8 * BS - 1, b"xx")
        assert await disk.read(8 * BS, 0) == b""


async def test_small_writes_in_one_region_are_packed() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 4096 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        puts_before = objects.counts["put"]
        rng = random.Random(1)
        for _ in range(1000):
            await disk.write(rng.randrange(1000) * BS + rng.randrange(100), rng.randbytes(512))
        await disk.flush()
        puts = objects.counts["put"] - puts_before
    # 1000 writes, <= 1000 distinct blocks of 4 KiB: one pack, one segment, one head.
    assert puts <= 4, puts


async def test_disk_ten_times_larger_than_cache_stays_in_budget_and_reads_back(
    tmp_path: Path,
) -> None:
    objects = LocalObjectStore(tmp_path / "store")
    create_disk(objects, "big", 4096 * BS, block_size=BS)
    cache = 64 * BS
    rng = random.Random(3)
    blobs = {b: rng.randbytes(BS) for b in rng.sample(range(4096), 1024)}
    async with open_disk(
        (objects, "big"),
        cache_bytes=cache,
        dirty_memory=cache // 2,
        dirty_soft_limit=4 * cache,
        dirty_hard_limit=8 * cache,
        spill_dir=str(tmp_path),
    ) as disk:
        for b, data in blobs.items():
            await disk.write(b * BS, data)
            assert disk._dirty_mem <= cache // 2, "dirty memory must stay within its budget"
        assert disk._spill is None, "a healthy store is waited for, not spilled around"
        for b, data in list(blobs.items())[:50]:
            assert await disk.read(b * BS, BS) == data
    async with open_disk((objects, "big"), writable=False, cache_bytes=cache) as disk:
        for b, data in blobs.items():
            assert await disk.read(b * BS, BS) == data
        assert disk._clean_bytes <= cache


async def test_open_is_lazy_and_reads_fetch_only_what_they_touch() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 2048 * BS, block_size=BS)
    async with open_disk((objects, "d"), pack_size=64 * BS) as disk:
        await disk.write(0, os.urandom(2048 * BS))
    gets_before = objects.counts["get"]
    async with open_disk((objects, "d"), writable=False, pack_size=64 * BS) as disk:
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        assert store.stats.blocks_fetched == 0
        opened_gets = objects.counts["get"] - gets_before
        await disk.read(1000 * BS, 10)
        assert store.stats.blocks_fetched == 1
        assert store.stats.gets == 1
    assert opened_gets <= 1 + len(store.head.segments)


async def test_sequential_reads_trigger_readahead() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 1024 * BS, block_size=BS)
    data = os.urandom(1024 * BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, data)
    async with open_disk((objects, "d"), writable=False, readahead_max=64 * BS) as disk:
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        for off in range(0, 256 * BS, 16 * BS):
            assert await disk.read(off, 16 * BS) == data[off : off + 16 * BS]
            await trio.sleep(0.01)
        # Fetches were batched ahead of the reader: far fewer requests than reads.
        assert store.stats.blocks_fetched >= 256
        assert store.stats.gets < 16


async def test_interleaved_sequential_streams_each_get_readahead() -> None:
    """Four readers, as over four NBD connections, each sequential in its own quarter and
    interleaved request by request: each is recognised as a stream of its own."""
    objects = MemoryObjectStore()
    create_disk(objects, "d", 1024 * BS, block_size=BS)
    data = os.urandom(1024 * BS)
    async with open_disk((objects, "d"), pack_size=1024 * BS) as disk:
        await disk.write(0, data)
    async with open_disk((objects, "d"), writable=False, readahead_max=64 * BS) as disk:
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        for step in range(0, 128 * BS, 4 * BS):
            for quarter in range(4):
                off = quarter * 256 * BS + step
                assert await disk.read(off, 4 * BS) == data[off : off + 4 * BS]
            await trio.sleep(0.01)
        assert store.stats.blocks_fetched >= 512
        # 128 reads; without a stream per reader every read would be a request of its own.
        assert store.stats.gets < 40


async def test_corrupted_object_is_an_error_naming_it(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    create_disk(objects, "d", 16 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, os.urandom(4 * BS))
    pack = next(o.key for o in objects.list("packs/"))
    path = tmp_path / pack
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    async with open_disk((objects, "d"), writable=False) as disk:
        with pytest.raises(CorruptBlock) as err:
            await disk.read(0, 4 * BS)
        assert pack in str(err.value)
        assert err.value.key == pack
    path.write_bytes(bytes(raw[:10]))
    async with open_disk((objects, "d"), writable=False) as disk:
        with pytest.raises(CorruptBlock, match="truncated"):
            await disk.read(0, 4 * BS)


async def test_corrupted_object_on_s3(s3: S3Endpoint) -> None:
    objects = s3.object_store()
    create_disk(objects, "d", 16 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, os.urandom(4 * BS))
    pack = next(o.key for o in objects.list("packs/"))
    raw = bytearray(objects.get(pack).data)
    raw[5] ^= 1
    objects.put(pack, bytes(raw))
    async with open_disk((objects, "d"), writable=False) as disk:
        with pytest.raises(CorruptBlock, match=pack):
            await disk.read(0, BS)


class DictBlockStore:
    """A user-written block store: just the protocol, nothing from our reference one."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.durable: dict[int, bytes] = {}
        self.staged: dict[int, BlockValue] = {}
        self.flushes = 0

    async def list_blocks(self) -> dict[int, bool]:
        merged = dict(self.durable)
        for b, v in self.staged.items():
            if v is None:
                merged.pop(b, None)
            else:
                merged[b] = v
        return {b: v != b"" for b, v in merged.items()}

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, BlockValue]:
        out: dict[int, BlockValue] = {}
        for b in blocks:
            out[b] = self.staged[b] if b in self.staged else self.durable.get(b)
        return out

    async def write_blocks(self, blocks: Mapping[int, BlockValue]) -> None:
        self.staged.update(blocks)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        for b, v in self.staged.items():
            if v is None:
                self.durable.pop(b, None)
            else:
                self.durable[b] = v
        self.staged.clear()
        self.flushes += 1


async def test_disk_on_a_user_written_block_store(tmp_path: Path) -> None:
    store = DictBlockStore(BS)
    assert isinstance(store, blockstore.BlockStore)
    base_path = tmp_path / "base"
    base_path.write_bytes(os.urandom(8 * BS))
    model = bytearray(base_path.read_bytes() + bytes(8 * BS))
    async with Disk(store, 16 * BS, base=BaseImage(base_path)) as disk:
        await _random_ops(disk, model, random.Random(5), 300)
        await disk.flush()
        assert store.flushes >= 1
        assert not store.staged
        runs = await disk.extents(0, 16 * BS)
        assert sum(n for n, _ in runs) == 16 * BS
    async with Disk(store, 16 * BS, base=BaseImage(base_path), read_only=True) as disk:
        assert await disk.read(0, 16 * BS) == model
    assert all(len(v) in (0, BS) for v in store.durable.values())


def test_readme_custom_block_store_example_runs() -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    exec(compile(code.group(1), "README.md", "exec"), {"__name__": "readme"})


# ------------------------------------------------------------ trio helpers


def test_blocking_holds_an_async_context_open_for_plain_code() -> None:
    import contextlib

    from blockstore.concurrency import blocking

    events: list[str] = []

    @contextlib.asynccontextmanager
    async def resource(fail_enter: bool = False, fail_exit: bool = False):  # type: ignore[no-untyped-def]
        if fail_enter:
            raise OSError("cannot enter")
        events.append("entered")
        try:
            yield "value"
        finally:
            events.append("exited")
            if fail_exit:
                raise RuntimeError("cannot exit")

    async def where() -> str:
        await trio.lowlevel.checkpoint()
        return "in the loop"

    with blocking(resource) as (value, token):
        assert value == "value" and events == ["entered"]
        assert trio.from_thread.run(where, trio_token=token) == "in the loop"
    assert events == ["entered", "exited"]
    with pytest.raises(OSError, match="cannot enter"), blocking(lambda: resource(fail_enter=True)):
        pass
    with (
        pytest.raises(RuntimeError, match="cannot exit"),
        blocking(lambda: resource(fail_exit=True)),
    ):
        pass
    # the block's own error wins over the exit's
    with pytest.raises(KeyError), blocking(lambda: resource(fail_exit=True)):
        raise KeyError("body")


async def test_a_spilled_block_read_while_its_slot_is_freed_and_given_out_again(
    tmp_path: Path,
) -> None:
    """A read of a spilled block runs in a thread; if the block is rewritten meanwhile
    (freeing its slot) and another block spills into that slot, the read must still
    return the first block's bytes, never the other's."""
    import threading

    objects = LocalObjectStore(tmp_path / "store")
    create_disk(objects, "d", 16 * BS, block_size=BS)
    first, second, third = (bytes([n]) * BS for n in (1, 2, 3))
    async with open_disk((objects, "d"), spill_dir=str(tmp_path)) as disk:
        await disk.write(0, first)
        await disk._spill_dirty()  # what a failing store makes of the dirty blocks
        spill = disk._spill
        assert spill is not None
        real_read, reading, go_on = spill.read, threading.Event(), threading.Event()

        def held_read(slot: int) -> bytes:
            reading.set()
            go_on.wait(30)
            return real_read(slot)

        spill.read = held_read  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read_first() -> None:
                got.append(await disk.read(0, BS))

            nursery.start_soon(read_first)
            await trio.to_thread.run_sync(reading.wait, 30)
            spill.read = real_read  # type: ignore[method-assign]
            await disk.write(BS, second)
            await disk.write(0, third)  # frees block 0's slot
            await disk._spill_dirty()  # block 1 spills first, into a free slot
            go_on.set()
        assert got[0] in (first, third), "the read returned another block's bytes"
        assert await disk.read(0, 2 * BS) == third + second


async def test_a_cancelled_writer_still_stops_its_tasks_and_releases_its_lease() -> None:
    """Ctrl-C during a boot, a caller's timeout: the disk's exit runs cancelled. It
    must still end its background tasks and release the lease (the next writer need not
    wait for the lease to expire), and leave trio's scopes whole."""
    from blockstore.lease import lease_is_live, read_lease

    objects = MemoryObjectStore()
    create_disk(objects, "d", 16 * BS, block_size=BS)
    with trio.move_on_after(0.2) as timed_out:
        async with open_disk((objects, "d")) as disk:
            await disk.write(0, b"x" * BS)
            await trio.sleep(30)
    assert timed_out.cancelled_caught
    assert not lease_is_live(read_lease(objects, "d")[0])
    async with open_disk((objects, "d")) as disk:  # no force needed
        assert len(await disk.read(0, BS)) == BS
