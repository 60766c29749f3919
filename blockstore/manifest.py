"""Reading a committed state: a head (or checkpoint) and the runs of its map, verified.
Blocking functions: run them in a worker thread from async code.

Opening reads the head and one index per format-3 segment (the whole object when it is
small, as commit segments are); pages come later, on first use (``load_page``). Format-1
and 2 segments are read whole, as they have no index.
"""

from __future__ import annotations

import hashlib

from .blockmap import BlockMap, Run
from .errors import BlockStoreError, CorruptMetadata, DiskExists, DiskNotFound, ObjectNotFound
from .layout import (
    Head,
    SegmentRef,
    block_count,
    checkpoint_key,
    decode_head,
    decode_segment,
    head_key,
    segment_sha256,
)
from .objectstore import ObjectStore, put_new
from .segments import (
    NO_PACK,
    PackTable,
    PageRef,
    build_pages,
    decode_index,
    decode_page,
    legacy_columns,
    new_refs,
)

WHOLE_OBJECT = 256 << 10
"""Segments up to this size are read whole at open (one request for the index and pages)."""


def read_head(objects: ObjectStore, disk: str) -> tuple[Head, str]:
    key = head_key(disk)
    try:
        obj = objects.get(key)
    except ObjectNotFound:
        raise DiskNotFound(f"no disk named {disk!r} in {objects.describe()}") from None
    head = decode_head(obj.data, key)
    if head.disk != disk:
        raise CorruptMetadata(key, f"it is the head of disk {head.disk!r}")
    return head, obj.etag


def _page(data: bytes | memoryview, ref: PageRef, packs: PackTable, head: Head, where: str) -> None:
    if len(data) != ref.length or hashlib.sha256(data).digest() != ref.sha256:
        raise CorruptMetadata(where, f"manifest page at {ref.offset} does not match its checksum")
    page = decode_page(
        bytes(data),
        where,
        packs,
        block_size=head.block_size,
        blocks=block_count(head.size, head.block_size),
    )
    if page.first != ref.first or page.last != ref.last or len(page) != ref.count:
        raise CorruptMetadata(where, f"manifest page at {ref.offset} is not what its index says")
    ref.page = page


def load_page(objects: ObjectStore, ref: PageRef, packs: PackTable, head: Head) -> None:
    """Fetch and verify a page (blocking); a page of a segment that is gone is corruption
    here: the caller's head names it."""
    assert ref.obj is not None
    try:
        data = objects.get_range(ref.obj, ref.offset, ref.length)
    except ObjectNotFound:
        raise CorruptMetadata(ref.obj, "manifest segment is missing") from None
    _page(data, ref, packs, head, ref.obj)


def _paged_run(objects: ObjectStore, head: Head, ref: SegmentRef, packs: PackTable) -> Run:
    end = ref.index_offset + ref.index_length
    whole: bytes | None = None
    if end <= WHOLE_OBJECT:
        whole = objects.get(ref.key).data
        if len(whole) != end:
            raise CorruptMetadata(ref.key, f"segment of {len(whole)} bytes, its head says {end}")
        index = whole[ref.index_offset : end]
    else:
        index = objects.get_range(ref.key, ref.index_offset, ref.index_length)
    if hashlib.sha256(index).hexdigest() != ref.sha256:
        raise CorruptMetadata(ref.key, "segment index does not match the checksum its head names")
    pages = decode_index(index, ref.key, block_count(head.size, head.block_size))
    if sum(p.count for p in pages) != ref.entries:
        raise CorruptMetadata(ref.key, "segment index does not hold the entries its head says")
    if whole is not None:
        for page in pages:
            if page.obj == ref.key:
                _page(
                    memoryview(whole)[page.offset : page.offset + page.length],
                    page,
                    packs,
                    head,
                    ref.key,
                )
    return Run(ref, pages, ref.level)


