"""Sub-block writes as extents, compaction (merges and folds), and their integrity."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import blockstore
from blockstore import (
    BaseImage,
    BlockValue,
    CorruptBlock,
    Disk,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectBlockStore,
    ObjectStore,
    collect_garbage,
    create_disk,
    disk_info,
    fork_disk,
    open_disk,
)
from blockstore.blockmap import FOLD_EXTENTS, MAX_RUNS
from blockstore.layout import (
    Head,
    Location,
    SegmentRef,
    encode_block,
    encode_segment,
    head_key,
    new_lineage,
)
from tests.conftest import S3Endpoint

BS = 16 << 10


def _store(disk: Disk) -> ObjectBlockStore:
    assert isinstance(disk.store, ObjectBlockStore)
    return disk.store


def _count_gets(objects: blockstore.S3ObjectStore) -> dict[str, int]:
    """Count the GET requests boto3 really sends (by key prefix)."""
    counts = {"packs/": 0, "segments/": 0, "disks/": 0}

    def seen(params: dict[str, Any], **_: Any) -> None:
        key = params["Key"][len(objects.prefix) :]
        counts[next(p for p in counts if key.startswith(p))] += 1

    objects.client.meta.events.register("provide-client-params.s3.GetObject", seen)
    return counts


async def test_partial_writes_to_cold_blocks_read_nothing_from_s3(s3: S3Endpoint) -> None:
    """A disk whose blocks live only in S3: small writes into blocks never read on this
    host send no GET (no read-modify-write); flushes upload about the bytes written."""
    objects = s3.object_store()
    bs = 64 << 10
    blocks = 128
    create_disk(objects, "d", blocks * bs, block_size=bs)
    model = bytearray(os.urandom(blocks * bs))
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, bytes(model))
    gets = _count_gets(objects)
    rng = random.Random(3)
    async with open_disk((objects, "d")) as disk:
        opened = dict(gets)
        uploaded = _store(disk).stats.bytes_uploaded
        written = 0
        for i in range(300):
            off = rng.randrange(blocks * bs - 9000)
            data = rng.randbytes(rng.choice((4096, 512, 1, 3000)))
            await disk.write(off, data)
            model[off : off + len(data)] = data
            written += len(data)
            if i % 50 == 49:
                await disk.flush()
        await disk.write_zeroes(5 * bs + 100, 1000)
        model[5 * bs + 100 : 5 * bs + 1100] = bytes(1000)
        await disk.flush()
        await disk.compact()
        assert gets == opened, f"writes to cold blocks read from S3: {gets} after {opened}"
        sent = _store(disk).stats.bytes_uploaded - uploaded
        assert sent < 2 * written + 64 << 10, f"{sent} bytes uploaded for {written} written"
        assert await disk.read(0, blocks * bs) == model
        assert gets["packs/"] > opened["packs/"], "read back: now blocks are fetched"
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, blocks * bs) == model
    objects.close()


async def _random_ops(
    disk: Disk, model: bytearray, rng: random.Random, count: int, zeros_under: bytes
) -> None:
    size = len(model)
    for _ in range(count):
        op = rng.random()
        if op < 0.45:
            # Mostly small and unaligned, some whole blocks, some across blocks.
            off = rng.randrange(size)
            n = min(rng.choice((1, 17, 512, 4096, 5000, BS, 2 * BS + 3)), size - off)
            data = rng.randbytes(n) if rng.random() < 0.85 else bytes(n)
            await disk.write(off, data)
            model[off : off + n] = data
        elif op < 0.55:
            off = rng.randrange(size)
            n = rng.randrange(1, min(3 * BS, size - off) + 1)
            if rng.random() < 0.5:
                await disk.write_zeroes(off, n)
            else:
                await disk.trim(off, n)
            model[off : off + n] = bytes(n)
        elif op < 0.62:
            await disk.flush()
        elif op < 0.65:
            await disk.compact()
        else:
            off = rng.randrange(size)
            n = rng.randrange(0, min(4 * BS, size - off) + 1)
            assert await disk.read(off, n) == model[off : off + n]


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_extents_match_a_model_across_flushes_reopens_and_compactions(
    backend: str, with_base: bool, tmp_path: Path
) -> None:
    objects: ObjectStore = (
        MemoryObjectStore() if backend == "memory" else LocalObjectStore(tmp_path / "store")
    )
    size = 48 * BS + 4096
    rng = random.Random(11 if with_base else 12)
    base_path = tmp_path / "base.img"
    base_data = rng.randbytes(20 * BS + 1000)
    base_path.write_bytes(base_data)
    if with_base:
        await blockstore.create((objects, "d"), size, block_size=BS, base=base_path)
        model = bytearray(base_data + bytes(size - len(base_data)))
    else:
        create_disk(objects, "d", size, block_size=BS)
        model = bytearray(size)

    def opened(**kw: Any) -> Any:
        base = BaseImage(base_path) if with_base else None
        return open_disk((objects, "d"), base=base, cache_bytes=8 * BS, **kw)

    merges = folds = 0
    for _round in range(6):
        async with opened() as disk:
            await _random_ops(disk, model, rng, 150, bytes(BS))
            await disk.flush()
            store = _store(disk)
            merges += store.stats.merges
            folds += store.stats.folds
            assert await disk.read(0, size) == model
        async with opened(writable=False) as disk:
            assert await disk.read(0, size) == model
    async with opened() as disk:
        await disk.compact()
        store = _store(disk)
        assert (store.head.stored_blocks, store.head.stored_bytes) == await store.recount()
        assert store.segments <= 5
        assert await disk.read(0, size) == model
    assert merges > 0 and folds > 0, (merges, folds)


async def test_many_extents_are_folded_into_one_piece() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 64 * BS, block_size=BS)
    model = bytearray(64 * BS)
    async with open_disk((objects, "d"), compact=False) as disk:
        for i in range(FOLD_EXTENTS + 2):
            data = bytes([i + 1]) * 700
            await disk.write(3 * BS + i * 800, data)
            model[3 * BS + i * 800 : 3 * BS + i * 800 + 700] = data
            await disk.flush()
        store = _store(disk)
        assert 3 in store.fold_candidates
        gets = objects.counts["get"]
        assert await disk.read(3 * BS, BS) == model[3 * BS : 4 * BS]
        assert objects.counts["get"] - gets > 1, "many pieces in several packs"
        await disk.compact()
        assert store.stats.folds == 1
        (piece,) = store._map.lookup(3)
        assert piece.kind == blockstore.pieces.DATA
        assert (store.head.stored_blocks, store.head.stored_bytes) == await store.recount()
    async with open_disk((objects, "d"), writable=False) as disk:
        gets = objects.counts["get"]
        assert await disk.read(3 * BS, BS) == model[3 * BS : 4 * BS]
        assert objects.counts["get"] - gets == 1, "one piece, one request"


async def test_compaction_yields_to_a_busy_writer_but_keeps_up() -> None:
    """While a writer flushes often, background folds take at most half the time; they
    still run all along, and a merge that is due does not wait (the runs a reader
    consults stay few)."""
    objects = MemoryObjectStore()
    blocks = 64
    create_disk(objects, "d", blocks * BS, block_size=BS)
    model = bytearray(blocks * BS)
    model[0:1] = b"x"
    rng = random.Random(5)
    async with open_disk((objects, "d"), compact=False) as disk:
        store = _store(disk)
        for _ in range(MAX_RUNS + 1):
            await disk.write(0, b"x")
            await disk.flush()
        assert store.merge_due()
        await disk.compact()
        assert not store.merge_due()
    async with open_disk((objects, "d")) as disk:
        store = _store(disk)
        most_runs = 0
        for _ in range(300):
            for _ in range(8):
                offset = rng.randrange(blocks * BS - 600)
                data = rng.randbytes(rng.randrange(1, 600))
                await disk.write(offset, data)
                model[offset : offset + len(data)] = data
            await disk.flush()
            most_runs = max(most_runs, len(store._map.runs))
        assert store.stats.folds > 0 and store.stats.merges > 0  # during the writes
        assert most_runs <= MAX_RUNS + 2
        assert await disk.read(0, blocks * BS) == model
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, blocks * BS) == model


async def test_a_corrupted_extent_is_an_error_naming_its_object(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    create_disk(objects, "d", 16 * BS, block_size=BS)
    async with open_disk((objects, "d"), compact=False) as disk:
        await disk.write(0, os.urandom(4 * BS))
        await disk.flush()
        before = {o.key for o in objects.list("packs/")}
        await disk.write(2 * BS + 1234, os.urandom(2000))
    (pack,) = {o.key for o in objects.list("packs/")} - before
    path = tmp_path / pack
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    async with open_disk((objects, "d"), writable=False) as disk:
        assert len(await disk.read(0, 2 * BS)) == 2 * BS, "other blocks still read"
        with pytest.raises(CorruptBlock) as err:
            await disk.read(2 * BS, BS)
        assert err.value.key == pack and pack in str(err.value) and "\n" not in str(err.value)


async def test_compaction_beside_gc_a_checkpoint_and_a_fork(tmp_path: Path) -> None:
    """Merges and folds while GC sweeps, a checkpoint is taken and a fork of it writes and
    compacts too (sharing the parent's pages and packs): every state reads back."""
    objects = LocalObjectStore(tmp_path / "store")
    size = 64 * BS
    create_disk(objects, "d", size, block_size=BS)
    rng = random.Random(5)
    models: dict[str, bytearray] = {"d": bytearray(size)}
    forked = trio.Event()
    reports = []

    async def churn(disk: Disk, model: bytearray, rounds: int) -> None:
        for _ in range(rounds):
            for _ in range(12):
                off = rng.randrange(size - 3000)
                data = rng.randbytes(rng.choice((100, 3000, BS)))[: size - off]
                await disk.write(off, data)
                model[off : off + len(data)] = data
            await disk.flush()
            if rng.random() < 0.3:
                await disk.compact()
            await trio.sleep(0.01)

    async def parent() -> None:
        async with open_disk((objects, "d")) as disk:
            await churn(disk, models["d"], 25)
            await disk.checkpoint("cp")
            models["d@cp"] = bytearray(models["d"])
            await trio.to_thread.run_sync(lambda: fork_disk(objects, "d", "cp", "f"))
            models["f"] = bytearray(models["d"])
            forked.set()
            await churn(disk, models["d"], 25)

    async def child() -> None:
        await forked.wait()
        async with open_disk((objects, "f")) as fork:
            await churn(fork, models["f"], 25)
            await fork.compact()

    async def collector() -> None:
        for _ in range(20):
            await trio.sleep(0.15)
            reports.append(await trio.to_thread.run_sync(lambda: collect_garbage(objects, grace=2)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parent)
        nursery.start_soon(child)
        nursery.start_soon(collector)
    await trio.sleep(2.1)
    reports.append(collect_garbage(objects, grace=2))
    assert sum(len(r.deleted) for r in reports) > 0, "compaction left garbage to collect"
    for target, model in models.items():
        async with open_disk((objects, target), writable=False) as disk:
            assert await disk.read(0, size) == model, target
    assert any(s.level >= 1 for s in blockstore.manifest.read_head(objects, "f")[0].segments)
    final = collect_garbage(objects, grace=0.0)
    assert len(list(objects.list("packs/"))) == final.live_packs
    assert len(list(objects.list("segments/"))) == final.live_segments


class CountingBlockStore:
    """A user-written block store (the plain protocol) that counts reads."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[int, bytes] = {}
        self.reads = 0

    async def list_blocks(self) -> dict[int, bool]:
        return {b: v != b"" for b, v in self.blocks.items()}

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, BlockValue]:
        self.reads += len(blocks)
        return {b: self.blocks.get(b) for b in blocks}

    async def write_blocks(self, blocks: Mapping[int, BlockValue]) -> None:
        for b, v in blocks.items():
            if v is None:
                self.blocks.pop(b, None)
            else:
                self.blocks[b] = v

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_plain_block_store_gets_partial_writes_completed_at_flush() -> None:
    store = CountingBlockStore(BS)
    store.blocks = {b: os.urandom(BS) for b in range(8)}
    model = bytearray(b"".join(store.blocks[b] for b in range(8)) + bytes(8 * BS))
    async with Disk(store, 16 * BS) as disk:
        for b in range(16):
            await disk.write(b * BS + 7, b"partial")
            model[b * BS + 7 : b * BS + 14] = b"partial"
        assert store.reads == 0, "no read on the write path"
        await disk.flush()
        assert store.reads == 16, "each block read once, at the flush"
        assert await disk.read(0, 16 * BS) == model
    assert b"".join(store.blocks.get(b, bytes(BS)) for b in range(16)) == model


def _format2_disk(objects: ObjectStore, name: str, blocks: dict[int, bytes]) -> None:
    """A disk as lanekit's format 2 wrote it: block digests over lineage, index, content
    in the manifest, no piece headers, an LKSEG002 segment and an LKHEAD02 head."""
    lineage = new_lineage()
    pack = f"packs/{uuid.uuid4().hex}"
    body = bytearray()
    entries: dict[int, Location | str | None] = {}
    for b in sorted(blocks):
        stored, compressed, digest = encode_block(lineage, b, blocks[b])
        entries[b] = Location(pack, len(body), len(stored), compressed, digest, lineage)
        body += stored
    objects.put(pack, bytes(body))
    segment = f"segments/{uuid.uuid4().hex}"
    data = encode_segment(entries, BS)
    objects.put(segment, data)
    head = Head(
        disk=name,
        size=32 * BS,
        block_size=BS,
        base_digest=None,
        generation=1,
        epoch=1,
        commit_id=uuid.uuid4().hex,
        committed_at=time.time(),
        segments=[SegmentRef(segment, hashlib.sha256(data).hexdigest())],
        stored_blocks=len(entries),
        stored_bytes=sum(e.length for e in entries.values() if isinstance(e, Location)),
        format=2,
        lineage=lineage.hex(),
    )
    objects.put(head_key(name), head.encode())


async def test_format2_disks_stay_readable_and_are_upgraded(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "store")
    old = {b: os.urandom(BS) if b % 2 else (b"compressible" * BS)[:BS] for b in range(6)}
    _format2_disk(objects, "d", old)
    model = bytearray(32 * BS)
    for b, data in old.items():
        model[b * BS : (b + 1) * BS] = data
    assert disk_info(objects, "d")["format"] == 2
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, 32 * BS) == model
    async with open_disk((objects, "d")) as disk:
        for i in range(6):
            await disk.write(i * BS + 5, b"new")
            model[i * BS + 5 : i * BS + 8] = b"new"
            await disk.flush()
        await disk.compact()
        assert all(s.paged for s in _store(disk).head.segments)
    assert disk_info(objects, "d")["format"] == 3
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, 32 * BS) == model
    # A damaged format-2 block is still refused.
    pack = next(o.key for o in objects.list("packs/") if o.size > 2 * BS)
    raw = bytearray(objects.get(pack).data)
    raw[BS + 100] ^= 1
    objects.put(pack, bytes(raw))
    async with open_disk((objects, "d"), writable=False) as disk:
        with pytest.raises(CorruptBlock, match=pack):
            await disk.read(0, 6 * BS)


def test_merges_keep_every_lookup_and_reuse_untouched_pages() -> None:
    """Runs of random entries (whole blocks, extents, zeros, tombstones) merged in every
    way ``plan`` could: each block looks up the same entries before and after, and pages
    no newer entry falls into are kept as they are."""
    from blockstore.blockmap import BlockMap, Piece, Run, merge
    from blockstore.layout import SegmentRef
    from blockstore.pieces import DATA, EXTENT, TOMB, ZERO
    from blockstore.segments import PackTable, PageRef, build_pages
    from blockstore.store import columns_of

    rng = random.Random(9)
    packs = PackTable()
    pack = packs.add(uuid.uuid4().bytes, new_lineage())

    def run(keys: list[int], stored: bool) -> Run:
        entries: dict[int, list[Piece]] = {}
        for b in keys:
            kind = rng.choice((DATA, DATA, EXTENT, EXTENT, ZERO, TOMB))
            if kind in (DATA, EXTENT):
                piece = Piece(kind, pack, rng.randrange(1 << 20), 100, 0, 0, 0)
                if kind == EXTENT:
                    piece = piece._replace(start=rng.randrange(100), length=rng.randrange(1, 50))
            else:
                piece = Piece(kind, -1, 0, 0, 0, 0, 0)
            entries.setdefault(b, []).append(piece)
        pages = build_pages(columns_of(entries), target=64)
        refs = [
            PageRef(p.first, p.last, len(p), "segments/" + "0" * 32 if stored else None, page=p)
            for p in pages
        ]
        return Run(SegmentRef(f"segments/{uuid.uuid4().hex}", None), refs, 0)

    reused = 0
    for trial in range(30):
        runs = [run(rng.sample(range(5000), 400), stored=True)]
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.4:  # a disjoint range, as sequential writes make
                lo = 5000 + 1000 * trial
                runs.append(run(list(range(lo, lo + 300)), stored=True))
            else:
                runs.append(run(rng.sample(range(5000), rng.choice((3, 50, 500))), stored=True))
        before = BlockMap(runs, packs, 1 << 16)
        keys = range(0, 5000 + 1000 * 31)
        expected = {b: before.lookup(b) for b in keys}
        bottom = rng.random() < 0.5
        refs, _ = merge(runs, lambda ref: None, bottom=bottom, has_base=True)
        after = BlockMap([Run(runs[0].ref, refs, 1)], packs, 1 << 16)
        for b in keys:
            got, want = after.lookup(b), expected[b]
            if bottom:  # at the bottom a tombstone says "as if absent": kept or dropped
                got, want = ([p for p in x if p.kind != TOMB] for x in (got, want))
            assert got == want, (trial, b, got, want)
        firsts = [r.first for r in refs]
        assert firsts == sorted(firsts)
        assert all(a.last < b.first for a, b in itertools.pairwise(refs))
        old = {id(p) for r in runs for p in r.pages}
        reused += sum(id(r) in old for r in refs)
    assert reused > 100, "untouched pages are kept, not rewritten"


def test_summaries_agree_with_lookups() -> None:
    """What a commit learns of the blocks it replaces (held, stored bytes, extents), taken
    in one vectorised pass over the runs, is what each block's own lookup says."""
    from blockstore.blockmap import BlockMap, Piece, Run
    from blockstore.layout import SegmentRef
    from blockstore.pieces import DATA, EXTENT, TOMB, ZERO, ZERO_EXTENT
    from blockstore.segments import PackTable, PageRef, build_pages
    from blockstore.store import _extents, _held, columns_of

    rng = random.Random(11)
    packs = PackTable()
    pack = packs.add(uuid.uuid4().bytes, new_lineage())
    kinds = (DATA, EXTENT, EXTENT, ZERO_EXTENT, ZERO, TOMB)

    def run(keys: list[int]) -> Run:
        entries: dict[int, list[Piece]] = {}
        for b in keys:
            pieces = []
            for i in range(rng.choice((1, 1, 2, 3))):
                kind = rng.choice(kinds if i == 0 else (EXTENT, ZERO_EXTENT))
                stored = rng.randrange(1, 5000) if kind in (DATA, EXTENT) else 0
                start = rng.randrange(100) if kind in (EXTENT, ZERO_EXTENT) else 0
                length = rng.randrange(1, 50) if kind in (EXTENT, ZERO_EXTENT) else 0
                pieces.append(Piece(kind, pack if stored else -1, 0, stored, 0, start, length))
            entries[b] = pieces
        pages = build_pages(columns_of(entries), target=rng.choice((8, 64, 2048)))
        refs = [PageRef(p.first, p.last, len(p), None, page=p) for p in pages]
        return Run(SegmentRef(f"segments/{uuid.uuid4().hex}", None), refs, 0)

    for trial in range(40):
        runs = [run(rng.sample(range(3000), rng.choice((5, 300, 2000)))) for _ in range(4)]
        bmap = BlockMap(runs, packs, 1 << 16)
        keys = np.array(sorted(rng.sample(range(3200), rng.choice((1, 64, 1500)))), np.uint64)
        held, stored, extents = bmap.summarize(keys)
        for i, b in enumerate(keys.tolist()):
            pieces = bmap.lookup(b)
            want_held, want_stored = _held(pieces) if pieces else (0, 0)
            assert (bool(held[i]), int(stored[i])) == (bool(want_held), want_stored), (trial, b)
            assert int(extents[i]) == (_extents(pieces) if pieces else 0), (trial, b)
