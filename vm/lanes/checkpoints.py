"""A lane's checkpoints and forks.

A checkpoint ``TAG`` of lane ``L`` is a block-store checkpoint of its root disk (tag
``TAG``) and of each of its volumes (tag ``TAG.lane.L``: a volume may serve several lanes),
and a record, written last, of the definition as it was::

    lanes/<L>/checkpoints/<TAG>    JSON: tag, created, running, definition, disks

A fork makes a new lane of a checkpoint: its root disk and its volumes are block-store
forks (nothing is copied; a fork's head references the objects it shares, so the garbage
collector keeps them for it even once the original lane is gone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any

import trio

import blockstore
from blockstore import ObjectStore
from blockstore.disks import delete_disk
from blockstore.layout import check_name, checkpoint_key
from blockstore.objectstore import put_new

from ..machine import Machine
from ..qmp import QMP
from ..volumes import disk_name, fork_volume, read_volume, remove_volume
from .definition import (
    PREFIX,
    LaneDefinition,
    read_definition,
    root_disk_name,
    write_definition,
)
from .errors import LaneError, LaneNotFound, check_lane_name

MAX_TAG = 128


def _record_key(lane: str, tag: str) -> str:
    return f"{PREFIX}{lane}/checkpoints/{tag}"


def volume_tag(lane: str, tag: str) -> str:
    return f"{tag}.lane.{lane}"


def check_tag(lane: str, tag: str) -> str:
    try:
        check_name(tag, "checkpoint tag")
    except blockstore.InvalidURL as exc:
        raise LaneError(str(exc)) from None
    if len(volume_tag(lane, tag)) > MAX_TAG:
        raise LaneError(
            f"checkpoint tag {tag!r} is too long for lane {lane!r} "
            f"(tag and lane name together: at most {MAX_TAG - 6} characters)"
        )
    return tag


def read_checkpoint(objects: ObjectStore, lane: str, tag: str) -> dict[str, Any]:
    check_tag(lane, tag)
    try:
        record = json.loads(objects.get(_record_key(lane, tag)).data)
    except blockstore.ObjectNotFound:
        known = ", ".join(list_checkpoints(objects, lane)) or "none"
        raise LaneError(f"lane {lane!r} has no checkpoint {tag!r} (it has: {known})") from None
    except ValueError as exc:
        raise LaneError(f"lane {lane!r}: checkpoint {tag!r} is unreadable ({exc})") from None
    if not isinstance(record, dict) or "definition" not in record:
        raise LaneError(f"lane {lane!r}: checkpoint {tag!r} is unreadable (fields missing)")
    return record


def list_checkpoints(objects: ObjectStore, lane: str) -> list[str]:
    prefix = f"{PREFIX}{lane}/checkpoints/"
    return sorted(info.key[len(prefix) :] for info in objects.list(prefix))


def summaries(objects: ObjectStore, lane: str) -> list[dict[str, Any]]:
    """What ``lane info`` shows of each checkpoint."""
    found: list[dict[str, Any]] = []
    for tag in list_checkpoints(objects, lane):
        try:
            record = read_checkpoint(objects, lane, tag)
        except LaneError as exc:
            found.append({"tag": tag, "error": str(exc)})
            continue
        found.append({
            "tag": tag, "created": record.get("created"), "running": record.get("running"),
            "volumes": sorted(record.get("volumes", {})),
        })  # fmt: skip
    return found


def _check_free(objects: ObjectStore, definition: LaneDefinition, tag: str) -> None:
    """LaneError if the tag is taken (blocking); a volume must still exist."""
    check_tag(definition.name, tag)
    with contextlib.suppress(blockstore.ObjectNotFound):
        objects.get(_record_key(definition.name, tag))
        raise LaneError(f"lane {definition.name!r} already has a checkpoint {tag!r}")
    for volume in definition.volumes:
        read_volume(objects, volume.name)


def _unsave(objects: ObjectStore, saved: list[tuple[str, str]]) -> None:
    """Take back the disk checkpoints of a lane checkpoint that failed half-way."""
    for disk, tag in saved:
        with contextlib.suppress(blockstore.ObjectNotFound):
            objects.delete(checkpoint_key(disk, tag))


def _record(
    objects: ObjectStore, definition: LaneDefinition, tag: str, running: bool
) -> dict[str, Any]:
    record = {
        "tag": tag, "lane": definition.name, "created": time.time(), "running": running,
        "definition": definition.to_json(),
        "root": {"disk": root_disk_name(definition.name), "tag": tag},
        "volumes": {
            v.name: {"disk": disk_name(v.name), "tag": volume_tag(definition.name, tag),
                     "definition": read_volume(objects, v.name)}
            for v in definition.volumes
        },
    }  # fmt: skip
    if not put_new(objects, _record_key(definition.name, tag), json.dumps(record).encode()):
        raise LaneError(f"lane {definition.name!r} already has a checkpoint {tag!r}")
    return record


def _saving(objects: ObjectStore, disk: str, tag: str, saved: list[tuple[str, str]]) -> None:
    try:
        blockstore.checkpoint_disk(objects, disk, tag)
    except blockstore.DiskExists:
        raise LaneError(f"disk {disk!r} already has a checkpoint {tag!r}") from None
    saved.append((disk, tag))


def take_stopped(objects: ObjectStore, definition: LaneDefinition, tag: str) -> dict[str, Any]:
    """Checkpoint a lane nobody runs: the committed state of its disks (blocking)."""
    _check_free(objects, definition, tag)
    root = root_disk_name(definition.name)
    saved: list[tuple[str, str]] = []
    try:
        try:
            _saving(objects, root, tag, saved)
        except blockstore.DiskNotFound:
            raise LaneError(
                f"lane {definition.name!r} has never started: its root disk does not exist yet, "
                "so there is nothing to checkpoint"
            ) from None
        for volume in definition.volumes:
            _saving(objects, disk_name(volume.name), volume_tag(definition.name, tag), saved)
        return _record(objects, definition, tag, running=False)
    except BaseException:
        _unsave(objects, saved)
        raise


async def take_running(
    machine: Machine, objects: ObjectStore, definition: LaneDefinition, tag: str
) -> dict[str, Any]:
    """Checkpoint a running lane, in its supervisor (which writes its disks): the guest
    syncs (what it wrote reaches its disks), then stands still while every disk is flushed
    and checkpointed, so root disk and volumes show one moment."""
    await trio.to_thread.run_sync(_check_free, objects, definition, tag)
    await machine.sync()
    saved: list[tuple[str, str]] = []
    writable = {v.name: machine.volumes.get(v.path) for v in definition.volumes}
    try:
        qmp = await QMP.connect(machine.runtime / "qmp.sock")
        try:
            await qmp.execute("stop")
            try:
                await machine.disk.checkpoint(tag)
                saved.append((root_disk_name(definition.name), tag))
                for name, disk in writable.items():
                    vtag = volume_tag(definition.name, tag)
                    if disk is not None:
                        await disk.checkpoint(vtag)
                        saved.append((disk_name(name), vtag))
                    else:  # read-only here: its committed state is what the guest sees
                        await trio.to_thread.run_sync(
                            _saving, objects, disk_name(name), vtag, saved
                        )
            finally:
                with trio.CancelScope(shield=True):
                    await qmp.execute("cont")
        finally:
            qmp.close()
        return await trio.to_thread.run_sync(_record, objects, definition, tag, True)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_unsave, objects, saved)
        raise


def fork(objects: ObjectStore, lane: str, tag: str, new_name: str) -> LaneDefinition:
    """A new lane ``new_name`` in the same store, made of the checkpoint: its definition as
    it was, its root disk and volumes forked (volume ``V`` becomes ``NEW.V``). Blocking;
    nothing is left behind if it fails."""
    check_lane_name(new_name)
    record = read_checkpoint(objects, lane, tag)
    try:
        read_definition(objects, new_name)
    except LaneNotFound:
        pass
    else:
        raise LaneError(f"a lane named {new_name!r} exists in {objects.describe()}")
    old = LaneDefinition.from_json(record["definition"])
    volumes = tuple(dataclasses.replace(v, name=f"{new_name}.{v.name}") for v in old.volumes)
    definition = dataclasses.replace(
        old, name=new_name, created=time.time(), volumes=volumes,
        forked_from={"lane": lane, "checkpoint": tag},
    )  # fmt: skip
    made = False
    volume_definitions: list[str] = []
    try:
        try:
            blockstore.fork_disk(objects, root_disk_name(lane), tag, root_disk_name(new_name))
        except blockstore.DiskExists:
            raise LaneError(
                f"a disk named {root_disk_name(new_name)!r} exists in {objects.describe()} "
                "(left by a lane of that name?): `lanekit disk info` shows it"
            ) from None
        made = True
        for source, forked in zip(old.volumes, volumes, strict=True):
            saved = record["volumes"][source.name]
            fork_volume(objects, saved["definition"], saved["tag"], forked.name)
            volume_definitions.append(forked.name)
        write_definition(objects, definition)
    except BaseException:
        for name in volume_definitions:
            remove_volume(objects, name)
        if made:
            delete_disk(objects, root_disk_name(new_name))
        raise
    return definition


def forks_of(objects: ObjectStore, lane: str, names: list[str]) -> list[str]:
    """The lanes among ``names`` that were forked from ``lane`` (blocking)."""
    found = []
    for name in names:
        with contextlib.suppress(LaneError):
            forked = read_definition(objects, name).forked_from
            if forked and forked.get("lane") == lane:
                found.append(name)
    return found


def remove_all(objects: ObjectStore, definition: LaneDefinition) -> None:
    """Delete the lane's checkpoints: records and the disk checkpoints they name (the root
    disk's go with the disk; forks keep what they share through their own heads)."""
    for tag in list_checkpoints(objects, definition.name):
        with contextlib.suppress(LaneError):
            record = read_checkpoint(objects, definition.name, tag)
            _unsave(objects, [(v["disk"], v["tag"]) for v in record.get("volumes", {}).values()])
        objects.delete(_record_key(definition.name, tag))
