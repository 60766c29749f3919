"""A commit that holds only trims and zeroes writes a manifest page naming no pack: it must
open, read and be garbage-collected like any other (it once failed all three with
"unreadable manifest page: index 0 is out of bounds")."""

from __future__ import annotations

from pathlib import Path

from blockstore import LocalObjectStore, collect_garbage, create_disk, open_disk

BS = 64 << 10


async def test_a_commit_of_trims_and_zeroes_only_opens_and_collects(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, b"x" * (3 * BS))
        await disk.flush()
        await disk.trim(BS, BS)
        await disk.write_zeroes(2 * BS, BS)
        await disk.flush()
    collect_garbage(objects, grace=0)
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, 3 * BS) == b"x" * BS + bytes(2 * BS)
