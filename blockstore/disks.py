"""Disk administration on an object store: create, checkpoint, fork, info, GC.

These functions block (they call the object store directly); run them in a worker thread
from async code.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import BlockStoreError, DiskExists, DiskNotFound, ObjectNotFound, PreconditionFailed
from .layout import (
    DISKS,
    PACKS,
    SEGMENTS,
    Head,
    check_name,
    checkpoint_key,
    checkpoint_prefix,
    head_key,
    segment_packs,
)
from .lease import lease_is_live, read_lease
from .objectstore import ObjectStore
from .store import GC_GRACE, read_head

DEFAULT_BLOCK_SIZE = 64 << 10


def check_geometry(size: int, block_size: int) -> None:
    if block_size < 4096 or block_size > (4 << 20) or block_size & (block_size - 1):
        raise BlockStoreError(
            f"block size {block_size} is invalid: use a power of two from 4 KiB to 4 MiB"
        )
    if size <= 0 or size % 512:
        raise BlockStoreError(f"disk size {size} is invalid: use a positive multiple of 512 bytes")


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
    )
    try:
        objects.put(head_key(name), head.encode(), if_none_match=True)
    except PreconditionFailed:
        raise DiskExists(f"a disk named {name!r} already exists in {objects.describe()}") from None
    return head


def read_checkpoint(objects: ObjectStore, disk: str, tag: str) -> Head:
    key = checkpoint_key(disk, tag)
    try:
        return Head.decode(objects.get(key).data, key)
    except ObjectNotFound:
        raise DiskNotFound(f"disk {disk!r} has no checkpoint {tag!r}") from None


def save_checkpoint(objects: ObjectStore, head: Head, tag: str) -> Head:
    """Freeze a committed head under a tag; a tag is never reused."""
    try:
        objects.put(checkpoint_key(head.disk, tag), head.encode(), if_none_match=True)
    except PreconditionFailed:
        raise DiskExists(f"disk {head.disk!r} already has a checkpoint {tag!r}") from None
    return head


def checkpoint_disk(objects: ObjectStore, disk: str, tag: str) -> Head:
    """Checkpoint the disk's last committed state (a live writer's unflushed data excluded)."""
    head, _ = read_head(objects, disk)
    return save_checkpoint(objects, head, tag)


def fork_disk(objects: ObjectStore, disk: str, tag: str, new_name: str) -> Head:
    """A new disk starting at a checkpoint, sharing its objects (nothing is copied)."""
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
    )
    try:
        objects.put(head_key(new_name), head.encode(), if_none_match=True)
    except PreconditionFailed:
        raise DiskExists(f"a disk named {new_name!r} already exists") from None
    return head


def list_disks(objects: ObjectStore) -> list[str]:
    return sorted(
        {o.key[len(DISKS) :].split("/")[0] for o in objects.list(DISKS) if o.key.endswith("/head")}
    )


def list_checkpoints(objects: ObjectStore, disk: str) -> list[str]:
    prefix = checkpoint_prefix(disk)
    return [o.key[len(prefix) :] for o in objects.list(prefix)]


def disk_info(objects: ObjectStore, disk: str) -> dict[str, Any]:
    head, _ = read_head(objects, disk)
    lease, _ = read_lease(objects, disk)
    holder = None
    if lease is not None and lease_is_live(lease):
        holder = dict(
            lease["holder"], since=lease["since"], expires=lease["renewed"] + lease["ttl"]
        )
    return {
        "disk": disk,
        "store": objects.describe(),
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


def collect_garbage(
    objects: ObjectStore, *, grace: float = GC_GRACE, dry_run: bool = False
) -> GCReport:
    """Mark from every head and checkpoint in the store, sweep segments and packs.

    Safe with writers running: an object younger than ``grace`` is never deleted (a writer's
    uploads become referenced only at its commit, and a writer refuses to commit uploads
    older than grace/2), and a GC pass slower than grace/2 aborts before deleting anything.
    """
    started = time.time()
    report = GCReport()
    live_segments: set[str] = set()
    for info in objects.list(DISKS):
        if not (info.key.endswith("/head") or "/checkpoints/" in info.key):
            continue
        try:
            head = Head.decode(objects.get(info.key).data, info.key)
        except ObjectNotFound:
            continue
        report.heads += 1
        live_segments.update(head.segments)
    live_packs: set[str] = set()
    for seg in live_segments:
        live_packs |= segment_packs(objects.get(seg).data, seg)
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
    return report
