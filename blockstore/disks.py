"""Disk administration on an object store: create, checkpoint, fork, info, GC.

These functions block (they call the object store directly); run them in a worker thread
from async code. Every write here is a create-once put made idempotent by reading back
(:func:`put_new`): a put that landed and lost its reply is recognised as this call's.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import BlockStoreError, CorruptMetadata, DiskExists, ObjectNotFound
from .layout import (
    DISKS,
    GC_GRACE,
    PACKS,
    SEGMENTS,
    Head,
    SegmentRef,
    check_name,
    checkpoint_prefix,
    decode_head,
    geometry_problem,
    head_key,
    new_lineage,
    segment_packs,
)
from .lease import lease_is_live, read_lease
from .manifest import paged_segment_objects, read_checkpoint, read_head, save_checkpoint
from .objectstore import ObjectStore, put_new

DEFAULT_BLOCK_SIZE = 64 << 10


def check_geometry(size: int, block_size: int) -> None:
    problem = geometry_problem(size, block_size)
    if problem:
        raise BlockStoreError(problem)


def create_disk(
    objects: ObjectStore,
    name: str,
    size: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    base_digest: str | None = None,
) -> Head:
    check_name(name)
    check_geometry(size, block_size)
    head = Head(
        disk=name,
        size=size,
        block_size=block_size,
        base_digest=base_digest,
        commit_id=uuid.uuid4().hex,
        committed_at=time.time(),
        lineage=new_lineage().hex(),
    )
    if not put_new(objects, head_key(name), head.encode()):
        raise DiskExists(f"a disk named {name!r} already exists in {objects.describe()}")
    return head


def checkpoint_disk(objects: ObjectStore, disk: str, tag: str) -> Head:
    """Checkpoint the disk's last committed state (a live writer's unflushed data excluded)."""
    head, _ = read_head(objects, disk)
    return save_checkpoint(objects, head, tag)


def fork_disk(objects: ObjectStore, disk: str, tag: str, new_name: str) -> Head:
    """A new disk starting at a checkpoint, sharing its objects (nothing is copied). It
    writes under a lineage of its own; its parent's blocks keep theirs. A fork of a
    format-1 checkpoint is format 1 until its first commit upgrades it."""
    check_name(new_name)
    source = read_checkpoint(objects, disk, tag)
    head = dataclasses.replace(
        source,
        disk=new_name,
        generation=0,
        epoch=0,
        commit_id=uuid.uuid4().hex,
        committed_at=time.time(),
        parent=f"{disk}@{tag}",
        segments=list(source.segments),
        lineage=new_lineage().hex() if source.format >= 2 else "",
    )
    if not put_new(objects, head_key(new_name), head.encode()):
        raise DiskExists(f"a disk named {new_name!r} already exists")
    return head


def delete_disk(objects: ObjectStore, disk: str) -> None:
    """Remove a disk's head, lease and checkpoints (blocking). Packs and segments stay
    until ``disk gc``, which frees whatever no other disk, fork or checkpoint shares."""
    check_name(disk)
    keys = [info.key for info in objects.list(f"{DISKS}{disk}/")]
    head = f"{DISKS}{disk}/head"
    for key in sorted(keys, key=lambda k: k == head):  # the head last: it makes a disk
        objects.delete(key)


def list_disks(objects: ObjectStore) -> list[str]:
    return sorted(
        {o.key[len(DISKS) :].split("/")[0] for o in objects.list(DISKS) if o.key.endswith("/head")}
    )


def list_checkpoints(objects: ObjectStore, disk: str) -> list[str]:
    prefix = checkpoint_prefix(disk)
    return [o.key[len(prefix) :] for o in objects.list(prefix)]


def _integrity(head: Head) -> str:
    if head.format >= 2:
        legacy = sum(1 for s in head.segments if not s.paged)
        note = f" ({legacy} segments of an older format until compaction)" if legacy else ""
        return "checksummed: head, segments, and blocks bound to their disk and index" + note
    return (
        "metadata not checksummed (format 1, written by older lanekit; "
        "upgraded to format 2 at its first commit)"
    )


def disk_info(objects: ObjectStore, disk: str) -> dict[str, Any]:
    head, _ = read_head(objects, disk)
    holder: dict[str, Any] | None = None
    try:
        lease, _ = read_lease(objects, disk)
    except CorruptMetadata as e:
        holder = {"error": str(e)}
    else:
        if lease is not None and lease_is_live(lease):
            holder = dict(
                lease["holder"], since=lease["since"], expires=lease["renewed"] + lease["ttl"]
            )
    return {
        "disk": disk,
        "store": objects.describe(),
        "format": head.format,
        "integrity": _integrity(head),
        "size": head.size,
        "block_size": head.block_size,
        "base_digest": head.base_digest,
        "generation": head.generation,
        "epoch": head.epoch,
        "committed_at": head.committed_at,
        "parent": head.parent,
        "lease_holder": holder,
        "stored_blocks": head.stored_blocks,
        "stored_bytes": head.stored_bytes,
        "manifest_segments": len(head.segments),
        "checkpoints": list_checkpoints(objects, disk),
    }


@dataclass
class GCReport:
    heads: int = 0
    live_segments: int = 0
    live_packs: int = 0
    deleted: list[str] = field(default_factory=list)
    spared_young: int = 0
    temporary_deleted: int = 0
    """Leftovers of puts killed mid-way (a local store's .tmp files), older than the grace."""


def collect_garbage(
    objects: ObjectStore, *, grace: float = GC_GRACE, dry_run: bool = False
) -> GCReport:
    """Mark from every head and checkpoint in the store, sweep segments and packs.

    Safe with writers running: an object younger than ``grace`` is never deleted (a writer's
    uploads become referenced only at its commit, and a writer refuses to commit uploads
    older than grace/2), and a GC pass slower than grace/2 aborts before deleting anything.
    A head or segment that cannot be read or verified aborts it too: what it references is
    unknown. Temporary files of puts that never finished are removed once older than grace.
    """
    if not grace >= 0:  # NaN too: every comparison with it is false, so all looked old
        raise BlockStoreError(f"a GC grace of {grace} seconds: give 0 or more")
    started = time.time()
    report = GCReport()
    live_segments: dict[str, str | None] = {}
    paged: dict[str, tuple[Head, SegmentRef]] = {}
    for info in objects.list(DISKS):
        if not (info.key.endswith("/head") or "/checkpoints/" in info.key):
            continue
        try:
            head = decode_head(objects.get(info.key).data, info.key)
        except ObjectNotFound:
            continue
        report.heads += 1
        for ref in head.segments:
            if ref.paged:
                paged.setdefault(ref.key, (head, ref))
            elif live_segments.get(ref.key) is None:
                live_segments[ref.key] = ref.sha256
    live_packs: set[str] = set()
    for seg, sha256 in live_segments.items():
        live_packs |= segment_packs(objects.get(seg).data, seg, sha256)
    seen_pages: set[tuple[str, int]] = set()
    for head, ref in paged.values():
        live_segments[ref.key] = ref.sha256
        for obj, packs in paged_segment_objects(objects, head, ref, seen_pages):
            live_segments.setdefault(obj, None)
            live_packs |= packs
    report.live_segments, report.live_packs = len(live_segments), len(live_packs)
    if grace > 0 and time.time() - started > grace / 2:
        raise BlockStoreError("garbage collection took longer than grace/2; nothing deleted")
    cutoff = started - grace
    for prefix, live in ((SEGMENTS, live_segments), (PACKS, live_packs)):
        for info in objects.list(prefix):
            if info.key in live:
                continue
            if info.last_modified > cutoff:
                report.spared_young += 1
                continue
            report.deleted.append(info.key)
    if not dry_run:
        for key in report.deleted:
            objects.delete(key)
    report.temporary_deleted = objects.collect_temporary(cutoff, dry_run=dry_run)
    return report
