"""The block-store layer and its reference implementation on any object store.

A *block store* holds fixed-size blocks by index and makes them durable on ``flush()``.
``read_blocks`` answers, per block, its bytes, ``b""`` for a block that reads as zeros
(without storing any data), or ``None`` for a block it does not hold (the disk then reads
the base image). ``write_blocks`` takes the same three kinds of value. Implement this
protocol to put a disk on any storage; :class:`ObjectBlockStore` is the reference one.

ObjectBlockStore writes each batch of blocks as lz4-compressed, checksummed *packs* (one
PUT for many blocks), uploaded in parallel, and commits on flush by writing a manifest
segment and then replacing the disk's head with If-Match. The head write is the only
commit point: a crash before it leaves unreferenced packs that garbage collection removes.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import lz4.block
import trio

from .concurrency import parallel, run_sync
from .errors import (
    BlockStoreError,
    CorruptBlock,
    DiskNotFound,
    Fenced,
    ObjectNotFound,
    PreconditionFailed,
    ReadOnly,
)
from .layout import (
    PACKS,
    SEGMENTS,
    ZERO,
    Entry,
    Head,
    Location,
    checksum,
    decode_segment,
    encode_segment,
    head_key,
)
from .lease import DEFAULT_TTL, Lease
from .objectstore import ObjectStore

T = TypeVar("T")

BlockValue = bytes | None
"""Block data; ``b""`` reads as zeros; ``None`` means not held (fall through to the base)."""

MAX_SEGMENTS = 16
GC_GRACE = 3600.0
"""GC spares unreferenced objects younger than this; a flush whose uploads are older than
half of it refuses to commit them (they may have been collected)."""


@runtime_checkable
class BlockStore(Protocol):
    """What a disk needs from storage. Calls for the same block never overlap."""

    block_size: int

    async def list_blocks(self) -> dict[int, bool]:
        """Blocks held: True if they hold data, False if they read as zeros."""
        ...

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, BlockValue]: ...

    async def write_blocks(self, blocks: Mapping[int, BlockValue]) -> None: ...

    async def flush(self) -> None:
        """Return only when every write before it is durable."""
        ...


@dataclass
class StoreStats:
    puts: int = 0
    gets: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    blocks_uploaded: int = 0
    blocks_fetched: int = 0
    commits: int = 0


def read_head(objects: ObjectStore, disk: str) -> tuple[Head, str]:
    try:
        obj = objects.get(head_key(disk))
    except ObjectNotFound:
        raise DiskNotFound(f"no disk named {disk!r} in {objects.describe()}") from None
    return Head.decode(obj.data, head_key(disk)), obj.etag


def load_map(objects: ObjectStore, head: Head) -> dict[int, Entry]:
    """Apply a head's segments in order into one block map (blocking; run in a thread)."""
    result: dict[int, Entry] = {}
    for seg in head.segments:
        for block, entry in decode_segment(objects.get(seg).data, seg).items():
            if entry is None:
                result.pop(block, None)
            else:
                result[block] = entry
    return result


