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

Commits are idempotent. Each attempt carries a fresh ``commit_id``; one whose outcome is
unknown (the put raised something other than a lost race) is remembered until the head is
seen again, and a head carrying the id of one of them is adopted as this writer's own
commit, never taken for another writer's. Before a commit the writer reconfirms its lease
when it last confirmed it more than a small fraction of the TTL ago (see ``lease``), so a
writer that was taken over stops at once, and the new writer's fencing commit retries
against a head that an older writer may still move for that moment.

Format 1 (older lanekit) disks are read as they are; their first commit, the fencing commit
of the first writable open, upgrades them to format 2: the new head names their segments
with the SHA-256 of their bytes as read then, and later compactions rewrite them. Blocks
written before keep their content-only digests; checkpoints taken before stay format 1.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import trio

from .concurrency import parallel, run_sync
from .errors import (
    BlockStoreError,
    CorruptBlock,
    CorruptMetadata,
    Fenced,
    LeaseHeld,
    ObjectNotFound,
    PreconditionFailed,
    ReadOnly,
)
from .layout import (
    FORMAT_VERSION,
    PACKS,
    SEGMENTS,
    ZERO,
    Entry,
    Head,
    Location,
    SegmentRef,
    decode_block,
    encode_block,
    encode_segment,
    head_key,
    head_problem,
    new_lineage,
    segment_sha256,
)
from .lease import DEFAULT_TTL, Lease, lease_is_live, read_lease
from .manifest import SegmentCache, load_checkpoint, load_current, load_map, read_head
from .objectstore import ObjectStore, put_new

T = TypeVar("T")
log = logging.getLogger(__name__)

BlockValue = bytes | None
"""Block data; ``b""`` reads as zeros; ``None`` means not held (fall through to the base)."""

MAX_SEGMENTS = 16
GC_GRACE = 3600.0
"""GC spares unreferenced objects younger than this; a flush whose uploads are older than
half of it refuses to commit them (they may have been collected)."""
_COMMIT_ATTEMPTS = 3
"""Head puts per commit while the store answers reads but the put itself keeps failing."""


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


def _taken_while_opening(objects: ObjectStore, disk: str, head: Head) -> BlockStoreError:
    lease, _ = read_lease(objects, disk)
    if lease is not None and lease_is_live(lease):
        expires = float(lease["renewed"]) + float(lease["ttl"])
        return LeaseHeld(disk, lease["holder"], float(lease["since"]), expires)
    return Fenced(f"disk {disk!r}: a newer writer (epoch {head.epoch}) took it during this open")


@dataclass
class _Attempt:
    """A head put: the head written and the pending entries it commits."""

    head: Head
    pending: dict[int, Entry | None]


@dataclass
class _Outcome:
    """What a head put did: its etag if it succeeded; else its error and, when the store
    could be read, the head found there (None if even that failed)."""

    etag: str | None = None
    error: Exception | None = None
    current: tuple[Head, str] | None = None


