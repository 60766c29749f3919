"""Which root disk a boot gets, and over which base image.

- No disk URL: an ephemeral copy-on-write disk in the boot's runtime directory.
- A new disk URL: created on the registry image (built first if this host lacks it), and
  the image goes to the disk's store too, so any host that reaches the store can boot it.
- An existing disk: its base is the image *digest* it records, found on this host or read
  lazily from the disk's own store; the image id given is used for its healthcheck only.
- ``URL@TAG``: the checkpoint, read-only, under a scratch disk in the runtime directory:
  the guest can write, and everything it writes is discarded at stop. A checkpoint is
  never written.
- ``(object_store, name)``, or an object store alone (its disk ``root``): as a URL would,
  on any :class:`~blockstore.ObjectStore`, your own included.
- A :class:`~blockstore.BlockStore`: the caller's own storage for the written blocks, over
  the registry image. It records no base and takes no lease: the caller keeps it to one
  sandbox at a time and to one image (what it holds is read over that image's blocks).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeAlias

import trio

import blockstore
from blockstore import BaseImage, BlockStore, Disk, DiskBase, LeaseHeld, ObjectStore
from blockstore.layered import scratch_digest
from blockstore.lease import DEFAULT_TTL
from blockstore.manifest import read_checkpoint

from . import transfer
from .errors import ImageNotFoundError, VMError
from .images import ImageStore

Notice = Callable[[str], None]
RootDisk: TypeAlias = str | tuple[ObjectStore, str] | ObjectStore | BlockStore | None
"""What a sandbox's root disk can be (see the module docstring)."""
DEFAULT_DISK_NAME = "root"


class DiskOptions:
    """How a boot opens its root disk (from :class:`~vm.launcher.Sandbox`)."""

    def __init__(
        self,
        url: Any,
        size: int | None,
        s3_endpoint: str | None,
        force: bool,
        lease_wait: float | None,
        notice: Notice,
        lease_ttl: float | None = None,
    ) -> None:
        self.url = url
        self.size = size
        self.s3_endpoint = s3_endpoint
        self.force = force
        self.lease_wait = lease_wait
        self.notice = notice
        self.lease_ttl = lease_ttl or DEFAULT_TTL


@contextlib.asynccontextmanager
async def image_base(
    images: ImageStore, objects: ObjectStore | None, digest: str | None, notice: Notice
) -> AsyncIterator[BaseImage | None]:
    """The base image with ``digest``: this host's copy, or the store's, read lazily."""
    if digest is None:
        yield None
        return
    if images.has(digest):
        base = BaseImage(images.path(digest), digest=digest)
        try:
            yield base
        finally:
            base.close()
        return
    if objects is not None and await trio.to_thread.run_sync(transfer.stored, objects, digest):
        notice(f"image sha256:{digest[:12]} is not on this host: reading it from the disk's store")
        async with transfer.open_base(objects, digest) as base:
            yield base
        return
    where = f" or in {objects.describe()}" if objects is not None else ""
    raise ImageNotFoundError(
        f"the disk was made from image sha256:{digest}, which is neither on this host{where}: "
        f"`lanekit image pull sha256:{digest} --store URL` from a store that has it, or "
        f"`lanekit image push sha256:{digest} --store URL` on the host that built it"
    )


@contextlib.asynccontextmanager
async def open_with_lease(target: Any, options: DiskOptions, **kwargs: Any) -> AsyncIterator[Disk]:
    """``open_disk`` writable, waiting up to ``lease_wait`` for another holder's lease."""
    deadline = time.monotonic() + (options.lease_wait or 0)
    told = False
    while True:
        opened = False
        try:
            async with blockstore.open_disk(
                target, force=options.force, lease_ttl=options.lease_ttl, **kwargs
            ) as disk:
                opened = True
                yield disk
            return
        except LeaseHeld as exc:
            if opened or time.monotonic() >= deadline:
                raise
            if not told:
                options.notice(
                    f"the disk is in use by host {exc.holder.get('host')} pid "
                    f"{exc.holder.get('pid')}; waiting up to {options.lease_wait:.0f} s for "
                    "its lease to end"
                )
                told = True
        await trio.sleep(1.0)