class ObjectBlockStore:
    """The reference block store: packs of compressed blocks plus a committed manifest."""

    def __init__(
        self,
        objects: ObjectStore,
        head: Head,
        head_etag: str | None,
        block_map: dict[int, Entry],
        *,
        lease: Lease | None = None,
        pack_size: int = 4 << 20,
        concurrency: int = 8,
    ) -> None:
        self.objects = objects
        self.head = head
        self.block_size = head.block_size
        self._head_etag = head_etag
        self._map = block_map
        self._pending: dict[int, Entry | None] = {}
        self._pending_since: float | None = None
        self.lease = lease
        self.pack_size = max(pack_size, head.block_size)
        self.limiter = trio.CapacityLimiter(concurrency)
        self._commit_lock = trio.Lock()
        self.stats = StoreStats()
        self.fenced = False

    @property
    def writable(self) -> bool:
        return self.lease is not None

    @classmethod
    async def open(
        cls,
        objects: ObjectStore,
        disk: str,
        *,
        writable: bool,
        force: bool = False,
        lease_ttl: float = DEFAULT_TTL,
        checkpoint: str | None = None,
        **kwargs: Any,
    ) -> ObjectBlockStore:
        """Read the head and manifest (no blocks); take the lease and fence older writers."""
        if checkpoint is not None:
            from .disks import read_checkpoint

            if writable:
                raise ReadOnly(f"checkpoint {disk}@{checkpoint} is immutable: open it read-only")
            head = await run_sync(read_checkpoint, objects, disk, checkpoint)
            block_map = await run_sync(load_map, objects, head)
            return cls(objects, head, None, block_map, **kwargs)
        lease = None
        if writable:
            head, _ = await run_sync(read_head, objects, disk)
            lease = Lease(objects, disk, ttl=lease_ttl)
            await run_sync(lambda: lease.acquire(head.epoch, force=force))
        for attempt in range(4):
            head, etag = await run_sync(read_head, objects, disk)
            try:
                block_map = await run_sync(load_map, objects, head)
                break
            except ObjectNotFound:
                # A concurrent compaction + GC removed a segment of the head we read.
                if attempt == 3:
                    raise
        store = cls(objects, head, etag, block_map, lease=lease, **kwargs)
        if lease is not None:
            try:
                await store._commit(fencing=True)
            except BaseException:
                await run_sync(lease.release)
                raise
        return store

    async def list_blocks(self) -> dict[int, bool]:
        merged: dict[int, Entry | None] = dict(self._map)
        merged.update(self._pending)
        return {b: isinstance(e, Location) for b, e in merged.items() if e is not None}

    def _lookup(self, block: int) -> Entry | None:
        if block in self._pending:
            return self._pending[block]
        return self._map.get(block)

    def has_data(self, block: int) -> bool | None:
        """True: stored data; False: reads as zeros; None: not held."""
        e = self._lookup(block)
        return None if e is None else isinstance(e, Location)

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, BlockValue]:
        result: dict[int, BlockValue] = {}
        by_pack: dict[str, list[tuple[int, Location]]] = defaultdict(list)
        for b in blocks:
            e = self._lookup(b)
            if e is None:
                result[b] = None
            elif e == ZERO:
                result[b] = b""
            else:
                assert isinstance(e, Location)
                by_pack[e.pack].append((b, e))
        ranges: list[list[tuple[int, Location]]] = []
        for items in by_pack.values():
            items.sort(key=lambda it: it[1].offset)
            current = [items[0]]
            for it in items[1:]:
                last = current[-1][1]
                start = current[0][1].offset
                gap = it[1].offset - (last.offset + last.length)
                if 0 <= gap <= 256 << 10 and it[1].offset + it[1].length - start <= 16 << 20:
                    current.append(it)
                else:
                    ranges.append(current)
                    current = [it]
            ranges.append(current)

        def fetcher(group: list[tuple[int, Location]]) -> Callable[[], Awaitable[None]]:
            async def fetch() -> None:
                result.update(await run_sync(self._fetch_range, group, limiter=self.limiter))

            return fetch

        await parallel([fetcher(g) for g in ranges])
        return result

    def _fetch_range(self, group: list[tuple[int, Location]]) -> dict[int, bytes]:
        pack = group[0][1].pack
        start = group[0][1].offset
        end = max(loc.offset + loc.length for _, loc in group)
        try:
            data = self.objects.get_range(pack, start, end - start)
        except ObjectNotFound:
            raise CorruptBlock(pack, group[0][0], "object is missing from the store") from None
        self.stats.gets += 1
        self.stats.bytes_downloaded += len(data)
        out: dict[int, bytes] = {}
        for block, loc in group:
            raw = data[loc.offset - start : loc.offset - start + loc.length]
            if len(raw) != loc.length:
                raise CorruptBlock(pack, block, f"object is truncated ({len(data)} bytes read)")
            if loc.compressed:
                try:
                    raw = lz4.block.decompress(raw, uncompressed_size=self.block_size)
                except Exception as e:
                    raise CorruptBlock(pack, block, f"lz4 decoding failed: {e}") from None
            if len(raw) != self.block_size or checksum(raw, loc.sha256) != loc.digest:
                raise CorruptBlock(pack, block, "checksum mismatch")
            out[block] = raw
        self.stats.blocks_fetched += len(group)
        return out

    async def write_blocks(self, blocks: Mapping[int, BlockValue]) -> None:
        if not self.writable:
            raise ReadOnly("this disk is open read-only")
        data_blocks: list[tuple[int, bytes]] = []
        meta: dict[int, Entry | None] = {}
        for b, value in blocks.items():
            if value is None:
                meta[b] = None
            elif value == b"":
                meta[b] = ZERO
            else:
                if len(value) != self.block_size:
                    raise ValueError(f"block {b}: {len(value)} bytes, expected {self.block_size}")
                data_blocks.append((b, value))
        data_blocks.sort()
        groups: list[list[tuple[int, bytes]]] = []
        size = 0
        for item in data_blocks:
            if not groups or size + len(item[1]) > self.pack_size:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += len(item[1])
        if self._pending_since is None and groups:
            self._pending_since = time.time()
        uploaded: dict[int, Entry | None] = {}

        def uploader(group: list[tuple[int, bytes]]) -> Callable[[], Awaitable[None]]:
            async def upload() -> None:
                uploaded.update(await run_sync(self._upload_pack, group, limiter=self.limiter))

            return upload

        await parallel([uploader(g) for g in groups])
        self._pending.update(meta)
        self._pending.update(uploaded)

    def _upload_pack(self, group: list[tuple[int, bytes]]) -> dict[int, Location]:
        key = f"{PACKS}{uuid.uuid4().hex}"
        parts: list[bytes] = []
        locations: dict[int, Location] = {}
        offset = 0
        for block, data in group:
            packed = lz4.block.compress(data, store_size=False)
            compressed = len(packed) < len(data) - len(data) // 32
            stored = packed if compressed else data
            locations[block] = Location(key, offset, len(stored), compressed, checksum(data))
            parts.append(stored)
            offset += len(stored)
        body = b"".join(parts)
        self.objects.put(key, body, if_none_match=True)
        self.stats.puts += 1
        self.stats.bytes_uploaded += len(body)
        self.stats.blocks_uploaded += len(group)
        return locations

    async def flush(self) -> None:
        """Commit every block written so far: upload the manifest delta, then the head."""
        if not self.writable:
            return
        async with self._commit_lock:
            if not self._pending:
                if self.fenced:
                    raise Fenced(f"disk {self.head.disk!r}: this writer was fenced")
                return
            await self._commit(fencing=False)

    async def renew_lease(self) -> None:
        if self.lease is not None:
            await run_sync(self.lease.renew)

    async def _commit(self, *, fencing: bool) -> None:
        if self.fenced:
            raise Fenced(f"disk {self.head.disk!r}: this writer was fenced by a newer one")
        assert self.lease is not None
        if not fencing:
            if self.lease.expired_locally(margin=self.lease.ttl / 4) or self.lease.lost:
                try:
                    await run_sync(self.lease.renew)
                except Fenced:
                    self.fenced = True
                    raise
            if self._pending_since and time.time() - self._pending_since > GC_GRACE / 2:
                self._pending.clear()
                self._pending_since = None
                raise BlockStoreError(
                    "uploads pending for longer than half the GC grace period may have been "
                    "collected; write the data again and flush"
                )
        pending = dict(self._pending)
        # Stats follow from the delta; the whole map is only walked when compacting.
        blocks, stored = self.head.stored_blocks, self.head.stored_bytes
        for b, e in pending.items():
            old = self._map.get(b)
            if isinstance(old, Location):
                blocks, stored = blocks - 1, stored - old.length
            if isinstance(e, Location):
                blocks, stored = blocks + 1, stored + e.length
        segments = list(self.head.segments)
        if pending:
            if len(segments) + 1 > MAX_SEGMENTS:
                full: dict[int, Entry | None] = dict(self._map)
                for b, e in pending.items():
                    if e is None:
                        full.pop(b, None)
                    else:
                        full[b] = e
                if self.head.base_digest is None:
                    full = {b: e for b, e in full.items() if e != ZERO}
                segments = []
                body = await run_sync(encode_segment, full)
            else:
                body = await run_sync(encode_segment, pending)
            seg_key = f"{SEGMENTS}{uuid.uuid4().hex}"
            await run_sync(lambda: self.objects.put(seg_key, body, if_none_match=True))
            self.stats.puts += 1
            segments.append(seg_key)
        new_head = dataclasses.replace(
            self.head,
            generation=self.head.generation + 1,
            epoch=self.lease.epoch,
            commit_id=uuid.uuid4().hex,
            committed_at=time.time(),
            segments=segments,
            stored_blocks=blocks,
            stored_bytes=stored,
        )
        etag = await run_sync(self._put_head, new_head)
        self.stats.puts += 1
        self.stats.commits += 1
        self.head, self._head_etag = new_head, etag
        for b, e in pending.items():
            if e is None:
                self._map.pop(b, None)
            else:
                self._map[b] = e
        for b, e in pending.items():
            if self._pending.get(b, ...) is e:
                del self._pending[b]
        if not self._pending:
            self._pending_since = None

    def _put_head(self, new_head: Head) -> str:
        key = head_key(new_head.disk)
        try:
            return self.objects.put(key, new_head.encode(), if_match=self._head_etag or "-")
        except PreconditionFailed:
            current, etag = read_head(self.objects, new_head.disk)
            if current.commit_id == new_head.commit_id:
                return etag
            self.fenced = True
            raise Fenced(
                f"disk {new_head.disk!r}: another writer committed (epoch {current.epoch}, "
                f"generation {current.generation}); this writer (epoch {new_head.epoch}) was "
                "fenced and its unflushed writes are discarded"
            ) from None

    async def release(self) -> None:
        """Give up the lease (after a flush, so the next host sees everything)."""
        if self.lease is not None and not self.fenced:
            await run_sync(self.lease.release)
        self.lease = None

    async def checkpoint(self, tag: str) -> Head:
        """Name the committed state (call after flush to include every write)."""
        from .disks import save_checkpoint

        async with self._commit_lock:
            head = self.head
            return await run_sync(save_checkpoint, self.objects, head, tag)
