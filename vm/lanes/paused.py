"""A paused lane's memory snapshot in its store::

    lanes/<name>/memory/<id>/<n>    the migration stream in chunks
    lanes/<name>/paused             JSON: id, chunk digests, qemu version (written last)

The root disk at pause time is the disk's checkpoint ``paused-<id>``; nobody writes the
disk while the lane is paused (a start resumes it), so the head is that state too. Every
chunk is checked against its sha256 before qemu sees it: a corrupted snapshot is refused
with the lane left paused, nothing deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import ObjectStore

from .definition import PREFIX, LaneError

CHUNK = 8 << 20


def _record_key(name: str) -> str:
    return f"{PREFIX}{name}/paused"


def _chunk_key(name: str, snapshot: str, index: int) -> str:
    return f"{PREFIX}{name}/memory/{snapshot}/{index:06d}"


def new_snapshot_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_paused(objects: ObjectStore, name: str) -> dict[str, Any] | None:
    """The lane's pause record (blocking), None if it is not paused."""
    try:
        data = objects.get(_record_key(name)).data
    except blockstore.ObjectNotFound:
        return None
    try:
        record = json.loads(data)
        if not isinstance(record, dict) or not isinstance(record.get("chunks"), list):
            raise TypeError("fields missing")
    except (ValueError, TypeError) as exc:
        raise LaneError(
            f"lane {name!r}: its memory snapshot record is unreadable ({exc}); "
            f"`lanekit lane start {name} --cold` boots it from its disk instead"
        ) from None
    return record


async def upload(objects: ObjectStore, name: str, snapshot: str, path: Path) -> list[str]:
    """Store the file's chunks; their sha256s."""
    digests = []
    with open(path, "rb") as f:  # noqa: ASYNC230  (reads go to a thread)
        index = 0
        while data := await trio.to_thread.run_sync(f.read, CHUNK):
            digest = await trio.to_thread.run_sync(_sha256, data)
            key = _chunk_key(name, snapshot, index)
            await trio.to_thread.run_sync(objects.put, key, data)
            digests.append(digest)
            index += 1
    return digests


def write_record(objects: ObjectStore, name: str, record: dict[str, Any]) -> None:
    objects.put(_record_key(name), json.dumps(record, sort_keys=True).encode())


async def download(objects: ObjectStore, name: str, record: dict[str, Any], path: Path) -> None:
    """Fetch and check every chunk into ``path``; LaneError naming the first bad one."""
    snapshot = str(record["id"])
    with open(path, "wb") as f:  # noqa: ASYNC230  (writes go to a thread)
        for index, expected in enumerate(record["chunks"]):
            key = _chunk_key(name, snapshot, index)
            try:
                data = (await trio.to_thread.run_sync(objects.get, key)).data
            except blockstore.ObjectNotFound:
                data = None
            digest = None if data is None else await trio.to_thread.run_sync(_sha256, data)
            if data is None or digest != expected:
                what = "is missing" if data is None else "does not match its sha256"
                raise LaneError(
                    f"lane {name!r}: its memory snapshot is corrupted (chunk {index} {what}); "
                    f"the lane stays paused; `lanekit lane start {name} --cold` boots it "
                    "from its disk instead (its running processes are lost)"
                )
            await trio.to_thread.run_sync(f.write, data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def discard(objects: ObjectStore, name: str, record: dict[str, Any] | None) -> None:
    """Forget the snapshot: the record first (the lane is no longer paused), then chunks."""
    with contextlib.suppress(blockstore.ObjectNotFound):
        objects.delete(_record_key(name))
    if record is not None:
        for info in objects.list(f"{PREFIX}{name}/memory/"):
            objects.delete(info.key)
