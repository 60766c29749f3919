"""Opening disks by URL or object store: the entry point most callers need."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from .concurrency import run_sync
from .disk import BaseImage, Disk
from .disks import DEFAULT_BLOCK_SIZE, create_disk
from .errors import BaseMismatch
from .lease import DEFAULT_TTL
from .objectstore import ObjectStore
from .probe import checked, require_conditional_writes
from .store import ObjectBlockStore
from .url import DiskURL, open_store, parse_disk_url

Target = str | DiskURL | tuple[ObjectStore, str]


def resolve(target: Target, s3_endpoint: str | None = None) -> tuple[ObjectStore, str, str | None]:
    """(object store, disk name, checkpoint tag) for a URL or an (object store, name) pair.
    The store is checked for conditional writes before its first conditional put, unless
    it honours them by construction (a local directory, memory)."""
    if isinstance(target, tuple):
        objects, name = target
        name, _, tag = name.partition("@")
        return checked(objects), name, tag or None
    url = parse_disk_url(target) if isinstance(target, str) else target
    return open_store(url.store_url, s3_endpoint=s3_endpoint), url.name, url.checkpoint


async def create(
    target: Target,
    size: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    base: str | os.PathLike[str] | BaseImage | None = None,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Create a disk; a :class:`BaseImage` passed in (its digest already known, say) stays
    open for the caller, a path is opened, hashed and closed here."""
    objects, name, _ = resolve(target, s3_endpoint)
    await run_sync(require_conditional_writes, objects)
    digest = None
    if base is not None:
        image = base if isinstance(base, BaseImage) else BaseImage(base)
        try:
            digest = await run_sync(lambda: image.digest)
            size = size or image.size
        finally:
            if image is not base:
                image.close()
    head = await run_sync(
        lambda: create_disk(objects, name, size, block_size=block_size, base_digest=digest)
    )
    return {"disk": name, "size": head.size, "block_size": head.block_size, "base_digest": digest}


@contextlib.asynccontextmanager
async def open_disk(
    target: Target,
    *,
    writable: bool = True,
    base: str | os.PathLike[str] | BaseImage | None = None,
    force: bool = False,
    lease_ttl: float = DEFAULT_TTL,
    s3_endpoint: str | None = None,
    pack_size: int = 4 << 20,
    concurrency: int = 8,
    **disk_options: Any,
) -> AsyncIterator[Disk]:
    """Open a disk (``URL@tag`` opens a checkpoint, read-only).

    Writable opens take the lease and fence any older writer; on exit the disk is flushed
    (unless the block raised) and the lease released. A :class:`BaseImage` passed in is
    the disk's from then on: closed with it, or here if the open fails.
    """
    image = base if isinstance(base, BaseImage) else None
    try:
        objects, name, tag = resolve(target, s3_endpoint)
        if tag is not None:
            writable = False
        if writable:
            await run_sync(require_conditional_writes, objects)
        store = await ObjectBlockStore.open(
            objects,
            name,
            writable=writable,
            force=force,
            lease_ttl=lease_ttl,
            checkpoint=tag,
            pack_size=pack_size,
            concurrency=concurrency,
        )
    except BaseException:
        if image is not None:
            image.close()
        raise
    try:
        if base is not None:
            if not isinstance(base, BaseImage):
                image = BaseImage(base)
            await run_sync(lambda: image.digest if image else None)
        elif store.head.base_digest is not None:
            raise BaseMismatch(
                f"disk {name!r} was created on a base image (sha256 "
                f"{store.head.base_digest}): pass that image to open it"
            )
        disk = Disk(
            store,
            store.head.size,
            base=image,
            base_digest=store.head.base_digest,
            read_only=not writable,
            **disk_options,
        )
    except BaseException:
        if image is not None:
            image.close()
        await store.release()
        raise
    async with disk:
        yield disk