def _legacy_run(objects: ObjectStore, head: Head, ref: SegmentRef, packs: PackTable) -> Run:
    data = objects.get(ref.key).data
    digest = segment_sha256(data)
    if ref.sha256 is not None and digest != ref.sha256:
        raise CorruptMetadata(ref.key, "segment does not match the checksum its head names")
    blocks = block_count(head.size, head.block_size)
    entries = decode_segment(data, ref.key, block_size=head.block_size, blocks=blocks)
    refs = new_refs(build_pages(legacy_columns(entries, packs))) if entries else []
    return Run(SegmentRef(ref.key, digest), refs, 0)


def load_runs(objects: ObjectStore, head: Head, packs: PackTable | None = None) -> BlockMap:
    """The head's map (blocking; run in a thread): indexes read, pages left for later."""
    packs = packs or PackTable()
    runs = [
        (_paged_run if ref.paged else _legacy_run)(objects, head, ref, packs)
        for ref in head.segments
    ]
    return BlockMap(runs, packs, head.block_size)


def load_current(objects: ObjectStore, disk: str) -> tuple[Head, str, BlockMap]:
    """The disk's head and its map. A segment can vanish between reading the head and
    reading it (a compaction then GC): read the head again; a segment missing from the
    current head is corruption."""
    head, etag = read_head(objects, disk)
    for _attempt in range(4):
        try:
            return head, etag, load_runs(objects, head)
        except ObjectNotFound as e:
            again, etag = read_head(objects, disk)
            if again.commit_id == head.commit_id:
                raise CorruptMetadata(e.key, f"segment of {head_key(disk)} is missing") from None
            head = again
    raise BlockStoreError(f"disk {disk!r}: its manifest kept changing while being read")


def read_checkpoint(objects: ObjectStore, disk: str, tag: str) -> Head:
    key = checkpoint_key(disk, tag)
    try:
        head = decode_head(objects.get(key).data, key)
    except ObjectNotFound:
        read_head(objects, disk)  # no disk at all: say that
        raise DiskNotFound(f"disk {disk!r} has no checkpoint {tag!r}") from None
    if head.disk != disk:
        raise CorruptMetadata(key, f"it is a checkpoint of disk {head.disk!r}")
    return head


def load_checkpoint(objects: ObjectStore, disk: str, tag: str) -> tuple[Head, BlockMap]:
    head = read_checkpoint(objects, disk, tag)
    try:
        return head, load_runs(objects, head)
    except ObjectNotFound as e:
        raise CorruptMetadata(e.key, f"segment of checkpoint {disk}@{tag} is missing") from None


def paged_segment_objects(
    objects: ObjectStore, head: Head, ref: SegmentRef, seen: set[tuple[str, int]]
) -> list[tuple[str, set[str]]]:
    """For GC (blocking): each page of a format-3 segment, verified, as the object holding
    it and the packs it names; pages in ``seen`` are skipped (runs share pages)."""
    packs = PackTable()
    run = _paged_run(objects, head, ref, packs)
    out: list[tuple[str, set[str]]] = []
    for page in run.pages:
        assert page.obj is not None
        if (page.obj, page.offset) in seen:
            continue
        seen.add((page.obj, page.offset))
        if page.page is None:
            load_page(objects, page, packs, head)
        assert page.page is not None
        used = {int(i) for i in set(page.page.packs.tolist())} - {NO_PACK}
        out.append((page.obj, {packs.key(i) for i in used}))
        page.page = None
    return out


def load_all_pages(objects: ObjectStore, head: Head, block_map: BlockMap) -> None:
    """Every page of the map (blocking): what a full scan or GC needs."""
    for run in block_map.runs:
        for ref in run.pages:
            if ref.page is None:
                load_page(objects, ref, block_map.packs, head)


def save_checkpoint(objects: ObjectStore, head: Head, tag: str) -> Head:
    """Freeze a committed head under a tag; a tag never names two states (saving the same
    committed state again under its tag is a no-op)."""
    if not put_new(objects, checkpoint_key(head.disk, tag), head.encode()):
        raise DiskExists(f"disk {head.disk!r} already has a checkpoint {tag!r}")
    return head
