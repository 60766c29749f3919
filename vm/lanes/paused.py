"""A paused lane's memory snapshot in its store::

    lanes/<name>/memory/<id>/<n>    the migration stream in chunks
    lanes/<name>/paused             JSON: id, chunk digests, length, encoding, qemu version

The stream goes to the store as qemu writes it, several chunks (lz4-compressed) in flight;
the record is written last, once every chunk is stored, so a pause that answers success is
durable.

The root disk at pause time is the disk's checkpoint ``paused-<id>``; nobody writes the
disk while the lane is paused (a start resumes it), so the head is that state too. Every
chunk is checked against its sha256 before qemu sees it: a corrupted snapshot is refused
with the lane left paused, nothing deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import lz4.block
import trio

import blockstore
from blockstore import ObjectStore
from blockstore.concurrency import first_failure

from .definition import PREFIX, LaneError

CHUNK = 8 << 20
PARALLEL = 6
ENCODING = "lz4-block"
"""How chunks are stored (records without ``encoding`` hold raw chunks)."""
"""Chunk puts in flight while the stream comes (their buffers: PARALLEL x CHUNK)."""


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


async def upload_stream(
    objects: ObjectStore, name: str, snapshot: str, stream: trio.abc.ReceiveStream
) -> tuple[list[str], int]:
    """Store the stream's chunks as they arrive, ``PARALLEL`` puts at a time; their sha256s
    and the stream's length, once every put has succeeded (the puts are then durable)."""
    digests: list[str] = []
    total = 0
    slots = trio.Semaphore(PARALLEL)

    async def put(index: int, data: bytearray) -> None:
        key = _chunk_key(name, snapshot, index)
        try:
            digests[index] = await trio.to_thread.run_sync(_store_chunk, objects, key, data)
        finally:
            slots.release()

    try:
        async with trio.open_nursery() as nursery:
            index = 0
            while data := await _read_chunk(stream):
                total += len(data)
                await slots.acquire()
                digests.append("")
                nursery.start_soon(put, index, data)
                index += 1
    except BaseExceptionGroup as group:
        raise first_failure(group) from None
    return digests, total


async def _read_chunk(stream: trio.abc.ReceiveStream) -> bytearray:
    """The next CHUNK bytes of the stream (fewer at its end, none after it)."""
    data = bytearray()
    while len(data) < CHUNK:
        more = await stream.receive_some(CHUNK - len(data))
        if not more:
            break
        data += more
    return data


def _store_chunk(objects: ObjectStore, key: str, data: bytearray) -> str:
    """Compress (a guest's memory is about half page cache and code: lz4 halves what the
    store must take) and put; the sha256 of what is stored."""
    stored = lz4.block.compress(data, store_size=True)
    objects.put(key, stored)
    return _sha256(stored)


def write_record(objects: ObjectStore, name: str, record: dict[str, Any]) -> None:
    objects.put(_record_key(name), json.dumps(record, sort_keys=True).encode())


async def download(objects: ObjectStore, name: str, record: dict[str, Any], path: Path) -> None:
    """Fetch and check every chunk into ``path``, ``PARALLEL`` at a time; LaneError naming
    the first bad one, or a stream shorter or longer than the record says."""
    snapshot = str(record["id"])
    expected = list(record["chunks"])
    slots = trio.Semaphore(PARALLEL)

    async def fetch(index: int, f: Any) -> None:
        try:
            key = _chunk_key(name, snapshot, index)
            found = await trio.to_thread.run_sync(_fetch_chunk, objects, key)
            if found is None or found[1] != expected[index]:
                what = "is missing" if found is None else "does not match its sha256"
                raise _corrupted(name, f"chunk {index} {what}")
            data = found[0]
            if record.get("encoding") == ENCODING:
                data = await trio.to_thread.run_sync(_decompress, name, index, data)
            await trio.to_thread.run_sync(_write_at, f, index * CHUNK, data)
        finally:
            slots.release()

    with open(path, "wb") as f:  # noqa: ASYNC230  (writes go to threads)
        try:
            async with trio.open_nursery() as nursery:
                for index in range(len(expected)):
                    await slots.acquire()
                    nursery.start_soon(fetch, index, f)
        except BaseExceptionGroup as group:
            raise first_failure(group) from None
        size = await trio.to_thread.run_sync(lambda: os.fstat(f.fileno()).st_size)
    length = record.get("bytes")
    if length is not None and size != length:
        raise _corrupted(name, f"its chunks hold {size} bytes, not the {length} saved")


def _corrupted(name: str, what: str) -> LaneError:
    return LaneError(
        f"lane {name!r}: its memory snapshot is corrupted ({what}); the lane stays paused; "
        f"`lanekit lane start {name} --cold` boots it from its disk instead (its running "
        "processes are lost)"
    )


def _decompress(name: str, index: int, stored: bytes) -> bytes:
    try:
        data = lz4.block.decompress(stored)
    except lz4.block.LZ4BlockError:
        raise _corrupted(name, f"chunk {index} does not decompress") from None
    if len(data) > CHUNK:
        raise _corrupted(name, f"chunk {index} holds more than a chunk")
    return bytes(data)


def _fetch_chunk(objects: ObjectStore, key: str) -> tuple[bytes, str] | None:
    try:
        data = objects.get(key).data
    except blockstore.ObjectNotFound:
        return None
    return data, _sha256(data)


def _write_at(f: Any, offset: int, data: bytes) -> None:
    os.pwrite(f.fileno(), data, offset)


def _sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def discard(objects: ObjectStore, name: str, record: dict[str, Any] | None) -> None:
    """Forget the snapshot: the record first (the lane is no longer paused), then chunks."""
    with contextlib.suppress(blockstore.ObjectNotFound):
        objects.delete(_record_key(name))
    if record is not None:
        for info in objects.list(f"{PREFIX}{name}/memory/"):
            objects.delete(info.key)
