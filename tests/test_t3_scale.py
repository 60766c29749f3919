"""A disk of 16 million stored blocks: the block map's memory and the cost of a commit.

Small compressible blocks (4 KiB of one repeated byte) written through the block store's
API, so the test spends its time in the map, not in moving data. Assertions are on bytes
and request counts, never on time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockstore import LocalObjectStore, ObjectBlockStore, create_disk
from blockstore.blockmap import MAX_RUNS

BS = 4096
STORED = 16_000_000
BATCH = 1 << 18


class Counting(LocalObjectStore):
    """A local store that counts requests and bytes (what a bill would)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets = self.puts = self.put_bytes = self.get_bytes = 0

    def get(self, key: str):  # type: ignore[no-untyped-def]
        obj = super().get(key)
        self.gets += 1
        self.get_bytes += len(obj.data)
        return obj

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = super().get_range(key, offset, length)
        self.gets += 1
        self.get_bytes += len(data)
        return data

    def put(self, key: str, data: bytes, **kwargs: object) -> str:  # type: ignore[override]
        self.puts += 1
        self.put_bytes += len(data)
        return super().put(key, data, **kwargs)  # type: ignore[arg-type]


async def _commit_cost(objects: Counting, store: ObjectBlockStore) -> tuple[int, int, int]:
    """(PUTs, bytes put, GETs) of a flush of three changed blocks, the lease confirmed
    beforehand so the figure is the commit's own."""
    await store.renew_lease()
    puts, put_bytes, gets = objects.puts, objects.put_bytes, objects.gets
    await store.write_blocks({b: os.urandom(BS) for b in (5, 7_000_001, STORED - 1)})
    await store.flush()
    return objects.puts - puts, objects.put_bytes - put_bytes, objects.gets - gets


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
async def test_sixteen_million_blocks_in_bounded_memory_with_flat_commits(tmp_path: Path) -> None:
    empty_objects = Counting(tmp_path / "empty")
    create_disk(empty_objects, "e", STORED * BS, block_size=BS)
    empty = await ObjectBlockStore.open(empty_objects, "e", writable=True)
    on_empty = await _commit_cost(empty_objects, empty)
    await empty.release()

    objects = Counting(tmp_path / "big")
    create_disk(objects, "d", STORED * BS, block_size=BS)
    store = await ObjectBlockStore.open(objects, "d", writable=True, pack_size=64 << 20)
    rss_before = _rss()
    block = b"\x5a" * BS
    commits_put = []
    for lo in range(0, STORED, BATCH):
        hi = min(STORED, lo + BATCH)
        await store.write_blocks(dict.fromkeys(range(lo, hi), block))
        puts = objects.put_bytes
        await store.flush()
        commits_put.append(objects.put_bytes - puts)
        while await store.compact():
            pass
    assert store.head.stored_blocks == STORED
    # Each commit wrote its own entries only, never the map so far (16 B an entry and
    # compressed: far below the 64 MiB of data a batch is).
    assert max(commits_put) < BATCH * 16, commits_put
    map_bytes = store.map_nbytes()
    assert map_bytes / STORED <= 24, f"{map_bytes / STORED:.1f} B per stored block"
    grown = _rss() - rss_before
    assert grown / STORED <= 32, f"resident memory grew {grown / STORED:.1f} B per block"
    assert store.segments <= MAX_RUNS

    on_big = await _commit_cost(objects, store)
    assert on_big[0] == on_empty[0] == 3, (on_big, on_empty)  # pack, segment, head
    assert on_big[1] <= on_empty[1] + 1024, (on_big, on_empty)
    assert on_big[2] == 0, "a commit reads nothing when its map pages are loaded"
    await store.release()

    # Opening reads the head and the segments' indexes, not the map.
    gets, got = objects.gets, objects.get_bytes
    reader = await ObjectBlockStore.open(objects, "d", writable=False)
    assert objects.gets - gets <= 1 + reader.segments
    assert objects.get_bytes - got < map_bytes / 100, "open read a fraction of the map"
    assert reader.map_nbytes() < map_bytes / 100
    data = await reader.read_blocks([12_345_678])
    assert data[12_345_678] == block
    assert objects.gets - gets <= 1 + 2 * reader.segments + 1
