"""Reading a committed state: a head (or checkpoint) and its segments, verified, into a
block map. Blocking functions: run them in a worker thread from async code."""

from __future__ import annotations

from .errors import BlockStoreError, CorruptMetadata, DiskNotFound, ObjectNotFound
from .layout import (
    Entry,
    Head,
    SegmentRef,
    block_count,
    checkpoint_key,
    decode_head,
    decode_segment,
    head_key,
    segment_sha256,
)
from .objectstore import ObjectStore


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


SegmentCache = dict[str, tuple[dict[int, Entry | None], str]]
"""Decoded segments by key, with the SHA-256 of their bytes (segments are immutable)."""


def _segment(
    objects: ObjectStore, head: Head, ref: SegmentRef, cache: SegmentCache
) -> tuple[dict[int, Entry | None], str]:
    cached = cache.get(ref.key)
    if cached is None:
        data = objects.get(ref.key).data
        digest = segment_sha256(data)
        if ref.sha256 is None or digest == ref.sha256:
            blocks = block_count(head.size, head.block_size)
            entries = decode_segment(data, ref.key, block_size=head.block_size, blocks=blocks)
            cached = cache[ref.key] = (entries, digest)
    if cached is None or (ref.sha256 is not None and cached[1] != ref.sha256):
        raise CorruptMetadata(ref.key, "segment does not match the checksum its head names")
    return cached


def load_map(
    objects: ObjectStore, head: Head, cache: SegmentCache | None = None
) -> tuple[dict[int, Entry], dict[str, str]]:
    """A head's segments applied in order into one block map (blocking; run in a thread),
    and the SHA-256 of each segment's bytes (what the upgrade of a format-1 head names)."""
    cache = {} if cache is None else cache
    result: dict[int, Entry] = {}
    hashes: dict[str, str] = {}
    for ref in head.segments:
        entries, hashes[ref.key] = _segment(objects, head, ref, cache)
        for block, entry in entries.items():
            if entry is None:
                result.pop(block, None)
            else:
                result[block] = entry
    return result, hashes


def load_current(
    objects: ObjectStore, disk: str, cache: SegmentCache | None = None
) -> tuple[Head, str, dict[int, Entry], dict[str, str]]:
    """The disk's head and its block map. A segment can vanish between reading the head
    and reading it (a compaction then GC): read the head again; a segment missing from the
    current head is corruption."""
    head, etag = read_head(objects, disk)
    for _attempt in range(4):
        try:
            return (head, etag, *load_map(objects, head, cache))
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
        raise DiskNotFound(f"disk {disk!r} has no checkpoint {tag!r}") from None
    if head.disk != disk:
        raise CorruptMetadata(key, f"it is a checkpoint of disk {head.disk!r}")
    return head


def load_checkpoint(objects: ObjectStore, disk: str, tag: str) -> tuple[Head, dict[int, Entry]]:
    head = read_checkpoint(objects, disk, tag)
    try:
        return head, load_map(objects, head)[0]
    except ObjectNotFound as e:
        raise CorruptMetadata(e.key, f"segment of checkpoint {disk}@{tag} is missing") from None
