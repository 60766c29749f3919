"""A paused lane's memory snapshot in its store::

    lanes/<name>/memory/<id>/<n>    the migration stream in chunks
    lanes/<name>/paused             JSON: id, chunk digests, length, encoding, qemu version

The stream goes to the store as qemu writes it, several chunks in flight, each
lz4-compressed unless a sample shows it incompressible (a guest's random or encrypted
data: compressing it costs CPU the store's server needs, and saves nothing);
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
import time
import uuid
from typing import Any, NamedTuple

import lz4.block
import trio

import blockstore
from blockstore import ObjectStore
from blockstore.concurrency import first_failure
from blockstore.layout import checkpoint_key

from .definition import PREFIX, root_disk_name
from .errors import LaneError

CHUNK = 8 << 20
DISK_CHECKPOINT = "paused-"
"""The root disk's checkpoint of a snapshot is this and the snapshot's id."""
PARALLEL = 6
"""Chunk puts in flight while the stream comes (their buffers: PARALLEL x CHUNK)."""
ENCODING = "lz4-block-or-raw"
"""How chunks are stored: lz4 blocks but those the record lists under ``raw``. Records
without ``encoding`` hold raw chunks; ``lz4-block`` ones (before 2026-12) only lz4 blocks."""
ENCODINGS = (None, "lz4-block", ENCODING)
SAMPLES = 8
SAMPLE = 16 << 10
INCOMPRESSIBLE = 0.95
"""A chunk whose every sample lz4 shrinks by less than this is stored as it is."""


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


class Uploaded(NamedTuple):
    digests: list[str]
    """The sha256 of each chunk as stored."""
    length: int
    """Of the stream (before compression)."""
    raw: list[int]
    """The chunks stored uncompressed."""

    def record(self, snapshot: str, qemu: Any) -> dict[str, Any]:
        return {
            "id": snapshot, "chunks": self.digests, "bytes": self.length, "qemu": qemu,
            "encoding": ENCODING, "raw": self.raw, "saved": time.time(),
        }  # fmt: skip


async def upload_stream(
    objects: ObjectStore, name: str, snapshot: str, stream: trio.abc.ReceiveStream
) -> Uploaded:
    """Store the stream's chunks as they arrive, ``PARALLEL`` puts at a time; what the
    record needs, once every put has succeeded (the puts are then durable)."""
    digests: list[str] = []
    raw: list[int] = []
    total = 0
    slots = trio.Semaphore(PARALLEL)

    async def put(index: int, data: list[bytes]) -> None:
        key = _chunk_key(name, snapshot, index)
        try:
            digest, compressed = await trio.to_thread.run_sync(_store_chunk, objects, key, data)
            digests[index] = digest
            if not compressed:
                raw.append(index)
        finally:
            slots.release()

    try:
        async with trio.open_nursery() as nursery:
            index = 0
            while data := await _read_chunk(stream):
                total += sum(map(len, data))
                await slots.acquire()
                digests.append("")
                nursery.start_soon(put, index, data)
                index += 1
    except BaseExceptionGroup as group:
        raise first_failure(group) from None
    return Uploaded(digests, total, sorted(raw))


async def _read_chunk(stream: trio.abc.ReceiveStream) -> list[bytes]:
    """The pieces of the next CHUNK bytes of the stream (fewer at its end, none after it),
    joined by the thread that stores them, not on the event loop."""
    pieces: list[bytes] = []
    size = 0
    while size < CHUNK:
        more = await stream.receive_some(CHUNK - size)
        if not more:
            break
        pieces.append(bytes(more))
        size += len(more)
    return pieces


def _store_chunk(objects: ObjectStore, key: str, pieces: list[bytes]) -> tuple[str, bool]:
    """Compress (a guest's memory is about half page cache and code: lz4 halves what the
    store must take) unless the chunk is incompressible, and put; the sha256 of what is
    stored, and whether it is compressed."""
    data = b"".join(pieces)
    compressed = not _incompressible(data)
    stored = lz4.block.compress(data, store_size=True) if compressed else data
    objects.put(key, stored)
    return _sha256(stored), compressed


def _incompressible(data: bytes) -> bool:
    step = max(SAMPLE, len(data) // SAMPLES)
    view = memoryview(data)
    for start in range(0, len(data), step):
        sample = view[start : start + SAMPLE]
        if len(lz4.block.compress(sample, store_size=False)) < INCOMPRESSIBLE * len(sample):
            return False
    return True


def write_record(objects: ObjectStore, name: str, record: dict[str, Any]) -> None:
    objects.put(_record_key(name), json.dumps(record, sort_keys=True).encode())


class SnapshotReader:
    """Fetches a paused lane's chunks ahead, ``PARALLEL`` at a time, each checked and
    decompressed before it is handed out, and :meth:`feed` writes them in order; started
    as soon as the record is read, so the fetch overlaps the boot of the qemu that loads it.
    A chunk's slot frees only once it is fed: at most ``PARALLEL`` chunks are held."""

    def __init__(self, objects: ObjectStore, name: str, record: dict[str, Any]) -> None:
        self._objects, self._name, self._record = objects, name, record
        self._expected = list(record["chunks"])
        encoding = record.get("encoding")
        if encoding not in ENCODINGS:
            raise LaneError(
                f"lane {name!r}: its memory snapshot is stored as {encoding!r}, which this "
                "lanekit cannot read (a newer one wrote it?); resume it with that lanekit, or "
                f"`lanekit lane start {name} --cold` boots it from its disk instead"
            )
        listed = record.get("raw") or []
        if not isinstance(listed, list) or not all(isinstance(i, int) for i in listed):
            raise _corrupted(name, "its list of uncompressed chunks is unreadable")
        raw = set(listed) if encoding == ENCODING else set()
        self._compressed = [
            encoding is not None and index not in raw for index in range(len(self._expected))
        ]
        self._ready: dict[int, bytes] = {}
        self._arrived = [trio.Event() for _ in self._expected]
        self._slots = trio.Semaphore(PARALLEL)
        self._error: BaseException | None = None

    async def fetch_all(self) -> None:
        """Run in the background; a failure is kept for :meth:`feed` to raise."""
        try:
            async with trio.open_nursery() as nursery:
                for index in range(len(self._expected)):
                    await self._slots.acquire()
                    nursery.start_soon(self._fetch, index)
        except Exception as exc:  # a group of failures (not a cancellation): feed raises it
            self._error = first_failure(exc) if isinstance(exc, ExceptionGroup) else exc
        finally:
            for arrived in self._arrived:
                arrived.set()

    async def _fetch(self, index: int) -> None:
        key = _chunk_key(self._name, str(self._record["id"]), index)
        found = await trio.to_thread.run_sync(_fetch_chunk, self._objects, key)
        if found is None or found[1] != self._expected[index]:
            what = "is missing" if found is None else "does not match its sha256"
            raise _corrupted(self._name, f"chunk {index} {what}")
        data = found[0]
        if self._compressed[index]:
            data = await trio.to_thread.run_sync(_decompress, self._name, index, data)
        self._ready[index] = data
        self._arrived[index].set()

    async def feed(self, stream: trio.abc.SendStream) -> None:
        """Write the whole stream into ``stream``; LaneError naming the first bad chunk,
        or a stream shorter or longer than the record says."""
        total = 0
        for index, arrived in enumerate(self._arrived):
            await arrived.wait()
            if self._error is not None:
                raise self._error
            data = self._ready.pop(index)
            total += len(data)
            await stream.send_all(data)
            self._slots.release()
        length = self._record.get("bytes")
        if length is not None and total != length:
            raise _corrupted(self._name, f"its chunks hold {total} bytes, not the {length} saved")


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


