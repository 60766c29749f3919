"""The block-store layer and its reference implementation on any object store.

A *block store* holds fixed-size blocks by index and makes them durable on ``flush()``.
``read_blocks`` answers, per block, its bytes, ``b""`` for a block that reads as zeros
(without storing any data), or ``None`` for a block it does not hold (the disk then reads
the base image). ``write_blocks`` takes the same three kinds of value. Implement this
protocol to put a disk on any storage; :class:`ObjectBlockStore` is the reference one.

A store may also offer :class:`ExtentBlockStore`: extents (parts of blocks) written without
their blocks' old content, and reads that answer a block as layers. A :class:`Disk` uses it
when the store has it, so a small write to a block nobody read costs only its bytes.

ObjectBlockStore writes each batch of pieces (whole blocks and extents) as lz4-compressed,
checksummed *packs* (one PUT for many pieces), uploaded in parallel, and commits on flush by
writing a manifest segment with the changed entries only and then replacing the disk's head
with If-Match. The head write is the only commit point: a crash before it leaves
unreferenced objects that garbage collection removes. Segments form an LSM (see
``blockmap``), merged and their extents folded into whole blocks by ``compact``, off the
write path: a compaction commits through the same head write, between flushes.

Commits are idempotent. Each attempt carries a fresh ``commit_id``; one whose outcome is
unknown (the put raised something other than a lost race) is remembered until the head is
seen again, and a head carrying the id of one of them is adopted as this writer's own
commit, never taken for another writer's. Before a commit the writer reconfirms its lease
when it last confirmed it more than a small fraction of the TTL ago (see ``lease``), so a
writer that was taken over stops at once, and the new writer's fencing commit retries
against a head that an older writer may still move for that moment.

Format 1 and 2 disks are read as they are; their first commit, the fencing commit of the
first writable open, upgrades the head to format 3, naming their segments with the SHA-256
of their bytes, and compaction rewrites those segments; blocks written before keep their
digests. Checkpoints taken before stay as they were.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import trio

from .blockmap import FOLD_EXTENTS, BlockMap, Piece, Run, plan
from .compaction import fold_step, merge_step
from .concurrency import parallel, run_sync
from .errors import (
    BlockStoreError,
    CorruptBlock,
    Fenced,
    LeaseHeld,
    ObjectNotFound,
    ReadOnly,
)
from .layout import (
    FORMAT_VERSION,
    GC_GRACE,
    PACKS,
    SEGMENTS,
    STORED_PER_BLOCK,
    Head,
    SegmentRef,
    block_count,
    head_key,
    head_problem,
    new_lineage,
)
from .lease import DEFAULT_TTL, Lease, lease_is_live, read_lease
from .manifest import load_checkpoint, load_current, load_page, read_head, save_checkpoint
from .objectstore import ObjectStore, PreconditionFailed, put_new
from .pieces import (
    DATA,
    EXTENT,
    LEGACY,
    TOMB,
    ZERO,
    ZERO_EXTENT,
    PackWriter,
    decode_legacy,
    decode_piece,
)
from .protocol import BaseReader, BlockValue, Extent, Layered
from .segments import NO_PACK, Columns, PageRef, build_pages, encode_segment, new_refs

T = TypeVar("T")
log = logging.getLogger(__name__)

_COMMIT_ATTEMPTS = 3
"""Head puts per commit while the store answers reads but the put itself keeps failing."""
FOLD_BATCH = 64
"""Blocks one compaction step folds at most."""


@dataclass
class StoreStats:
    puts: int = 0
    gets: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    blocks_uploaded: int = 0
    extents_uploaded: int = 0
    blocks_fetched: int = 0
    map_gets: int = 0
    commits: int = 0
    merges: int = 0
    folds: int = 0


def _taken_while_opening(objects: ObjectStore, disk: str, head: Head) -> BlockStoreError:
    lease, _ = read_lease(objects, disk)
    if lease is not None and lease_is_live(lease):
        expires = float(lease["renewed"]) + float(lease["ttl"])
        return LeaseHeld(disk, lease["holder"], float(lease["since"]), expires)
    return Fenced(f"disk {disk!r}: a newer writer (epoch {head.epoch}) took it during this open")


@dataclass
class _Attempt:
    """A head put: the head written, the pending entries it commits, the runs it names."""

    head: Head
    pending: dict[int, list[Piece]]
    runs: list[Run]


@dataclass
class _Outcome:
    """What a head put did: its etag if it succeeded; else its error and, when the store
    could be read, the head found there (None if even that failed)."""

    etag: str | None = None
    error: Exception | None = None
    current: tuple[Head, str] | None = None


class _HeadMoved(Exception):
    """An older writer committed while the new one was fencing it."""


def _held(pieces: Sequence[Piece]) -> tuple[int, int]:
    """(1 if the pieces hold data else 0, their stored bytes)."""
    stored = sum(p.stored for p in pieces if p.kind in (DATA, EXTENT))
    return (1 if any(p.kind in (DATA, EXTENT) for p in pieces) else 0), stored


def _extents(pieces: Sequence[Piece]) -> int:
    return sum(1 for p in pieces if p.kind in (EXTENT, ZERO_EXTENT))


def _state(pieces: Sequence[Piece]) -> int:
    if pieces[0].kind == TOMB and len(pieces) == 1:
        return 0
    if pieces[0].kind == ZERO and len(pieces) == 1:
        return 2
    return 1


def columns_of(entries: Mapping[int, Sequence[Piece]]) -> Columns:
    """Columns of new entries (a block's oldest first), sorted by block. New entries are
    format-3 pieces: they carry no digest (theirs is in the pack)."""
    blocks = sorted(entries)
    rows = [(b, *p[:7]) for b in blocks for p in entries[b]]
    table = np.array(rows, np.int64).reshape(len(rows), 8)
    keys, kinds, packs, offsets, stored, flags, starts, lengths = table.T
    partial = (kinds == EXTENT) | (kinds == ZERO_EXTENT)
    digests = None
    return Columns(
        keys.astype(np.uint64),
        np.where(packs < 0, NO_PACK, packs).astype(np.uint32),
        offsets.astype(np.uint32),
        (stored | kinds << 24 | flags << 27).astype(np.uint32),
        np.where(partial, starts << 32 | lengths, 0).astype(np.uint64),
        digests,
    )


class ObjectBlockStore:
    """The reference block store: packs of compressed pieces plus a committed manifest."""

    def __init__(
        self,
        objects: ObjectStore,
        head: Head,
        head_etag: str | None,
        block_map: BlockMap,
        *,
        lease: Lease | None = None,
        pack_size: int = 4 << 20,
        concurrency: int = 8,
    ) -> None:
        self.objects = objects
        self.head = head
        self.block_size = head.block_size
        self.blocks = block_count(head.size, head.block_size)
        self._head_etag = head_etag
        self._map = block_map
        self._pending: dict[int, list[Piece]] = {}
        self._pending_since: float | None = None
        self._unsent: dict[str, bytes] = {}
        """Packs of pending pieces that wait for the flush to upload them (see _upload)."""
        self._unknown: list[_Attempt] = []
        """Head puts whose outcome is unknown, all made on the head we last saw."""
        self.lineage = bytes.fromhex(head.lineage) if head.lineage else new_lineage()
        self.lease = lease
        self.pack_size = min(max(pack_size, head.block_size), 1 << 30)
        self.limiter = trio.CapacityLimiter(concurrency)
        self._commit_lock = trio.Lock()
        self._lease_lock = trio.Lock()
        self._compact_lock = trio.Lock()
        self.stats = StoreStats()
        self.fenced = False
        self.fold_candidates: set[int] = set()
        self._watch: set[int] = set()
        """Blocks a fold is working on; a write to one drops it from the fold."""
        self.changed = trio.Event()
        """Set (and replaced) at every commit: what a compactor waits for."""

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
        """Read the head and the map's indexes (no blocks, no pages); take the lease and
        fence older writers."""
        if checkpoint is not None:
            if writable:
                raise ReadOnly(f"checkpoint {disk}@{checkpoint} is immutable: open it read-only")
            head, block_map = await run_sync(load_checkpoint, objects, disk, checkpoint)
            return cls(objects, head, None, block_map, **kwargs)
        if not writable:
            head, etag, block_map = await run_sync(load_current, objects, disk)
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
        delay = 0.005
        while True:
            head, etag, block_map = await run_sync(load_current, objects, disk)
            if head.epoch >= lease.epoch:
                raise await run_sync(_taken_while_opening, objects, disk, head)
            store = cls(objects, head, etag, block_map, lease=lease, **kwargs)
            try:
                await store._commit(store._prepare_flush, lambda: True, fencing=True)
                return store
            except _HeadMoved:
                log.debug("disk %r: an older writer committed during the takeover; again", disk)
                if trio.current_time() >= deadline:
                    raise BlockStoreError(
                        f"disk {disk!r}: could not fence the previous writer, whose commits "
                        f"went on for {max(lease.ttl, 5.0):.0f}s after this one took the lease"
                    ) from None
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)

    # ------------------------------------------------------------ the map

    async def _load_pages(self, refs: Sequence[PageRef]) -> None:
        if not refs:
            return
        head, block_map = self.head, self._map

        def loader(ref: PageRef) -> Callable[[], Awaitable[None]]:
            async def load() -> None:
                await run_sync(
                    load_page, self.objects, ref, block_map.packs, head, limiter=self.limiter
                )
                self.stats.map_gets += 1

            return load

        await parallel([loader(r) for r in refs])

    def load_page_blocking(self, ref: PageRef) -> None:
        """For merges in a worker thread."""
        if ref.page is None:
            load_page(self.objects, ref, self._map.packs, self.head)
            self.stats.map_gets += 1

    async def load_map(self) -> None:
        """Every page of the map, now (a full scan would read them anyway)."""
        await self._load_pages([p for run in self._map.runs for p in run.pages if p.page is None])

    async def recount(self) -> tuple[int, int]:
        """(stored blocks, stored bytes) counted from the whole map and what is pending:
        what the head's incrementally kept figures must equal (a check; reads every page)."""
        await self.load_map()
        keys: set[int] = set(self._pending)
        for run in self._map.runs:
            for ref in run.pages:
                assert ref.page is not None
                keys.update((ref.page.keys.astype(np.int64) + ref.page.base).tolist())
        blocks = stored = 0
        for b in keys:
            held, size = _held(self._layers(b))
            blocks, stored = blocks + held, stored + size
        return blocks, stored

    def map_nbytes(self) -> int:
        """Memory the loaded map takes (its arrays, page and pack tables)."""
        return self._map.nbytes()

    @property
    def segments(self) -> int:
        return len(self._map.runs)

    def _layers(self, block: int) -> list[Piece]:
        """Pending entries over committed ones (the committed pages must be loaded)."""
        pending = self._pending.get(block)
        if pending and pending[0].replaces:
            return pending
        committed = self._map.lookup(block)
        if not pending:
            return committed
        return committed + pending

    async def _layers_of(self, blocks: Sequence[int]) -> dict[int, list[Piece]]:
        need = [b for b in blocks if not (p := self._pending.get(b)) or not p[0].replaces]
        await self._load_pages(self._map.unloaded(need))
        return {b: self._layers(b) for b in blocks}

    async def list_blocks(self) -> dict[int, bool]:
        states = await self.block_states(0, self.blocks)
        return {b: s == 1 for b, s in enumerate(states) if s}

    async def block_states(self, first: int, count: int) -> bytes:
        count = max(0, min(count, self.blocks - first))
        await self._load_pages(self._map.unloaded_in(first, first + count))
        states = self._map.states(first, count)
        end = first + count
        if len(self._pending) <= count:
            pending = [(b, p) for b, p in self._pending.items() if first <= b < end]
        else:
            pending = [(b, self._pending[b]) for b in range(first, end) if b in self._pending]
        for b, pieces in pending:
            states[b - first] = _state(pieces) if pieces[0].replaces else 1
        return states.tobytes()

    # ------------------------------------------------------------ reads

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, BlockValue]:
        out: dict[int, BlockValue] = {}
        for b, v in (await self.read_layers(blocks)).items():
            if isinstance(v, Layered):
                raise BlockStoreError(
                    f"block {b} holds extents over the base image: read it with read_layers"
                )
            out[b] = v
        return out

    async def read_layers(self, blocks: Sequence[int]) -> dict[int, BlockValue | Layered]:
        layers = await self._layers_of(blocks)
        contents = await self._fetch(
            [(b, p) for b, pieces in layers.items() for p in pieces if p.kind in (DATA, EXTENT)]
        )
        return {b: self._assemble(b, pieces, contents) for b, pieces in layers.items()}

    def _assemble(
        self, block: int, pieces: list[Piece], contents: dict[tuple[int, int], bytes]
    ) -> BlockValue | Layered:
        if not pieces:
            return None
        under: BlockValue = None
        first = pieces[0]
        rest = pieces
        if first.replaces:
            rest = pieces[1:]
            under = (
                contents[(first.pack, first.offset)]
                if first.kind == DATA
                else (b"" if first.kind == ZERO else None)
            )
        if not rest:
            return under
        extents = tuple(
            (p.start, contents[(p.pack, p.offset)] if p.kind == EXTENT else bytes(p.length))
            for p in rest
        )
        if under is None and self.head.base_digest is not None:
            return Layered(extents)
        buf = bytearray(under) if under else bytearray(self.block_size)
        for start, data in extents:
            buf[start : start + len(data)] = data
        return bytes(buf)

    async def _fetch(self, items: list[tuple[int, Piece]]) -> dict[tuple[int, int], bytes]:
        """The verified content of pieces, by (pack, offset), in coalesced ranged GETs."""
        result: dict[tuple[int, int], bytes] = {}
        by_pack: dict[int, dict[int, tuple[int, Piece]]] = defaultdict(dict)
        for b, p in items:
            by_pack[p.pack][p.offset] = (b, p)
        ranges: list[list[tuple[int, Piece]]] = []
        for group in by_pack.values():
            ordered = [group[o] for o in sorted(group)]
            current = [ordered[0]]
            for it in ordered[1:]:
                last = current[-1][1]
                start = current[0][1].offset
                gap = it[1].offset - (last.offset + last.stored)
                if 0 <= gap <= 256 << 10 and it[1].offset + it[1].stored - start <= 16 << 20:
                    current.append(it)
                else:
                    ranges.append(current)
                    current = [it]
            ranges.append(current)

        def fetcher(group: list[tuple[int, Piece]]) -> Callable[[], Awaitable[None]]:
            async def fetch() -> None:
                result.update(await run_sync(self._fetch_range, group, limiter=self.limiter))

            return fetch

        await parallel([fetcher(g) for g in ranges])
        return result

    def _fetch_range(self, group: list[tuple[int, Piece]]) -> dict[tuple[int, int], bytes]:
        packs = self._map.packs
        pack = group[0][1].pack
        key = packs.key(pack)
        start = group[0][1].offset
        end = max(p.offset + p.stored for _, p in group)
        unsent = self._unsent.get(key)  # a pack that waits for the flush
        if unsent is not None:
            data = unsent[start:end]
        else:
            try:
                data = self.objects.get_range(key, start, end - start)
            except ObjectNotFound:
                raise CorruptBlock(key, group[0][0], "object is missing from the store") from None
            self.stats.gets += 1
            self.stats.bytes_downloaded += len(data)
        out: dict[tuple[int, int], bytes] = {}
        view = memoryview(data)
        for block, p in group:
            raw = view[p.offset - start : p.offset - start + p.stored]
            if len(raw) != p.stored:
                raise CorruptBlock(key, block, f"object is truncated ({len(data)} bytes read)")
            try:
                if p.flags & LEGACY:
                    assert p.digest is not None
                    content = decode_legacy(
                        bytes(raw),
                        flags=p.flags,
                        digest=p.digest,
                        lineage=packs.lineages[pack],
                        block=block,
                        block_size=self.block_size,
                    )
                else:
                    lineage = packs.lineages[pack]
                    if lineage is None:
                        raise ValueError("a format-3 piece in a pack without a lineage")
                    content = decode_piece(
                        raw,
                        lineage=lineage,
                        pack=packs.uuids[pack],
                        offset=p.offset,
                        block=block,
                        start=p.start if p.kind == EXTENT else 0,
                        length=p.length if p.kind == EXTENT else self.block_size,
                        flags=p.flags,
                    )
            except ValueError as e:
                raise CorruptBlock(key, block, str(e)) from None
            out[(pack, p.offset)] = content
        self.stats.blocks_fetched += len(group)
        return out

    # ------------------------------------------------------------ writes

    async def write_blocks(self, blocks: Mapping[int, BlockValue]) -> None:
        if not self.writable:
            raise ReadOnly("this disk is open read-only")
        plain: dict[int, list[Piece]] = {}
        data: list[tuple[int, int, bytes | memoryview]] = []
        for b, value in blocks.items():
            if value is None:
                plain[b] = [Piece(TOMB, -1, 0, 0, 0, 0, 0)]
            elif value == b"":
                plain[b] = [Piece(ZERO, -1, 0, 0, 0, 0, 0)]
            else:
                if len(value) != self.block_size:
                    raise ValueError(f"block {b}: {len(value)} bytes, expected {self.block_size}")
                data.append((b, 0, value))
        uploaded = await self._upload(data, defer=True)
        self._watch.difference_update(blocks)
        self._note_pending()
        for b, pieces in plain.items():
            self._pending[b] = pieces
        for (b, _, _), piece in zip(data, uploaded, strict=True):
            self._pending[b] = [piece]
        self.stats.blocks_uploaded += len(data)

    async def write_extents(self, extents: Mapping[int, Sequence[Extent]]) -> None:
        if not self.writable:
            raise ReadOnly("this disk is open read-only")
        data: list[tuple[int, int, bytes | memoryview]] = []
        for b, parts in extents.items():
            for start, value in parts:
                n = value if isinstance(value, int) else len(value)
                if not 0 <= start < start + n <= self.block_size or not 0 <= b < self.blocks:
                    raise ValueError(f"block {b}: extent {start}+{n} outside the block")
                if not isinstance(value, int):
                    data.append((b, start, value))
        uploaded = iter(await self._upload(data, defer=True))
        self._watch.difference_update(extents)
        self._note_pending()
        for b, parts in extents.items():
            new = []
            for start, value in parts:
                if isinstance(value, int):
                    new.append(Piece(ZERO_EXTENT, -1, start, 0, 0, start, value))
                else:
                    new.append(next(uploaded))
            self._pending[b] = _lay(self._pending.get(b, []), new)
        self.stats.extents_uploaded += len(data)

    def _note_pending(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.time()

    def _create(self, key: str, body: bytes) -> None:
        """Upload a new immutable object (idempotent, see put_new)."""
        if not put_new(self.objects, key, body):
            raise BlockStoreError(f"{key} already exists with other content")
        self.stats.puts += 1
        self.stats.bytes_uploaded += len(body)

    async def _upload(
        self, items: list[tuple[int, int, bytes | memoryview]], *, defer: bool = False
    ) -> list[Piece]:
        """Pieces of (block, start, data), packed and uploaded in parallel, in order.

        With ``defer``, a write smaller than a pack is only encoded: the flush uploads it
        beside the manifest segment that names it, so a durable flush of a few small writes
        costs two round trips (pack and segment together, then the head), not three. At
        most a pack's worth waits; reads of its pieces are answered from memory."""
        total = sum(len(value) for _, _, value in items)
        if defer and items and total + sum(map(len, self._unsent.values())) <= self.pack_size:
            key, body, pieces = await run_sync(self._encode_pack, items, limiter=self.limiter)
            self._unsent[key] = body
            return pieces
        groups: list[tuple[int, int]] = []
        size = lo = 0
        for i, (_, _, value) in enumerate(items):
            # Content counts, not headers: a pack of whole blocks holds a whole number of
            # them, so read-ahead windows do not straddle packs.
            if size and size + len(value) > self.pack_size:
                groups.append((lo, i))
                size, lo = 0, i
            size += len(value)
        if items:
            groups.append((lo, len(items)))
        out: list[list[Piece]] = [[] for _ in groups]

        def uploader(g: int) -> Callable[[], Awaitable[None]]:
            async def upload() -> None:
                lo, hi = groups[g]
                out[g] = await run_sync(self._upload_pack, items[lo:hi], limiter=self.limiter)

            return upload

        await parallel([uploader(g) for g in range(len(groups))])
        return [p for part in out for p in part]

    def _upload_pack(self, group: list[tuple[int, int, bytes | memoryview]]) -> list[Piece]:
        key, body, pieces = self._encode_pack(group)
        self._create(key, body)
        return pieces

    def _encode_pack(
        self, group: list[tuple[int, int, bytes | memoryview]]
    ) -> tuple[str, bytes, list[Piece]]:
        pack_uuid = uuid.uuid4().bytes
        index = self._map.packs.add(pack_uuid, self.lineage)
        writer = PackWriter(self.lineage, pack_uuid)
        pieces: list[Piece] = []
        bs = self.block_size
        for block, start, data in group:
            offset, stored, flags = writer.add(block, start, data)
            if start == 0 and len(data) == bs:
                pieces.append(Piece(DATA, index, offset, stored, flags, 0, 0))
            else:
                pieces.append(Piece(EXTENT, index, offset, stored, flags, start, len(data)))
        return f"{PACKS}{pack_uuid.hex()}", writer.body(), pieces

    async def _send_unsent(self) -> None:
        """Upload the packs that wait for this flush (concurrently)."""

        def sender(key: str, body: bytes) -> Callable[[], Awaitable[None]]:
            async def send() -> None:
                await run_sync(self._create, key, body, limiter=self.limiter)
                self._unsent.pop(key, None)

            return send

        senders = [sender(k, b) for k, b in list(self._unsent.items())]
        if len(senders) == 1:
            await senders[0]()  # its thread starts now, not a scheduling round later
        else:
            await parallel(senders)

    # ------------------------------------------------------------ commits

    async def flush(self) -> None:
        """Commit every block written so far: upload the manifest delta, then the head."""
        if not self.writable:
            return
        async with self._commit_lock:
            if not self._pending:
                if self.fenced:
                    raise self._fenced_error()
                return
            await self._commit(self._prepare_flush, lambda: not self._pending, fencing=False)

    async def renew_lease(self) -> None:
        lease = self.lease
        if lease is not None:
            async with self._lease_lock:
                await self._renew(lease)

    def _fenced_error(self) -> Fenced:
        if self.lease is not None and self.lease.expired:
            return self.lease.expire()
        return Fenced(f"disk {self.head.disk!r}: this writer was fenced by a newer one")

    async def _renew(self, lease: Lease) -> None:
        """Renew, but give up when the lease expires: a store that does not answer (its
        requests hang on their timeouts and retries) fences this writer at the TTL, not
        minutes later. An abandoned renewal may still land: harmless, nothing commits."""
        left = lease.renewed + lease.ttl - time.time()
        try:
            with trio.fail_after(max(left, 0.0)):
                await trio.to_thread.run_sync(lease.renew, abandon_on_cancel=True)
        except trio.TooSlowError:
            self.fenced = True
            raise lease.expire() from None
        except Fenced:
            self.fenced = True
            raise

    async def _confirm_lease(self) -> None:
        """No commit without a lease known to be ours and unexpired (see CONFIRM_FRACTION)."""
        lease = self.lease
        assert lease is not None
        if not lease.needs_confirmation():
            return
        async with self._lease_lock:
            if lease.needs_confirmation():
                await self._renew(lease)

    async def _commit(
        self,
        prepare: Callable[[], Awaitable[_Attempt]],
        done: Callable[[], bool],
        *,
        fencing: bool,
    ) -> None:
        """Put a head prepared by ``prepare`` (again, on the head then current, until it or
        an earlier attempt lands and ``done()`` says nothing is left)."""
        if self.fenced:
            raise self._fenced_error()
        lease = self.lease
        assert lease is not None
        if self._pending_since and time.time() - self._pending_since > GC_GRACE / 2:
            self._pending.clear()
            self._unsent.clear()
            self._pending_since = None
            raise BlockStoreError(
                "uploads pending for longer than half the GC grace period may have been "
                "collected; write the data again and flush"
            )
        error: Exception | None = None
        confirmed = False
        for _attempt in range(_COMMIT_ATTEMPTS):
            if self._unknown:
                # An earlier flush's put may have landed: look before writing on top.
                seen = await run_sync(read_head, self.objects, self.head.disk)
                if self._settle(seen) and (fencing or done()):
                    return
            attempt = await self._prepare_confirmed(prepare, confirmed)
            confirmed = True
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
                if fencing or done():
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

    async def _prepare_confirmed(
        self, prepare: Callable[[], Awaitable[_Attempt]], confirmed: bool
    ) -> _Attempt:
        """``prepare()``, after confirming the lease if not ``confirmed`` yet (a takeover's
        retries may outlast a confirmation too). The two overlap: preparing uploads only
        new objects, which commit nothing until the head that names them is put."""
        if confirmed:
            return await prepare()
        prepared: list[_Attempt] = []
        failed: list[Exception] = []

        async def prepare_one() -> None:
            try:
                prepared.append(await prepare())
            except Exception as e:  # not a reason to cut the confirmation short
                failed.append(e)

        await parallel([self._confirm_lease, prepare_one])
        if failed:
            raise failed[0]
        return prepared[0]

    def _settle(self, current: tuple[Head, str]) -> bool:
        """If the head is one of our attempts whose outcome was unknown, it is ours: adopt it."""
        head, etag = current
        for attempt in self._unknown:
            if attempt.head.commit_id == head.commit_id:
                self._apply(attempt, etag)
                return True
        return False

    async def _new_run(self, entries: Mapping[int, Sequence[Piece]] | Columns, level: int) -> Run:
        """Upload a segment of the entries; the run that names it."""
        cols = entries if isinstance(entries, Columns) else columns_of(entries)
        key = f"{SEGMENTS}{uuid.uuid4().hex}"
        packs = self._map.packs

        def encode_and_upload() -> Run:
            encoded = encode_segment(key, new_refs(build_pages(cols)), packs)
            self._create(key, encoded.body)
            ref = SegmentRef(
                key,
                encoded.index_sha256,
                True,
                encoded.index_offset,
                encoded.index_length,
                encoded.entries,
                level,
            )
            return Run(ref, encoded.refs, level)

        return await run_sync(encode_and_upload)

    async def _prepare_flush(self) -> _Attempt:
        """The next head, with a segment of everything pending (if anything is)."""
        pending = dict(self._pending)
        runs = list(self._map.runs)
        if not pending:
            return self._attempt(runs, self.head.stored_blocks, self.head.stored_bytes, pending)
        new: list[tuple[Run, int, int]] = []

        async def segment() -> None:
            await trio.lowlevel.checkpoint()  # the packs' upload starts first
            totals = await self._pending_totals(pending)
            new.append((await self._new_run(columns_of(pending), 0), *totals))

        # The packs go first: their upload is the longest, and the segment's preparation
        # overlaps it.
        await parallel([self._send_unsent, segment])
        run, total_blocks, total_bytes = new[0]
        return self._attempt([*runs, run], total_blocks, total_bytes, pending)

    async def _pending_totals(self, pending: dict[int, list[Piece]]) -> tuple[int, int]:
        """The disk's stored blocks and bytes once ``pending`` is committed; notes the
        blocks worth folding."""
        await self._load_pages(self._map.unloaded(pending))
        cols = columns_of(pending)
        keys = cols.keys[np.r_[True, cols.keys[1:] != cols.keys[:-1]]]
        old_held, old_stored, old_extents = self._map.summarize(keys)
        kinds = (cols.meta >> np.uint32(24)) & np.uint32(7)
        if len(keys) == len(cols) and not ((kinds == EXTENT) | (kinds == ZERO_EXTENT)).any():
            # Whole blocks only (one entry each): the new figures follow from the columns.
            held = kinds == DATA
            stored = np.where(held, cols.meta & np.uint32(0xFFFFFF), 0).astype(np.int64)
        else:
            held, stored = old_held.copy(), old_stored.copy()
            for i, b in enumerate(keys.tolist()):
                mine = pending[b]
                h, size = _held(mine)
                extents = _extents(mine)
                if mine[0].replaces:
                    held[i], stored[i] = h, size
                else:
                    held[i] |= bool(h)
                    stored[i] += size
                    extents += int(old_extents[i])
                # Folding rewrites the block: worth it once its extents hold about as
                # much as the block (a fold then costs at most what they cost), or once
                # there are so many that a read would fetch too many pieces.
                if extents >= FOLD_EXTENTS or (extents > 1 and stored[i] >= 2 * self.block_size):
                    self.fold_candidates.add(b)
        total_blocks = self.head.stored_blocks + int(held.sum()) - int(old_held.sum())
        total_bytes = self.head.stored_bytes + int(stored.sum()) - int(old_stored.sum())
        return total_blocks, total_bytes

    def _attempt(
        self, runs: list[Run], blocks: int, stored: int, pending: dict[int, list[Piece]]
    ) -> _Attempt:
        assert self.lease is not None
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
            segments=[run.ref for run in runs],
            parent=base.parent,
            stored_blocks=blocks,
            # Only a block with more unfolded extents than the bound allows (compaction far
            # behind) could exceed it; the head's accounting is capped rather than refused.
            stored_bytes=min(stored, blocks * base.block_size * STORED_PER_BLOCK),
            format=FORMAT_VERSION,
            lineage=self.lineage.hex(),
        )
        problem = head_problem(head)
        if problem:
            raise BlockStoreError(f"refusing to commit an invalid head of {base.disk!r}: {problem}")
        return _Attempt(head, pending, runs)

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
        self._map.runs = attempt.runs
        self.stats.puts += 1
        self.stats.commits += 1
        for b, e in attempt.pending.items():
            if self._pending.get(b) is e:
                del self._pending[b]
        if not self._pending:
            self._pending_since = None
        self._unknown.clear()
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    # ------------------------------------------------------------ compaction

    async def compact(self, base: BaseReader | None = None) -> bool:
        """One step of background compaction: a merge of segments, or a fold of blocks
        with many extents into whole blocks. False when there was nothing to do. Safe to
        run beside writes and flushes: each step commits through the head like a flush,
        holding the commit lock only for that."""

        if not self.writable or self.fenced:
            return False
        async with self._compact_lock:
            if await merge_step(self):
                return True
            return await fold_step(self, base)

    def merge_due(self) -> bool:
        """A merge is due: it keeps the runs a reader consults few, so it never waits."""
        return plan(self._map.runs) is not None

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
        async with self._commit_lock:
            head = self.head
            return await run_sync(save_checkpoint, self.objects, head, tag)


def _lay(old: list[Piece], new: list[Piece]) -> list[Piece]:
    """Pending entries with new pieces over them: older extents that a new one covers
    whole are dropped, and everything under a new whole block (a new list: commits
    recognise what they took by identity)."""
    out = list(old)
    for piece in new:
        if piece.replaces:
            # A whole block (an extent as large as the block is stored as one): nothing
            # before it counts. Appended after older extents, reads would skip it.
            out = [piece]
            continue
        end = piece.start + piece.length
        out = [
            p
            for p in out
            if p.replaces or not (piece.start <= p.start and p.start + p.length <= end)
        ]
        out.append(piece)
    return out
