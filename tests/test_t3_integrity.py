"""Every byte read is verified: damaged metadata or data is a clear error, never wrong data.
Disks of format 1 (older lanekit, metadata not checksummed) stay readable and writable."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from pathlib import Path

import lz4.block
import numpy as np
import pytest
import trio

import blockstore
from blockstore import (
    BaseImage,
    BlockStoreError,
    CorruptBlock,
    CorruptMetadata,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectStore,
    checkpoint_disk,
    create_disk,
    disk_info,
    fork_disk,
    open_disk,
)
from blockstore.layout import (
    MAX_DISK_SIZE,
    Head,
    Location,
    SegmentRef,
    checkpoint_key,
    checksum,
    decode_head,
    encode_head_v1,
    encode_segment_v1,
    head_key,
)
from blockstore.manifest import load_all_pages, load_runs, read_checkpoint, read_head
from blockstore.pieces import V1_BLAKE2B, V1_SHA256
from blockstore.segments import NO_PACK

BS = 4096
BLOCKS = 16
PATTERNS = (0x01, 0x10, 0x80, 0xFF)


async def _read(objects: ObjectStore, target: str, base: Path, digest: str) -> bytes:
    async with open_disk((objects, target), writable=False, base=BaseImage(base, digest)) as d:
        assert d.size == BLOCKS * BS, f"the disk's size changed to {d.size}"
        return await d.read(0, d.size)


async def _small_disk(
    tmp_path: Path,
) -> tuple[MemoryObjectStore, Path, str, dict[str, tuple[bytes, set[str]]]]:
    """A disk over a base image with every kind of entry: data (raw and compressed), zeros
    over the base, a tombstone, an overwrite; three segments, a checkpoint, a fork."""
    rng = random.Random(5)
    base = tmp_path / "base.img"
    base.write_bytes(rng.randbytes(8 * BS))
    objects = MemoryObjectStore()
    await blockstore.create((objects, "d"), BLOCKS * BS, block_size=BS, base=base)
    digest = BaseImage(base).digest
    async with open_disk((objects, "d"), base=BaseImage(base, digest)) as disk:
        await disk.write(0, rng.randbytes(4 * BS))
        await disk.write(4 * BS, b"compressible" * (BS // 12) + b"!!!!")
        await disk.write(12 * BS, rng.randbytes(BS))
        await disk.flush()
        await disk.write(BS, rng.randbytes(BS))
        await disk.write_zeroes(5 * BS, BS)  # over the base: a zero entry
        await disk.trim(12 * BS, BS)  # beyond the base: a tombstone
        await disk.checkpoint("cp")
        await disk.write(6 * BS, rng.randbytes(BS // 2))
    fork_disk(objects, "d", "cp", "f")
    async with open_disk((objects, "f"), base=BaseImage(base, digest)) as fork:
        await fork.write(7 * BS, rng.randbytes(BS))
    expected = {
        t: (await _read(objects, t, base, digest), _reads(objects, t)) for t in ("d", "d@cp", "f")
    }
    return objects, base, digest, expected


def _reads(objects: ObjectStore, target: str) -> set[str]:
    """The objects reading ``target`` touches: its head, segments and packs."""
    name, _, tag = target.partition("@")
    if tag:
        head, key = read_checkpoint(objects, name, tag), checkpoint_key(name, tag)
    else:
        head, key = read_head(objects, name)[0], head_key(name)
    block_map = load_runs(objects, head)
    load_all_pages(objects, head, block_map)
    pages = [p for run in block_map.runs for p in run.pages]
    packs = set()
    for page in pages:
        assert page.page is not None
        packs |= {block_map.packs.key(i) for i in set(page.page.packs.tolist()) - {NO_PACK}}
    objects_of_pages = {p.obj for p in pages if p.obj is not None}
    return {key, *(s.key for s in head.segments), *objects_of_pages, *packs}


async def _outcome(
    objects: ObjectStore,
    key: str,
    base: Path,
    digest: str,
    expected: dict[str, tuple[bytes, set[str]]],
) -> str:
    """'error' or 'right' for every disk, checkpoint or fork that reads the damaged object;
    any wrong data fails the test."""
    outcomes = set()
    for target, (data, reads) in expected.items():
        if key not in reads:
            continue
        try:
            got = await _read(objects, target, base, digest)
        except BlockStoreError as e:
            assert "\n" not in str(e) and key in str(e), f"unclear error for {key}: {e}"
            outcomes.add("error")
            continue
        assert got == data, f"{target}: wrong data after damaging {key}"
        outcomes.add("right")
    assert outcomes, f"nothing reads {key}"
    return "error" if "error" in outcomes else "right"


@pytest.mark.slow
async def test_byte_flips_in_metadata_and_packs_give_an_error_or_the_right_data(
    tmp_path: Path,
) -> None:
    objects, base, digest, expected = await _small_disk(tmp_path)
    metadata = [
        o.key
        for o in objects.list("")
        if o.key.startswith("segments/") or o.key.endswith("/head") or "/checkpoints/" in o.key
    ]
    assert len([k for k in metadata if k.startswith("segments/")]) >= 3
    counts = {"error": 0, "right": 0}
    for key in metadata:
        original = objects.get(key).data
        for pos in range(len(original)):
            for pattern in PATTERNS:
                damaged = bytearray(original)
                damaged[pos] ^= pattern
                objects.put(key, bytes(damaged))
                counts[await _outcome(objects, key, base, digest, expected)] += 1
        for length in (0, 1, 8, 39, 40, len(original) // 2, len(original) - 1):
            objects.put(key, original[:length])
            counts[await _outcome(objects, key, base, digest, expected)] += 1
        objects.put(key, original + b"\0")
        counts[await _outcome(objects, key, base, digest, expected)] += 1
        objects.put(key, original)
    packs = [o.key for o in objects.list("packs/")]
    rng = random.Random(1)
    for _ in range(300):
        key = rng.choice(packs)
        original = objects.get(key).data
        damaged = bytearray(original)
        damaged[rng.randrange(len(original))] ^= rng.choice(PATTERNS)
        objects.put(key, bytes(damaged))
        counts[await _outcome(objects, key, base, digest, expected)] += 1
        objects.put(key, original)
    assert counts["error"] > 5000, counts
    for target, (data, _) in expected.items():
        assert await _read(objects, target, base, digest) == data


async def test_a_failed_open_closes_the_base_image_it_was_given(tmp_path: Path) -> None:
    """open_disk owns a BaseImage passed in: a disk that cannot be opened (its head
    damaged) must not leak the image's descriptor (the byte-flip test above opened
    17,000 of them and left a pytest worker holding that many)."""
    objects, base, digest, _ = await _small_disk(tmp_path)
    original = objects.get(head_key("d")).data
    objects.put(head_key("d"), original[:-1])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        image = BaseImage(base, digest)
        with pytest.raises(BlockStoreError):
            await _read(objects, "d", base, digest)
        with pytest.raises(BlockStoreError):
            async with open_disk((objects, "d"), writable=False, base=image):
                pass
        assert image._fd == -1
    assert len(os.listdir("/proc/self/fd")) <= before


def _sealed(body: dict[str, object]) -> bytes:
    """A head with a valid checksum around whatever body: only validation can catch it."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return b"LKHEAD03 " + hashlib.sha256(raw).hexdigest().encode() + b"\n" + raw


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"size": 0}, "disk size"),
        ({"size": 1000}, "disk size"),
        ({"size": MAX_DISK_SIZE + 512}, "disk size"),
        ({"size": 4096.0}, "not an integer"),
        ({"size": float("inf")}, "not a number"),
        ({"size": True}, "not an integer"),
        ({"block_size": 3000}, "block size"),
        ({"block_size": 1 << 30}, "block size"),
        ({"generation": -1}, "generation"),
        ({"epoch": 2.5}, "not an integer"),
        ({"segments": []}, "no segments"),
        ({"stored_blocks": 10**6}, "stored blocks"),
        ({"stored_bytes": 10**9}, "stored bytes"),
        ({"committed_at": "yesterday"}, "not a time"),
        ({"lineage": "x"}, "lineage"),
        ({"disk": "other"}, "head of disk"),
        ({"segments": [{"key": "../../etc/passwd", "sha256": "0" * 64}]}, "segment key"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_heads_are_validated_not_just_checksummed(
    change: dict[str, object], reason: str
) -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, os.urandom(BS))
    data = objects.get(head_key("d")).data
    body = json.loads(data.partition(b"\n")[2])
    body.update(change)
    objects.put(head_key("d"), _sealed(body))
    with pytest.raises(CorruptMetadata, match=reason):
        async with open_disk((objects, "d"), writable=False):
            pass
    # Not-a-number is refused in JSON of either format.
    v1 = json.dumps(dict(body, format=1, segments=[], committed_at=float("nan")))
    with pytest.raises(CorruptMetadata, match="not a number"):
        decode_head(v1.encode(), "h")