def _sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def forget(objects: ObjectStore, name: str) -> None:
    """The lane is no longer paused: its record goes (its chunks may stay behind until the
    next :func:`discard`)."""
    with contextlib.suppress(blockstore.ObjectNotFound):
        objects.delete(_record_key(name))


def discard_others(objects: ObjectStore, name: str, snapshot: str) -> None:
    """After a pause stored ``snapshot``: what earlier snapshots left (a resume killed after
    its memory was loaded and before its chunks went) goes."""
    for info in objects.list(f"{PREFIX}{name}/memory/"):
        if not info.key.startswith(f"{PREFIX}{name}/memory/{snapshot}/"):
            with contextlib.suppress(blockstore.ObjectNotFound):
                objects.delete(info.key)
    disk = root_disk_name(name)
    for tag in blockstore.list_checkpoints(objects, disk):
        if tag.startswith(DISK_CHECKPOINT) and tag != DISK_CHECKPOINT + snapshot:
            with contextlib.suppress(blockstore.ObjectNotFound):
                objects.delete(checkpoint_key(disk, tag))


def discard(objects: ObjectStore, name: str, record: dict[str, Any] | None) -> None:
    """Forget the snapshot: the record first (the lane is no longer paused), then the chunks
    of ``record``'s snapshot and the root disk's checkpoint taken with it (a record without
    an id: of every snapshot, also what an interrupted resume or pause left behind)."""
    forget(objects, name)
    if record is None:
        return
    snapshot = str(record.get("id") or "")
    for info in objects.list(f"{PREFIX}{name}/memory/{snapshot + '/' if snapshot else ''}"):
        with contextlib.suppress(blockstore.ObjectNotFound):
            objects.delete(info.key)
    disk = root_disk_name(name)
    tags = [DISK_CHECKPOINT + snapshot] if snapshot else [
        tag for tag in blockstore.list_checkpoints(objects, disk) if tag.startswith(DISK_CHECKPOINT)
    ]  # fmt: skip
    for tag in tags:  # it pins the disk's state at the pause against GC: spent now
        with contextlib.suppress(blockstore.ObjectNotFound):
            objects.delete(checkpoint_key(disk, tag))
