"""Volumes: named block-store disks holding an ext4 filesystem, attached to sandboxes.

A volume lives in an object store next to the lanes that use it::

    volumes/<name>/definition    JSON: size, labels, filesystem, created (written last)
    disks/volume.<name>/...      the block-store disk (lease, head, checkpoints)

It is attached as one more virtio-blk device served by its own NBD server, and the guest
init mounts it at its guest path (``lanekit.volume=SERIAL:PATH:ro|rw`` on the kernel
command line; the device is found by its serial, not by its order). A writable
attachment takes the disk's lease, so one sandbox at a time writes it, on any host;
read-only attachments take none and see the volume as it was when their boot began.
The quota is the size: the filesystem cannot grow past it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import Disk, LeaseHeld, ObjectStore
from blockstore.concurrency import Services
from blockstore.disks import delete_disk
from blockstore.layout import check_name
from blockstore.lease import lease_is_live, read_lease
from blockstore.objectstore import put_new
from blockstore.serve.nbd import serve_device

from . import transfer
from .errors import VMError
from .proc import run_tool

PREFIX = "volumes/"
MIN_SIZE = 16 << 20
MAX_NAME = 100
MKFS = "mkfs.ext4"


class VolumeError(VMError):
    """A volume is missing, exists already, is in use, or cannot be made."""


@dataclasses.dataclass(frozen=True)
class VolumeAttachment:
    """A volume at ``guest_path``: ``disk`` is its disk (a URL or ``(store, disk name)``)."""

    guest_path: str
    disk: str | tuple[ObjectStore, str]
    read_only: bool = False
    name: str = ""


@dataclasses.dataclass
class AttachedVolumes:
    qemu_args: list[str]
    cmdline: list[str]
    disks: dict[str, Disk]
    """The writable ones, by guest path (a pause checkpoints them)."""


def disk_name(volume: str) -> str:
    return f"volume.{volume}"


def check_volume_name(name: str) -> str:
    check_name(name, "volume name")
    if len(name) > MAX_NAME:
        raise VolumeError(f"volume name {name!r} is longer than {MAX_NAME} characters")
    return name


def _definition_key(name: str) -> str:
    return f"{PREFIX}{name}/definition"


def read_volume(objects: ObjectStore, name: str) -> dict[str, Any]:
    """The volume's definition (blocking); VolumeError if there is none."""
    check_volume_name(name)
    try:
        data = objects.get(_definition_key(name)).data
    except blockstore.ObjectNotFound:
        raise VolumeError(f"no volume named {name!r} in {objects.describe()}") from None
    try:
        definition = json.loads(data)
        if not isinstance(definition, dict) or definition.get("name") != name:
            raise ValueError("not a volume definition")
    except ValueError as exc:
        raise VolumeError(f"volume {name!r}: its definition is unreadable ({exc})") from None
    return definition


def defined_names(objects: ObjectStore, prefix: str) -> list[str]:
    """Names under ``prefix`` that have a ``NAME/definition`` object (volumes, lanes)."""
    names = set()
    for info in objects.list(prefix):
        name, _, rest = info.key[len(prefix) :].partition("/")
        if rest == "definition":
            names.add(name)
    return sorted(names)


def list_volumes(objects: ObjectStore) -> list[str]:
    return defined_names(objects, PREFIX)


def volume_info(objects: ObjectStore, name: str) -> dict[str, Any]:
    """Definition, disk state and who writes it now (blocking)."""
    definition = read_volume(objects, name)
    info = blockstore.disk_info(objects, disk_name(name))
    return {
        **definition,
        "store": objects.describe(),
        "disk": disk_name(name),
        "stored_bytes": info["stored_bytes"],
        "generation": info["generation"],
        "writer": info["lease_holder"],
        "checkpoints": info["checkpoints"],
    }