# ---------------------------------------------------------------- format 1


def _format1_disk(objects: ObjectStore, name: str, blocks: dict[int, bytes]) -> None:
    """A disk as lanekit before format 2 wrote it: a JSON head, LKSEG001 segments and
    digests of content only (SHA-256, BLAKE2b for the odd blocks, as the oldest wrote)."""
    pack = f"packs/{uuid.uuid4().hex}"
    body = bytearray()
    entries: dict[int, Location | str | None] = {}
    for b in sorted(blocks):
        data = blocks[b]
        packed = lz4.block.compress(data, store_size=False)
        compressed = len(packed) < len(data) - len(data) // 32
        stored = packed if compressed else data
        sha256 = b % 2 == 0
        entries[b] = Location(
            pack, len(body), len(stored), compressed, checksum(data, sha256), None, sha256
        )
        body += stored
    objects.put(pack, bytes(body))
    keys = [f"segments/{uuid.uuid4().hex}" for _ in range(2)]
    half = sorted(entries)[: len(entries) // 2]
    objects.put(keys[0], encode_segment_v1({b: entries[b] for b in half}))
    objects.put(keys[1], encode_segment_v1({b: e for b, e in entries.items() if b not in half}))
    head = Head(
        disk=name,
        size=64 * BS,
        block_size=BS,
        base_digest=None,
        generation=2,
        epoch=1,
        commit_id=uuid.uuid4().hex,
        committed_at=time.time(),
        segments=[SegmentRef(k, None) for k in keys],
        stored_blocks=len(entries),
        stored_bytes=sum(e.length for e in entries.values() if isinstance(e, Location)),
        format=1,
    )
    objects.put(head_key(name), encode_head_v1(head))


async def _contents(objects: ObjectStore, target: str, length: int) -> bytes:
    async with open_disk((objects, target), writable=False) as disk:
        return await disk.read(0, length)


async def test_format1_disks_stay_readable_and_are_upgraded_at_their_first_commit(
    tmp_path: Path,
) -> None:
    objects = LocalObjectStore(tmp_path / "store")
    old = {b: os.urandom(BS) if b % 3 else b"old-lanekit" * 372 + b"1234" for b in range(12)}
    _format1_disk(objects, "d", old)
    model = bytearray(64 * BS)
    for b, data in old.items():
        model[b * BS : (b + 1) * BS] = data
    assert await _contents(objects, "d", len(model)) == model
    info = disk_info(objects, "d")
    assert info["format"] == 1 and info["integrity"].startswith("metadata not checksummed")
    checkpoint_disk(objects, "d", "old")
    fork_disk(objects, "d", "old", "old-fork")
    assert disk_info(objects, "old-fork")["format"] == 1
    old_segments = {o.key for o in objects.list("segments/")}

    # The first commit (the fencing commit of a writable open) upgrades it.
    async with open_disk((objects, "d")) as disk:
        assert disk_info(objects, "d")["format"] == 3
        await disk.write(20 * BS, b"new" * BS)
        model[20 * BS : 23 * BS] = b"new" * BS
    info = disk_info(objects, "d")
    assert info["format"] == 3 and info["integrity"].startswith("checksummed")
    assert "older format" in info["integrity"]
    head = objects.get(head_key("d")).data
    assert head.startswith(b"LKHEAD03 ")
    for segment in old_segments:
        assert segment.encode() in head, "the old segments are named with their checksums"
    assert await _contents(objects, "d", len(model)) == model
    assert await _contents(objects, "d@old", len(model)) == model[: 12 * BS] + bytes(52 * BS)
    assert objects.get("disks/d/checkpoints/old").data.startswith(b"{"), "stays format 1"

    # From then on its old segments are checked too: damage to one is an error.
    victim = sorted(old_segments)[0]
    original = objects.get(victim).data
    objects.put(victim, original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CorruptMetadata, match=victim):
        await _contents(objects, "d", len(model))
    objects.put(victim, original)

    # Compactions rewrite the old segments; the old blocks keep their content digests.
    async with open_disk((objects, "d")) as disk:
        for i in range(20):
            await disk.write((30 + i) * BS, bytes([i + 1]) * BS)
            model[(30 + i) * BS : (31 + i) * BS] = bytes([i + 1]) * BS
            await disk.flush()
        await disk.compact()
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        assert not {s.key for s in store.head.segments} & old_segments
        assert all(s.paged for s in store.head.segments)
        await store.load_map()
        flags = {
            int(f) >> 27
            for run in store._map.runs
            for page in run.pages
            if page.page is not None
            for f in page.page.meta.tolist()
        }
        assert {flag & (V1_SHA256 | V1_BLAKE2B) for flag in flags} >= {V1_SHA256, V1_BLAKE2B}
    assert await _contents(objects, "d", len(model)) == model

    # The format-1 fork is upgraded by its own first commit, under a lineage of its own.
    async with open_disk((objects, "old-fork")) as fork:
        await fork.write(0, b"f" * BS)
    assert disk_info(objects, "old-fork")["format"] == 3
    assert (await _contents(objects, "old-fork", 2 * BS))[:BS] == b"f" * BS


async def test_format1_block_with_a_wrong_digest_is_refused(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "store")
    blocks = {b: os.urandom(BS) for b in range(4)}
    _format1_disk(objects, "d", blocks)
    pack = next(o.key for o in objects.list("packs/"))
    raw = bytearray(objects.get(pack).data)
    raw[BS + 7] ^= 0x20  # inside block 1 (a BLAKE2b one)
    objects.put(pack, bytes(raw))
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(0, BS) == blocks[0]
        with pytest.raises(CorruptBlock, match="checksum"):
            await disk.read(BS, BS)


async def test_a_piece_served_at_the_wrong_address_is_an_error() -> None:
    """Piece digests bind content to its address: the block's index, the range of the block
    an extent covers and the lineage of the disk that wrote it. Manifest entries moved to
    another block, relabelled or shifted (with every checksum of the metadata recomputed,
    as a bug could) are refused."""
    from blockstore.layout import new_lineage
    from blockstore.segments import Columns, build_pages, encode_segment, new_refs, page_columns

    objects = MemoryObjectStore()
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d"), compact=False) as disk:
        await disk.write(0, os.urandom(2 * BS))
        await disk.write(3 * BS + 100, os.urandom(300))
    head, _ = read_head(objects, "d")
    block_map = load_runs(objects, head)
    load_all_pages(objects, head, block_map)
    (run,) = block_map.runs
    assert run.pages[0].page is not None
    cols = page_columns(run.pages[0].page)
    keys, packs, ext = cols.keys.copy(), cols.packs.copy(), cols.ext.copy()
    # Block 1's data moved to block 2; block 0 claimed by another disk's lineage; the
    # extent of block 3 moved from byte 100 to byte 200 of its block.
    keys[keys == 1] = 2
    row0 = int(np.flatnonzero(keys == 0)[0])
    packs[row0] = block_map.packs.add(block_map.packs.uuids[int(packs[row0])], new_lineage())
    row3 = int(np.flatnonzero(keys == 3)[0])
    ext[row3] = (200 << 32) | (int(ext[row3]) & 0xFFFFFFFF)
    moved = Columns(keys, packs, cols.offsets, cols.meta, ext)
    encoded = encode_segment(run.ref.key, new_refs(build_pages(moved)), block_map.packs)
    objects.put(run.ref.key, encoded.body)
    data = objects.get(head_key("d")).data
    body = json.loads(data.partition(b"\n")[2])
    body["segments"][0] = run.ref._replace(
        sha256=encoded.index_sha256,
        index_offset=encoded.index_offset,
        index_length=encoded.index_length,
    ).as_json()
    objects.put(head_key("d"), _sealed(body))
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(BS, BS) == bytes(BS)
        for block in (0, 2, 3):
            with pytest.raises(CorruptBlock, match="another block"):
                await disk.read(block * BS, BS)


async def test_gc_refuses_to_sweep_when_a_segment_is_damaged() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, os.urandom(BS))
    segment = next(o.key for o in objects.list("segments/"))
    objects.put(segment, objects.get(segment).data + b"x")
    with pytest.raises(CorruptMetadata, match=segment):
        await trio.to_thread.run_sync(lambda: blockstore.collect_garbage(objects, grace=0))
    assert list(objects.list("packs/")), "nothing was deleted"