@contextlib.asynccontextmanager
async def root_disk(
    options: DiskOptions,
    runtime: Path,
    images: ImageStore,
    local_image: Callable[[], tuple[str, Path]],
) -> AsyncIterator[Disk]:
    """The boot's root disk (see the module docstring); ``local_image()`` gives the
    registry image's (digest, path), building it if needed."""
    spill = str(runtime)
    target = options.url
    if isinstance(target, ObjectStore):
        target = (target, DEFAULT_DISK_NAME)
    if isinstance(target, BlockStore):
        async with _over_block_store(target, options, runtime, local_image) as disk:
            yield disk
        return
    if not (target is None or isinstance(target, str) or _is_store_and_name(target)):
        raise VMError(
            f"disk={target!r}: give a disk URL, (ObjectStore, name), an ObjectStore or a BlockStore"
        )
    if target is None:
        digest, path = await trio.to_thread.run_sync(local_image)
        scratch = (blockstore.LocalObjectStore(runtime / "root-store"), "root")
        base = BaseImage(path, digest=digest)
        try:
            size = max(options.size or 0, base.size)
            await blockstore.create(scratch, size, base=base)
            async with blockstore.open_disk(scratch, base=base, spill_dir=spill) as disk:
                yield disk
        finally:
            base.close()
        return
    objects, name, tag = blockstore.resolve(target, options.s3_endpoint)
    if tag is not None:
        async with _checkpoint_copy(objects, name, tag, runtime, images, options) as disk:
            yield disk
        return
    exists = name in await trio.to_thread.run_sync(blockstore.list_disks, objects)
    if not exists:
        digest, path = await trio.to_thread.run_sync(local_image)
        if not await trio.to_thread.run_sync(transfer.stored, objects, digest):
            options.notice(
                f"copying image sha256:{digest[:12]} to {objects.describe()} (once per store), "
                "so other hosts can boot this disk"
            )
            await transfer.push(images, digest, objects)
        new_base = BaseImage(path, digest=digest)
        try:
            size = max(options.size or 0, new_base.size)
            with contextlib.suppress(blockstore.DiskExists):
                await blockstore.create((objects, name), size, base=new_base)
        finally:
            new_base.close()
    info = await trio.to_thread.run_sync(blockstore.disk_info, objects, name)
    async with (
        image_base(images, objects, info["base_digest"], options.notice) as image,
        open_with_lease((objects, name), options, base=image, spill_dir=spill) as disk,
    ):
        yield disk


@contextlib.asynccontextmanager
async def _checkpoint_copy(
    objects: ObjectStore,
    name: str,
    tag: str,
    runtime: Path,
    images: ImageStore,
    options: DiskOptions,
) -> AsyncIterator[Disk]:
    head = await trio.to_thread.run_sync(read_checkpoint, objects, name, tag)
    if options.force:
        raise VMError("--force takes over a disk's lease; a checkpoint has none")
    options.notice(
        f"booting checkpoint {name}@{tag} as a throwaway copy: what the guest writes is "
        "discarded when it stops (`lanekit disk fork` makes a disk of it to keep)"
    )
    async with image_base(images, objects, head.base_digest, options.notice) as image:
        target = (objects, f"{name}@{tag}")
        async with blockstore.open_disk(target, writable=False, base=image) as checkpoint:
            digest = scratch_digest(f"{objects.describe()}{name}@{tag}:{head.commit_id}")
            base = DiskBase(checkpoint, digest, f"checkpoint {name}@{tag}")
            scratch = (blockstore.LocalObjectStore(runtime / "scratch-store"), "root")
            await trio.to_thread.run_sync(
                lambda: blockstore.create_disk(
                    scratch[0], "root", checkpoint.size, base_digest=digest
                )
            )
            async with blockstore.open_disk(scratch, base=base, spill_dir=str(runtime)) as disk:
                yield disk


def _is_store_and_name(target: object) -> bool:
    return (
        isinstance(target, tuple)
        and len(target) == 2
        and isinstance(target[0], ObjectStore)
        and isinstance(target[1], str)
    )


@contextlib.asynccontextmanager
async def _over_block_store(
    store: BlockStore,
    options: DiskOptions,
    runtime: Path,
    local_image: Callable[[], tuple[str, Path]],
) -> AsyncIterator[Disk]:
    """The caller's block store over the registry image: no lease, no record of the base."""
    if options.force or options.lease_wait:
        raise VMError("--force and --wait concern leases; a BlockStore you pass in has none")
    digest, path = await trio.to_thread.run_sync(local_image)
    base = BaseImage(path, digest=digest)
    try:
        size = max(options.size or 0, base.size)
        disk = Disk(store, size, base=base, spill_dir=str(runtime))
    except BaseException:
        base.close()
        raise
    async with disk:
        yield disk