async def create_volume(
    objects: ObjectStore, name: str, size: int, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Make a volume: a disk of ``size`` bytes holding a fresh ext4 filesystem (made in a
    sparse scratch file here, and only its written parts uploaded). The definition is
    written last, so a volume whose creation was cut short is made again from scratch."""
    check_volume_name(name)
    if size < MIN_SIZE:
        raise VolumeError(f"a volume must be at least {MIN_SIZE >> 20} MiB")
    size = (size + 4095) // 4096 * 4096
    if await trio.to_thread.run_sync(_exists, objects, name):
        raise VolumeError(f"a volume named {name!r} already exists in {objects.describe()}")
    disk = disk_name(name)
    await trio.to_thread.run_sync(delete_disk, objects, disk)  # an earlier, unfinished try
    await blockstore.create((objects, disk), size)
    with tempfile.TemporaryDirectory(prefix="lanekit-volume-") as scratch:
        image = Path(scratch) / "fs.img"
        await trio.to_thread.run_sync(make_filesystem, image, size, name)
        async with blockstore.open_disk((objects, disk)) as opened:
            await transfer.copy_file_into(opened, image)
            await opened.flush()
    definition = {
        "name": name,
        "size": size,
        "labels": dict(labels or {}),
        "filesystem": "ext4",
        "created": time.time(),
    }
    body = json.dumps(definition, sort_keys=True).encode()
    if not await trio.to_thread.run_sync(put_new, objects, _definition_key(name), body):
        raise VolumeError(f"a volume named {name!r} was created meanwhile by someone else")
    return definition


def _exists(objects: ObjectStore, name: str) -> bool:
    try:
        objects.get(_definition_key(name))
        return True
    except blockstore.ObjectNotFound:
        return False


def make_filesystem(image: Path, size: int, label: str) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    run_tool(
        [MKFS, "-F", "-q", "-m", "0", "-L", label[:16], "-E",
         "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(image)],
        f"{MKFS} of the new volume", error=VolumeError,
    )  # fmt: skip


def fork_volume(
    objects: ObjectStore, source: dict[str, Any], tag: str, new_name: str
) -> dict[str, Any]:
    """A new volume ``new_name`` whose disk is a fork of the checkpoint ``tag`` of the volume
    ``source`` (its definition as it was); nothing is copied. Blocking; VolumeError if the
    name is taken. The definition is written last, as at creation."""
    check_volume_name(new_name)
    if _exists(objects, new_name):
        raise VolumeError(f"a volume named {new_name!r} already exists in {objects.describe()}")
    disk = disk_name(new_name)
    try:
        blockstore.fork_disk(objects, disk_name(str(source["name"])), tag, disk)
    except blockstore.DiskExists:
        raise VolumeError(f"a disk named {disk!r} already exists in {objects.describe()}") from None
    definition = {
        **source, "name": new_name, "created": time.time(),
        "forked_from": {"volume": source["name"], "checkpoint": tag},
    }  # fmt: skip
    body = json.dumps(definition, sort_keys=True).encode()
    if not put_new(objects, _definition_key(new_name), body):
        delete_disk(objects, disk)
        raise VolumeError(f"a volume named {new_name!r} was created meanwhile by someone else")
    return definition


def remove_volume(objects: ObjectStore, name: str) -> None:
    """Delete a volume no sandbox writes (its blocks go at the store's next ``disk gc``)."""
    read_volume(objects, name)
    disk = disk_name(name)
    lease, _ = read_lease(objects, disk)
    if lease is not None and lease_is_live(lease):
        holder = lease["holder"]
        raise VolumeError(
            f"volume {name!r} is attached for writing (host {holder.get('host')} pid "
            f"{holder.get('pid')}): stop that sandbox first"
        )
    objects.delete(_definition_key(name))
    delete_disk(objects, disk)


# ---------------------------------------------------------------- attaching


@contextlib.asynccontextmanager
async def attach_volumes(
    attachments: Sequence[VolumeAttachment],
    runtime: Path,
    services: Services,
    options: Any,
) -> AsyncIterator[AttachedVolumes]:
    """Open and serve each volume for one boot; ``options`` are the root disk's
    (:class:`~vm.rootdisk.DiskOptions`: force, lease wait and TTL apply to volumes too)."""
    from .rootdisk import open_with_lease

    paths = [a.guest_path for a in attachments]
    if len(set(paths)) != len(paths):
        raise VolumeError("two volumes at the same guest path")
    attached = AttachedVolumes([], [], {})
    async with contextlib.AsyncExitStack() as stack:
        for i, attachment in enumerate(attachments):
            check_guest_path(attachment.guest_path, "volume path")
            what = attachment.name or f"volume {i}"
            if attachment.read_only:
                disk = await stack.enter_async_context(
                    blockstore.open_disk(attachment.disk, writable=False)
                )
            else:
                try:
                    disk = await stack.enter_async_context(
                        open_with_lease(attachment.disk, options, spill_dir=str(runtime))
                    )
                except LeaseHeld as exc:
                    raise LeaseHeld(
                        f"{what} (attached for writing elsewhere)", exc.holder, exc.since,
                        exc.expires,
                    ) from None  # fmt: skip
                attached.disks[attachment.guest_path] = disk
            node, serial = f"vol{i}", f"lkvol{i}"
            socket_path = runtime / f"{node}.sock"
            await services.start(
                functools.partial(serve_device, disk, f"unix:{socket_path}", name=node)
            )
            access = ",read-only=on" if attachment.read_only else ",discard=unmap"
            attached.qemu_args += [
                "-blockdev",
                f"driver=nbd,node-name={node},server.type=unix,server.path={socket_path},"
                f"export={node}{access}",
                "-device", f"virtio-blk-device,drive={node},serial={serial}",
            ]  # fmt: skip
            mode = "ro" if attachment.read_only else "rw"
            attached.cmdline.append(f"lanekit.volume={serial}:{attachment.guest_path}:{mode}")
        yield attached


_SAFE_GUEST_PATH = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_.-")


def check_guest_path(path: str, what: str = "mount point") -> None:
    """A guest path the init can take from the kernel command line: absolute, normalised,
    not /, plain characters only."""
    if not path.startswith("/") or path == "/" or not set(path) <= _SAFE_GUEST_PATH:
        raise VMError(
            f"{what} {path!r} must be an absolute guest path other than / "
            "made of letters, digits and / _ . -"
        )
    if any(p in ("", ".", "..") for p in path.strip("/").split("/")):
        raise VMError(f"{what} {path!r} must be a normalised path")
