"""A memory snapshot's chunks in the store: lz4 blocks, but chunks a sample shows to be
incompressible (a guest's random or encrypted data) stored as they are; every kind of
record read back byte for byte; an encoding this lanekit does not know is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lz4.block
import pytest
import trio
import trio.lowlevel
import trio.testing

import blockstore
from vm.lanes import paused
from vm.lanes.errors import LaneError

CHUNK = paused.CHUNK


class Pieces(trio.abc.ReceiveStream):
    """``data`` handed out in pieces of at most 1 MiB, as qemu's pipe does."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        n = min(max_bytes or 1 << 20, 1 << 20)
        piece, self._data = self._data[:n], self._data[n:]
        return bytes(piece)

    async def aclose(self) -> None:
        pass


async def read_back(objects: blockstore.ObjectStore, record: dict[str, object]) -> bytes:
    reader = paused.SnapshotReader(objects, "lane", json.loads(json.dumps(record)))
    send, receive = trio.testing.memory_stream_one_way_pair()
    got = bytearray()

    async def collect() -> None:
        while piece := await receive.receive_some():
            got.extend(piece)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.fetch_all)
        nursery.start_soon(collect)
        await reader.feed(send)
        await send.aclose()
    return bytes(got)


async def upload_and_read(
    objects: blockstore.ObjectStore, data: bytes
) -> tuple[paused.Uploaded, bytes]:
    uploaded = await paused.upload_stream(objects, "lane", "snap", Pieces(data))
    return uploaded, await read_back(objects, uploaded.record("snap", {"major": 7}))


def snapshot_like() -> bytes:
    """Chunks of code-like text, of random bytes, of zeros, and one half random."""
    line = b"mov rax, rbx; call 0x4011f0; ret\n"
    text = (line * (CHUNK // len(line) + 1))[:CHUNK]
    half = os.urandom(CHUNK // 2) + bytes(CHUNK // 2)
    return text + os.urandom(CHUNK) + bytes(CHUNK) + half + os.urandom(CHUNK // 3)


def test_incompressible_chunks_are_stored_raw_and_read_back(tmp_path: Path) -> None:
    objects = blockstore.LocalObjectStore(tmp_path / "store")
    data = snapshot_like()
    uploaded, back = trio.run(upload_and_read, objects, data)
    assert back == data and uploaded.length == len(data)
    assert uploaded.raw == [1, 4]  # the random chunk and the random tail; half random compresses
    sizes = [len(objects.get(f"lanes/lane/memory/snap/{i:06d}").data) for i in range(5)]
    assert sizes[1] == CHUNK and sizes[4] == CHUNK // 3
    assert sizes[0] < CHUNK // 10 and sizes[2] < CHUNK // 100 and sizes[3] < CHUNK * 0.6


def test_records_of_every_encoding_are_read_and_unknown_ones_refused(tmp_path: Path) -> None:
    objects = blockstore.LocalObjectStore(tmp_path / "store")
    data = os.urandom(CHUNK) + bytes(CHUNK // 2 + 5)
    uploaded, back = trio.run(upload_and_read, objects, data)
    assert back == data and uploaded.raw == [0]
    keys = [f"lanes/lane/memory/snap/{i:06d}" for i in range(2)]
    chunks = [data[:CHUNK], data[CHUNK:]]

    def record(encoding: str | None, stored: list[bytes]) -> dict[str, object]:
        for key, piece in zip(keys, stored, strict=True):
            objects.put(key, piece)
        digests = [paused._sha256(piece) for piece in stored]
        return {"id": "snap", "chunks": digests, "bytes": len(data), "encoding": encoding}

    # What earlier pauses wrote: every chunk an lz4 block, or every chunk raw.
    lz4_only = record("lz4-block", [lz4.block.compress(c, store_size=True) for c in chunks])
    assert trio.run(read_back, objects, lz4_only) == data
    raw_only = record(None, chunks)
    del raw_only["encoding"]
    assert trio.run(read_back, objects, raw_only) == data
    with pytest.raises(LaneError, match=r"stored as 'zstd'.*cannot read.*--cold"):
        paused.SnapshotReader(objects, "lane", {**raw_only, "encoding": "zstd"})
    with pytest.raises(LaneError, match=r"corrupted \(its list of uncompressed.*--cold"):
        paused.SnapshotReader(objects, "lane", {**raw_only, "encoding": paused.ENCODING, "raw": 3})