class _HeadMoved(Exception):
    """An older writer committed while the new one was fencing it."""


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
        segment_hashes: dict[str, str] | None = None,
    ) -> None:
        self.objects = objects
        self.head = head
        self.block_size = head.block_size
        self._head_etag = head_etag
        self._map = block_map
        self._segment_hashes = dict(segment_hashes or {})
        self._pending: dict[int, Entry | None] = {}
        self._pending_since: float | None = None
        self._unknown: list[_Attempt] = []
        """Head puts whose outcome is unknown, all made on the head we last saw."""
        self.lineage = bytes.fromhex(head.lineage) if head.lineage else new_lineage()
        self.lease = lease
        self.pack_size = max(pack_size, head.block_size)
        self.limiter = trio.CapacityLimiter(concurrency)
        self._commit_lock = trio.Lock()
        self._lease_lock = trio.Lock()
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
            if writable:
                raise ReadOnly(f"checkpoint {disk}@{checkpoint} is immutable: open it read-only")
            head, block_map = await run_sync(load_checkpoint, objects, disk, checkpoint)
            return cls(objects, head, None, block_map, **kwargs)
        if not writable:
            head, etag, block_map, _ = await run_sync(load_current, objects, disk)
            return cls(objects, head, etag, block_map, **kwargs)
        head, _ = await run_sync(read_head, objects, disk)
        lease = Lease(objects, disk, ttl=lease_ttl)
        try:
            await run_sync(lambda: lease.acquire(head.epoch, force=force))
            return await cls._take_over(objects, disk, lease, kwargs)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await run_sync(lease.release)
                except Exception as e:
                    log.warning("could not release the lease of %r (it will expire): %s", disk, e)
            raise

    @classmethod
    async def _take_over(
        cls, objects: ObjectStore, disk: str, lease: Lease, kwargs: dict[str, Any]
    ) -> ObjectBlockStore:
        """Commit a head carrying the new epoch: from then on no older writer can commit.
        One may still commit for a moment, until it reconfirms its lease and finds it taken:
        retry against the moving head, within the lease's TTL (any older writer, of any
        version, notices the takeover at its next renewal within it)."""
        deadline = trio.current_time() + max(lease.ttl, 5.0)
        cache: SegmentCache = {}
        delay = 0.005
        while True:
            hashes: dict[str, str] = {}
            head, etag = await run_sync(read_head, objects, disk)
            if head.format < FORMAT_VERSION:  # its upgrade names segments by their hashes
                head, etag, _, hashes = await run_sync(load_current, objects, disk, cache)
            if head.epoch >= lease.epoch:
                raise await run_sync(_taken_while_opening, objects, disk, head)
            store = cls(objects, head, etag, {}, lease=lease, segment_hashes=hashes, **kwargs)
            try:
                await store._commit(fencing=True)
                break
            except _HeadMoved:
                log.debug("disk %r: an older writer committed during the takeover; again", disk)
                if trio.current_time() >= deadline:
                    raise BlockStoreError(
                        f"disk {disk!r}: could not fence the previous writer, whose commits "
                        f"went on for {max(lease.ttl, 5.0):.0f}s after this one took the lease"
                    ) from None
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)
        try:
            store._map = (await run_sync(load_map, objects, store.head, cache))[0]
        except ObjectNotFound as e:
            raise CorruptMetadata(e.key, f"segment of {head_key(disk)} is missing") from None
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
        start = min(loc.offset for _, loc in group)
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
            try:
                out[block] = decode_block(raw, loc, block, self.block_size)
            except ValueError as e:
                raise CorruptBlock(pack, block, str(e)) from None
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

    def _create(self, key: str, body: bytes) -> None:
        """Upload a new immutable object (idempotent, see put_new)."""
        if not put_new(self.objects, key, body):
            raise BlockStoreError(f"{key} already exists with other content")
        self.stats.puts += 1
        self.stats.bytes_uploaded += len(body)

    def _upload_pack(self, group: list[tuple[int, bytes]]) -> dict[int, Location]:
        key = f"{PACKS}{uuid.uuid4().hex}"
        parts: list[bytes] = []
        locations: dict[int, Location] = {}
        offset = 0
        for block, data in group:
            stored, compressed, digest = encode_block(self.lineage, block, data)
            locations[block] = Location(key, offset, len(stored), compressed, digest, self.lineage)
            parts.append(stored)
            offset += len(stored)
        self._create(key, b"".join(parts))
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
        lease = self.lease
        if lease is not None:
            async with self._lease_lock:
                await run_sync(lease.renew)

    async def _confirm_lease(self) -> None:
        """No commit without a lease known to be ours and unexpired (see CONFIRM_FRACTION)."""
        lease = self.lease
        assert lease is not None
        if not lease.needs_confirmation():
            return
        async with self._lease_lock:
            if lease.needs_confirmation():
                try:
                    await run_sync(lease.renew)
                except Fenced:
                    self.fenced = True
                    raise

    async def _commit(self, *, fencing: bool) -> None:
        if self.fenced:
            raise Fenced(f"disk {self.head.disk!r}: this writer was fenced by a newer one")
        lease = self.lease
        assert lease is not None
        await self._confirm_lease()  # a takeover's retries may outlast a confirmation too
        if self._pending_since and time.time() - self._pending_since > GC_GRACE / 2:
            self._pending.clear()
            self._pending_since = None
            raise BlockStoreError(
                "uploads pending for longer than half the GC grace period may have been "
                "collected; write the data again and flush"
            )
        error: Exception | None = None
        for _attempt in range(_COMMIT_ATTEMPTS):
            if self._unknown:
                # An earlier flush's put may have landed: look before writing on top.
                seen = await run_sync(read_head, self.objects, self.head.disk)
                if self._settle(seen) and (fencing or not self._pending):
                    return
            attempt = await self._prepare()
            outcome = await run_sync(self._put_head, attempt)
            if outcome.etag is not None:
                self._apply(attempt, outcome.etag)
                return
            assert outcome.error is not None
            self._unknown.append(attempt)
            if outcome.current is None:
                raise outcome.error
            error = outcome.error
            if self._settle(outcome.current):
                if fencing or not self._pending:
                    return
                continue
            current, etag = outcome.current
            if etag == self._head_etag:
                continue  # it did not land (yet), and the store answers: try again
            self._unknown.clear()  # the head moved on: none of ours can land any more
            if fencing and current.epoch < lease.epoch:
                raise _HeadMoved
            self.fenced = True
            raise Fenced(
                f"disk {self.head.disk!r}: another writer committed (epoch {current.epoch}, "
                f"generation {current.generation}); this writer (epoch {lease.epoch}) was "
                "fenced and its unflushed writes are discarded"
            ) from None
        assert error is not None
        raise error

    def _settle(self, current: tuple[Head, str]) -> bool:
        """If the head is one of our attempts whose outcome was unknown, it is ours: adopt it."""
        head, etag = current
        for attempt in self._unknown:
            if attempt.head.commit_id == head.commit_id:
                self._apply(attempt, etag)
                return True
        return False

    def _segment_refs(self) -> list[SegmentRef]:
        if self.head.format >= FORMAT_VERSION:
            return list(self.head.segments)
        return [SegmentRef(s.key, self._segment_hashes[s.key]) for s in self.head.segments]

    async def _prepare(self) -> _Attempt:
        """The next head (after uploading its segment, if anything is pending)."""
        assert self.lease is not None
        pending = dict(self._pending)
        # Stats follow from the delta; the whole map is only walked when compacting.
        blocks, stored = self.head.stored_blocks, self.head.stored_bytes
        for b, e in pending.items():
            old = self._map.get(b)
            if isinstance(old, Location):
                blocks, stored = blocks - 1, stored - old.length
            if isinstance(e, Location):
                blocks, stored = blocks + 1, stored + e.length
        segments = self._segment_refs()
        if pending:
            entries = pending
            if len(segments) + 1 > MAX_SEGMENTS:
                full: dict[int, Entry | None] = dict(self._map)
                for b, e in pending.items():
                    if e is None:
                        full.pop(b, None)
                    else:
                        full[b] = e
                if self.head.base_digest is None:
                    full = {b: e for b, e in full.items() if e != ZERO}
                segments, entries = [], full
            key = f"{SEGMENTS}{uuid.uuid4().hex}"

            def upload() -> str:
                body = encode_segment(entries, self.block_size)
                self._create(key, body)
                return segment_sha256(body)

            segments.append(SegmentRef(key, await run_sync(upload)))
        base = self.head
        head = Head(
            disk=base.disk,
            size=base.size,
            block_size=base.block_size,
            base_digest=base.base_digest,
            generation=base.generation + 1,
            epoch=self.lease.epoch,
            commit_id=uuid.uuid4().hex,
            committed_at=time.time(),
            segments=segments,
            parent=base.parent,
            stored_blocks=blocks,
            stored_bytes=stored,
            format=FORMAT_VERSION,
            lineage=self.lineage.hex(),
        )
        problem = head_problem(head)
        if problem:
            raise BlockStoreError(f"refusing to commit an invalid head of {base.disk!r}: {problem}")
        return _Attempt(head, pending)

    def _put_head(self, attempt: _Attempt) -> _Outcome:
        """Blocking; changes nothing: the caller acts on the outcome in the trio thread."""
        disk = attempt.head.disk
        try:
            body = attempt.head.encode()
            etag = self.objects.put(head_key(disk), body, if_match=self._head_etag or "-")
            return _Outcome(etag=etag)
        except Exception as e:
            try:
                return _Outcome(error=e, current=read_head(self.objects, disk))
            except Exception as unreadable:
                # A lost race we cannot look into is an unknown outcome like any other.
                return _Outcome(error=unreadable if isinstance(e, PreconditionFailed) else e)

    def _apply(self, attempt: _Attempt, etag: str) -> None:
        """The attempt is committed: it becomes the head and its entries leave pending."""
        self.head, self._head_etag = attempt.head, etag
        self.stats.puts += 1
        self.stats.commits += 1
        for b, e in attempt.pending.items():
            if e is None:
                self._map.pop(b, None)
            else:
                self._map[b] = e
        for b, e in attempt.pending.items():
            if self._pending.get(b, ...) is e:
                del self._pending[b]
        if not self._pending:
            self._pending_since = None
        self._unknown.clear()
        self._segment_hashes.clear()

    async def release(self) -> None:
        """Give up the lease (after a flush, so the next host sees everything)."""
        lease = self.lease
        try:
            if lease is not None and not self.fenced:
                async with self._lease_lock:
                    await run_sync(lease.release)
        finally:
            self.lease = None

    async def checkpoint(self, tag: str) -> Head:
        """Name the committed state (call after flush to include every write)."""
        from .disks import save_checkpoint

        async with self._commit_lock:
            head = self.head
            return await run_sync(save_checkpoint, self.objects, head, tag)
