"""A disk: byte-addressed reads and writes over a block store and an optional base image.

Writes land in a bounded write-back cache and reach the block store on ``flush()`` or, in
the background, once the cache passes its soft limit. A write smaller than a block records
only the bytes it changes (a *patch*): the block's old content is not read to complete it.
On a store that takes extents (:class:`ExtentBlockStore`) a flush sends only those bytes;
on any other store the flush completes the block then (reading it once). Past its memory
budget a writer waits for that background flush while the store accepts uploads, and
spills whole dirty blocks to an unlinked local file while the store is failing, waiting
only past the hard limit. Reads compose the write-back cache over the store's content,
from a bounded LRU of it or the block store in parallel batches with sequential
read-ahead, falling through to the base image (or zeros) for blocks the store does not
hold. On a store that compacts (the reference one), a background task runs its steps.

The clean LRU holds the *store's* content of blocks; patches lie over it. Concurrency:
state changes that belong together happen with no ``await`` between them; a store fetch
that a flush overtakes (it wrote the block meanwhile) is not cached.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from . import spans as sp
from .concurrency import run_sync
from .errors import BaseMismatch, Fenced, OutOfRange, ReadOnly
from .local import BaseImage, SpillFile, sha256_file
from .protocol import BlockStore, BlockValue, ExtentBlockStore, Layered
from .store import ObjectBlockStore

__all__ = ["HOLE", "ZERO_FLAG", "BaseImage", "Disk", "DiskStats", "sha256_file"]

log = logging.getLogger(__name__)

HOLE = 1
ZERO_FLAG = 2


@dataclass(frozen=True)
class _Spilled:
    slot: int


class _Over:
    """What a patch lies over."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


STORE, ZEROS, BASE = _Over("store"), _Over("zeros"), _Over("base")


@dataclass(frozen=True, eq=False)
class _Patch:
    """Bytes written into a block over its store content (or zeros, the base image, or a
    whole block spilled to the local file)."""

    spans: tuple[sp.Span, ...]
    over: _Over | _Spilled

    @property
    def cost(self) -> int:
        return sp.data_bytes(self.spans) + 64 * len(self.spans)


_Dirty = BlockValue | _Spilled | _Patch
_ABSENT = object()

MAX_READ_STREAMS = 8
COMPACTION_SHARE_PAUSE = 1.0
"""Seconds a compaction step waits at most, while the disk is being written, before a fold
(it waits as long as the step took: folds then take at most half the time)."""


@dataclass
class _ReadStream:
    """One sequential reader: the block it should read next, its read-ahead window, and
    the block read-ahead has reached."""

    next: int
    window: int
    until: int


class _Round:
    """One flush's snapshot of the dirty blocks. A flush call begun before a round took
    its snapshot is answered by that round's success: concurrent flushes (a queue of NBD
    FLUSH requests, several fsyncs) share one commit instead of committing one by one."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False


@dataclass
class DiskStats:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    partial_writes: int = 0
    flushes: int = 0


class Disk:
    """Byte-level access to a block store; use ``async with Disk(...)``."""

    def __init__(
        self,
        store: BlockStore,
        size: int,
        *,
        base: BaseImage | None = None,
        base_digest: str | None = None,
        read_only: bool = False,
        cache_bytes: int = 128 << 20,
        dirty_memory: int = 64 << 20,
        dirty_soft_limit: int = 32 << 20,
        dirty_hard_limit: int = 1 << 30,
        readahead_max: int = 64 << 20,
        spill_dir: str | None = None,
        lease_renew_interval: float | None = None,
        compact: bool = True,
    ) -> None:
        if base is not None and base_digest is not None and base.digest != base_digest:
            raise BaseMismatch(
                f"base image {base.path} has sha256 {base.digest}, but the disk was created on "
                f"{base_digest}: open it with the same base image it was created from"
            )
        if base is None and base_digest is not None:
            raise BaseMismatch(
                f"the disk was created on a base image (sha256 {base_digest}): pass it to open"
            )
        self.store = store
        self._extent_store = store if isinstance(store, ExtentBlockStore) else None
        self.size = size
        self.block_size = store.block_size
        self.base = base
        self.read_only = read_only
        self.cache_bytes = cache_bytes
        self.dirty_memory = dirty_memory
        self.dirty_soft_limit = max(dirty_soft_limit, self.block_size)
        self.dirty_hard_limit = max(dirty_hard_limit, 2 * self.dirty_soft_limit)
        # Read-ahead lands in the clean cache: a window past a quarter of it would evict
        # what it fetched before the reader gets there.
        self.readahead_max = min(readahead_max, cache_bytes // 4) // self.block_size
        self.spill_dir = spill_dir
        self.lease_renew_interval = lease_renew_interval
        self.compact_in_background = compact
        self.stats = DiskStats()
        self._zero = bytes(self.block_size)
        self._clean: OrderedDict[int, bytes] = OrderedDict()
        self._clean_bytes = 0
        self._dirty: dict[int, _Dirty] = {}
        self._flushing: dict[int, _Dirty] = {}
        self._dirty_mem = 0
        self._dirty_upload = 0
        """What a flush of the dirty blocks would upload (whole blocks, or patches' bytes)."""
        self._spill: SpillFile | None = None
        self._inflight: dict[int, trio.Event] = {}
        self._stale: set[int] = set()
        self._flush_lock = trio.Lock()
        self._next_round = _Round()
        self._round: _Round | None = None
        """The round under way, if any."""
        self._flush_wanted = trio.Event()
        self._flush_done = trio.Event()
        self._drained = trio.Event()
        self._background_error: BaseException | None = None
        self._streams: list[_ReadStream] = []
        self._nursery: trio.Nursery | None = None
        self._compactor: trio.CancelScope | None = None
        self._compactor_done = trio.Event()
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Disk:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        if not self.read_only:
            self._nursery.start_soon(self._background_flusher)
            if isinstance(self.store, ObjectBlockStore) and self.store.lease is not None:
                self._nursery.start_soon(self._lease_renewer, self.store)
                if self.compact_in_background:
                    self._compactor = trio.CancelScope()
                    self._nursery.start_soon(self._background_compactor, self.store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Flush and release on a clean exit; on an error only release (unflushed data is
        not promised). The caller's exception propagates as itself, not as a group."""
        assert self._nursery is not None
        try:
            if exc[0] is None:
                await self.close()
        finally:
            # A caller cancelled (Ctrl-C, a timeout) must still stop the tasks and release
            # the lease: unshielded, the first await raised Cancelled and left both, and
            # the nursery entered by __aenter__ unexited (trio's scope stack corrupt).
            with trio.CancelScope(shield=True):
                await self._stop_compactor()
            self._nursery.cancel_scope.cancel()
            try:
                await self._nursery_cm.__aexit__(None, None, None)
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    if exc[0] is None:
                        await self._release()
                    else:
                        try:
                            await self._release()
                        except Exception as e:
                            log.warning("could not release the lease (it will expire): %s", e)

    async def close(self) -> None:
        """Flush and release the lease; the disk can no longer be used."""
        if self._closed:
            return
        await self._stop_compactor()
        if not self.read_only:
            await self.flush()
        await self._release()

    async def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_compactor()
        if isinstance(self.store, ObjectBlockStore):
            with trio.CancelScope(shield=True):
                await self.store.release()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.base is not None:
            self.base.close()

    async def _lease_renewer(self, store: ObjectBlockStore) -> None:
        assert store.lease is not None
        interval = self.lease_renew_interval or store.lease.ttl / 3
        while store.lease is not None and not store.fenced:
            await trio.sleep(interval)
            try:
                await store.renew_lease()
            except Exception as e:
                log.warning("lease renewal for %s failed: %s", store.head.disk, e)
                if store.lease is not None and store.lease.lost:
                    store.fenced = True
                    return

    async def _background_flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            try:
                await self.flush()
                self._background_error = None
            except Exception as e:
                self._background_error = e
                self._signal_drained()
                log.warning("background flush failed (will retry): %s", e)
                await trio.sleep(1.0)

    async def _background_compactor(self, store: ObjectBlockStore) -> None:
        """Compaction steps while there is work, then wait for the next commit."""
        assert self._compactor is not None
        delay = 1.0
        try:
            with self._compactor:
                while store.lease is not None and not store.fenced:
                    began = trio.current_time()
                    try:
                        worked = await store.compact(self._base_blocks)
                        delay = 1.0
                    except Fenced:
                        return
                    except Exception as e:
                        log.warning("compaction of %s failed (will retry): %s", store.head.disk, e)
                        await trio.sleep(delay)
                        delay = min(delay * 2, 60.0)
                        continue
                    if not worked:
                        with trio.move_on_after(30):
                            await store.changed.wait()
                    elif self._being_written() and not store.merge_due():
                        # A fold's reads and uploads compete with the flushes' for the
                        # store: unpaced, they halved what a writer that flushes often got
                        # through.
                        took = trio.current_time() - began
                        with trio.move_on_after(min(took, COMPACTION_SHARE_PAUSE)):
                            while not store.merge_due():  # which cuts the pause short
                                await store.changed.wait()
        finally:
            self._compactor_done.set()

    def _being_written(self) -> bool:
        """Writes wait to be flushed, or a flush is under way."""
        return bool(self._dirty or self._flushing)

    async def _stop_compactor(self) -> None:
        """Stop background compaction at its next step (a step's commit is never cut)."""
        if self._compactor is not None:
            self._compactor.cancel()
            await self._compactor_done.wait()

    async def compact(self) -> int:
        """Run compaction steps until none is due (tests and tools; the background task
        does the same); how many ran."""
        compact = getattr(self.store, "compact", None)
        steps = 0
        while compact is not None and await compact(self._base_blocks):
            steps += 1
        return steps

    async def _base_blocks(self, blocks: list[int]) -> dict[int, bytes]:
        base, bs = self.base, self.block_size
        if base is None:
            return {b: self._zero for b in blocks}
        return await run_sync(lambda: {b: base.read(b * bs, bs) for b in blocks})

    # ----------------------------------------------------------------- helpers

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(
                f"range {offset}+{length} is outside the disk (size {self.size} bytes)"
            )

    def _base_block_if_cheap(self, block: int) -> bytes | None:
        if self.base is None or block * self.block_size >= self.base.size:
            return self._zero
        return None

    def _remember_clean(self, block: int, data: bytes) -> None:
        """Cache the store's content of a block (not for blocks wholly rewritten in the
        write-back cache: it would only hide behind them)."""
        if block in self._stale or block in self._clean:
            return
        for table in (self._dirty, self._flushing):
            v = table.get(block, _ABSENT)
            if v is not _ABSENT and not isinstance(v, _Patch):
                return
        cost = 0 if data is self._zero else len(data)
        self._clean[block] = data
        self._clean_bytes += cost
        while self._clean_bytes > self.cache_bytes and self._clean:
            _, old = self._clean.popitem(last=False)
            self._clean_bytes -= 0 if old is self._zero else len(old)

    def _forget_clean(self, block: int) -> None:
        old = self._clean.pop(block, None)
        if old is not None:
            self._clean_bytes -= 0 if old is self._zero else len(old)

    def _composition(self, block: int) -> tuple[object, list[_Patch]]:
        """How to read a block now: its bottom (bytes; STORE, BASE, or a spill slot) and
        the patches over it, oldest first."""
        patches: list[_Patch] = []
        for table in (self._dirty, self._flushing):
            if block not in table:
                continue
            v = table[block]
            if isinstance(v, _Patch):
                patches.append(v)
                if v.over is STORE:
                    continue
                bottom: object = v.over if isinstance(v.over, _Spilled) else BASE
                return (self._zero if v.over is ZEROS else bottom), patches[::-1]
            return self._full(v), patches[::-1]
        return STORE, patches[::-1]

    def _full(self, v: _Dirty) -> object:
        if isinstance(v, _Spilled):
            return v
        if v is None:
            return BASE
        return self._zero if v == b"" else v

    async def _load(self, blocks: list[int]) -> dict[int, bytes]:
        """Current content of blocks, fetching what no cache holds (deduplicating in-flight)."""
        plans = {b: self._composition(b) for b in blocks}
        bottoms: dict[int, bytes] = {}
        from_store: list[int] = []
        from_base: list[int] = []
        spilled: list[tuple[int, int]] = []
        for b, (bottom, _) in plans.items():
            if isinstance(bottom, bytes):
                bottoms[b] = bottom
            elif bottom is BASE:
                cheap = self._base_block_if_cheap(b)
                if cheap is None:
                    from_base.append(b)
                else:
                    bottoms[b] = cheap
            elif isinstance(bottom, _Spilled):
                spilled.append((b, bottom.slot))
            else:
                from_store.append(b)
        if spilled:
            spill = self._spill
            assert spill is not None
            slots = [slot for _, slot in spilled]
            with spill.pinned(slots):
                datas = await run_sync(lambda: [spill.read(s) for s in slots])
            bottoms.update(zip((b for b, _ in spilled), datas, strict=True))
        if from_base:
            bottoms.update(await self._base_blocks(from_base))
        if from_store:
            bottoms.update(await self._store_content(from_store))
        result: dict[int, bytes] = {}
        for b, (_, patches) in plans.items():
            data = bottoms[b]
            for patch in patches:
                data = sp.apply(patch.spans, data)
            result[b] = data
        return result

    async def _store_content(self, blocks: list[int]) -> dict[int, bytes]:
        result: dict[int, bytes] = {}
        missing: list[int] = []
        waits: list[tuple[int, trio.Event]] = []
        for b in blocks:
            data = self._clean.get(b)
            if data is not None:
                self._clean.move_to_end(b)
                result[b] = data
            elif b in self._inflight:
                waits.append((b, self._inflight[b]))
            else:
                missing.append(b)
        if missing:
            result.update(await self._fetch(missing))
        for b, event in waits:
            await event.wait()
            result[b] = (await self._store_content([b]))[b]
        return result

    async def _fetch(self, blocks: list[int]) -> dict[int, bytes]:
        """The store's content of blocks (base image or zeros where it holds none)."""
        events = {b: trio.Event() for b in blocks}
        self._inflight.update(events)
        try:
            if self._extent_store is not None:
                values = await self._extent_store.read_layers(blocks)
            else:
                values = dict(await self.store.read_blocks(blocks))
            out: dict[int, bytes] = {}
            need_base: list[int] = []
            layered: dict[int, Layered] = {}
            for b in blocks:
                v = values.get(b)
                if isinstance(v, Layered):
                    layered[b] = v
                    need_base.append(b)
                elif v is None:
                    cheap = self._base_block_if_cheap(b)
                    if cheap is None:
                        need_base.append(b)
                    else:
                        out[b] = cheap
                else:
                    out[b] = self._zero if v == b"" else v
            if need_base:
                base = await self._base_blocks(need_base)
                for b in need_base:
                    data = base[b]
                    if b in layered:
                        buf = bytearray(data)
                        for start, part in layered[b].extents:
                            buf[start : start + len(part)] = part
                        data = bytes(buf)
                    out[b] = data
            for b, data in out.items():
                self._remember_clean(b, data)
            return out
        finally:
            for b, ev in events.items():
                if self._inflight.get(b) is ev:
                    del self._inflight[b]
                self._stale.discard(b)
                ev.set()

    # ----------------------------------------------------------------- reads

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if length == 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        blocks = list(range(first, last + 1))
        self._maybe_readahead(first, last)
        loaded = await self._load(blocks)
        self.stats.reads += 1
        self.stats.bytes_read += length
        start = offset - first * bs
        if first == last:
            return loaded[first][start : start + length]
        buf = b"".join(loaded[b] for b in blocks)
        return buf[start : start + length]

    def _maybe_readahead(self, first: int, last: int) -> None:
        """On sequential reads, fetch a growing window ahead, in chunks of half a window.
        Several streams are followed at once (NBD clients read over several connections,
        guests read several files); a read that continues none starts a new one."""
        if self._nursery is None or self.readahead_max <= 1:
            return
        for i, stream in enumerate(self._streams):
            if first == stream.next or first < stream.next <= last + 1:
                del self._streams[i]
                stream.window = min(max(stream.window * 2, 4), self.readahead_max)
                break
        else:
            stream = _ReadStream(next=last + 1, window=0, until=last + 1)
            if len(self._streams) >= MAX_READ_STREAMS:
                del self._streams[0]
        self._streams.append(stream)
        stream.next = last + 1
        window = stream.window
        if not window or stream.until - (last + 1) >= window // 2:
            return
        nblocks = (self.size + self.block_size - 1) // self.block_size
        start = max(last + 1, stream.until)
        stop = min(last + 1 + window, nblocks)
        stream.until = max(stop, stream.until)
        ahead = [
            b
            for b in range(start, stop)
            if b not in self._inflight and b not in self._clean and self._composition(b)[0] is STORE
        ]
        if ahead:
            self._nursery.start_soon(self._readahead, ahead)

    async def _readahead(self, blocks: list[int]) -> None:
        try:
            await self._fetch(blocks)
        except Exception as e:
            log.debug("read-ahead failed (the read itself will retry): %s", e)

    # ----------------------------------------------------------------- writes

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        bs = self.block_size
        view = memoryview(data)
        pos = offset
        end = offset + len(data)
        while pos < end:
            block = pos // bs
            start = pos - block * bs
            n = min(bs - start, end - pos)
            chunk = view[pos - offset : pos - offset + n]
            if n == bs:
                await self._put_block(block, bytes(chunk))
            else:
                await self._patch_block(block, start, start + n, bytes(chunk))
            pos += n
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        await self._after_write(fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zero a range; whole blocks and parts of blocks become metadata only."""
        self._check_writable()
        self._check_range(offset, length)
        bs = self.block_size
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            start = pos - block * bs
            n = min(bs - start, end - pos)
            if n == bs:
                await self._put_block(block, self._zero)
            else:
                await self._patch_block(block, start, start + n, None)
            pos += n
        await self._after_write(fua)

    async def trim(self, offset: int, length: int) -> None:
        """Discard a range: its blocks are dropped from storage and read as zeros."""
        await self.write_zeroes(offset, length)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly("the disk is open read-only")
        if self._closed:
            raise ReadOnly("the disk is closed")

    async def _patch_block(self, block: int, start: int, end: int, data: bytes | None) -> None:
        """Write part of a block without reading it: into a whole dirty block when there is
        one in memory, else into the block's patch."""
        self.stats.partial_writes += 1
        current = self._dirty.get(block, _ABSENT)
        if isinstance(current, bytes) and current:
            self._set_dirty(block, sp.apply(((start, end, data),), current))
        else:
            if isinstance(current, _Patch):
                patch = _Patch(sp.lay(current.spans, start, end, data), current.over)
            elif isinstance(current, _Spilled):
                patch = _Patch(((start, end, data),), current)
            else:
                over = STORE if current is _ABSENT else (ZEROS if current == b"" else BASE)
                patch = _Patch(((start, end, data),), over)
            if sp.covers(patch.spans, self.block_size):
                self._set_dirty(block, patch.spans[0][2] or self._zero)
            else:
                self._replace_dirty(block, patch, keep_spill=True)
        await self._make_room()

    async def _put_block(self, block: int, data: bytes) -> None:
        self._set_dirty(block, data)
        await self._make_room()

    def _set_dirty(self, block: int, data: bytes) -> None:
        value: BlockValue = data
        if data == self._zero:
            # Zeros over a base must hide the base; with no base, drop the block entirely.
            base_has_data = self.base is not None and block * self.block_size < self.base.size
            value = b"" if base_has_data else None
        self._replace_dirty(block, value)
        self._forget_clean(block)

    def _replace_dirty(self, block: int, value: _Dirty, keep_spill: bool = False) -> None:
        old = self._dirty.pop(block, _ABSENT)
        if old is not _ABSENT:
            self._count_dirty(old, -1)  # type: ignore[arg-type]
            if not keep_spill:
                self._free_spill(old)  # type: ignore[arg-type]
        self._dirty[block] = value
        self._count_dirty(value, +1)

    def _count_dirty(self, value: _Dirty, sign: int) -> None:
        if isinstance(value, _Patch):
            spilled = isinstance(value.over, _Spilled)
            self._dirty_mem += sign * value.cost
            self._dirty_upload += sign * (self.block_size if spilled else value.cost)
        elif isinstance(value, _Spilled):
            self._dirty_upload += sign * self.block_size
        else:
            self._dirty_upload += sign * (self.block_size if value else 64)
            if value:
                self._dirty_mem += sign * len(value)

    def _free_spill(self, value: _Dirty) -> None:
        slot = value.over if isinstance(value, _Patch) else value
        if isinstance(slot, _Spilled) and self._spill is not None:
            self._spill.free(slot.slot)

    def _dirty_bytes(self) -> int:
        return self._dirty_upload

    async def _make_room(self) -> None:
        """Keep dirty data within its memory budget. While the store takes uploads, the
        writer waits for the background flush (a streaming writer then runs at the store's
        speed instead of paying to copy everything through a local file); while the store
        is failing, dirty blocks spill to local disk so writes go on up to the hard limit."""
        while self._dirty_mem > self.dirty_memory:
            if self._background_error is not None or self._nursery is None:
                await self._spill_dirty()
                return
            self._flush_wanted.set()
            await self._drained.wait()

    def _signal_drained(self) -> None:
        drained, self._drained = self._drained, trio.Event()
        drained.set()

    async def _spill_dirty(self) -> None:
        if self._spill is None:
            self._spill = SpillFile(self.block_size, self.spill_dir)
        spill = self._spill
        victims = [(b, v) for b, v in self._dirty.items() if isinstance(v, bytes) and v]
        victims = victims[: max(1, len(victims) // 2)]
        slots = [(b, v, spill.allocate()) for b, v in victims]

        def write_all() -> None:
            for _, v, slot in slots:
                spill.write(slot, v)

        await run_sync(write_all)
        for b, v, slot in slots:
            if self._dirty.get(b) is v:
                self._dirty[b] = _Spilled(slot)
                self._dirty_mem -= len(v)
            else:
                spill.free(slot)

    async def _after_write(self, fua: bool) -> None:
        if fua:
            await self.flush()
            return
        if self._dirty_bytes() > self.dirty_soft_limit:
            self._flush_wanted.set()
        while self._dirty_bytes() > self.dirty_hard_limit and self._nursery is not None:
            self._flush_wanted.set()
            await self._flush_done.wait()
            if self._background_error is not None:
                raise self._background_error

    # ----------------------------------------------------------------- flush

    async def flush(self) -> None:
        """Return when every write before this call is durable in the committed manifest."""
        if self.read_only:
            return
        while (under_way := self._round) is not None and not self._dirty:
            # Every write before this call is in the snapshot being committed.
            await under_way.done.wait()
            if under_way.ok:
                return
        wanted = self._next_round
        async with self._flush_lock:
            if wanted.ok:
                return
            current, self._next_round = self._next_round, _Round()
            self._round = current
            try:
                await self._flush_locked()
                current.ok = True
            finally:
                self._round = None
                current.done.set()
                done, self._flush_done = self._flush_done, trio.Event()
                done.set()
            self.stats.flushes += 1

    async def _flush_locked(self) -> None:
        flushing, self._dirty = self._dirty, {}
        self._flushing = flushing
        self._dirty_mem = self._dirty_upload = 0
        self._signal_drained()
        try:
            await self._send(flushing)
            await self.store.flush()
        except BaseException:
            # Nothing is lost: newer writes win (over older patches), the rest goes back.
            for block, v in flushing.items():
                newer = self._dirty.get(block, _ABSENT)
                if newer is _ABSENT:
                    self._dirty[block] = v
                    self._count_dirty(v, +1)
                elif isinstance(newer, _Patch) and newer.over is STORE:
                    self._replace_dirty(block, _under(v, newer), keep_spill=True)
                else:
                    self._free_spill(v)
            self._flushing = {}
            raise
        self._flushing = {}
        for block, v in flushing.items():
            self._free_spill(v)
            if isinstance(v, _Patch):
                old = self._clean.get(block)
                self._forget_clean(block)
                if v.over is ZEROS:
                    self._remember_clean(block, sp.apply(v.spans, self._zero))
                elif v.over is STORE and old is not None:
                    self._remember_clean(block, sp.apply(v.spans, old))
            elif isinstance(v, bytes) and v:
                self._remember_clean(block, v)

    async def _send(self, flushing: dict[int, _Dirty]) -> None:
        """Hand the flushing blocks to the store, in batches of about 32 MiB."""
        for b in flushing:
            if b in self._inflight:
                self._stale.add(b)  # the store's content changes under that fetch
        whole: dict[int, BlockValue] = {}
        parts: dict[int, list[tuple[int, bytes | int]]] = {}
        size = 0
        for block in sorted(flushing):
            v = flushing[block]
            if isinstance(v, _Patch):
                if self._extent_store is None or isinstance(v.over, _Spilled):
                    whole[block] = await self._complete(block, v)
                    size += self.block_size
                else:
                    if v.over is not STORE:
                        whole[block] = b"" if v.over is ZEROS else None
                    parts[block] = [(s, d if d is not None else e - s) for s, e, d in v.spans]
                    size += v.cost
            else:
                if isinstance(v, _Spilled):
                    spill = self._spill
                    assert spill is not None
                    with spill.pinned([v.slot]):
                        v = await run_sync(spill.read, v.slot)
                whole[block] = v
                size += len(v) if v else 0
            if size >= 32 << 20:
                await self._hand_over(whole, parts)
                whole, parts, size = {}, {}, 0
        if whole or parts:
            await self._hand_over(whole, parts)

    async def _hand_over(
        self, whole: dict[int, BlockValue], parts: dict[int, list[tuple[int, bytes | int]]]
    ) -> None:
        if whole:
            await self.store.write_blocks(whole)
        if parts:
            assert self._extent_store is not None
            await self._extent_store.write_extents(parts)

    async def _complete(self, block: int, patch: _Patch) -> BlockValue:
        """A patched block's whole content, for a store that takes whole blocks only: the
        read-modify-write deferred from the write to the flush."""
        if patch.over is ZEROS:
            under = self._zero
        elif isinstance(patch.over, _Spilled):
            spill, slot = self._spill, patch.over.slot
            assert spill is not None
            with spill.pinned([slot]):
                under = await run_sync(spill.read, slot)
        elif patch.over is BASE:
            under = (await self._base_blocks([block]))[block]
        else:
            under = (await self._store_content([block]))[block]
        data = sp.apply(patch.spans, under)
        if data == self._zero:
            has_base = self.base is not None and block * self.block_size < self.base.size
            return b"" if has_base else None
        return data

    async def checkpoint(self, tag: str) -> None:
        """Flush, then name the committed state ``tag`` (reference block store only)."""
        save = getattr(self.store, "checkpoint", None)
        if save is None:
            raise ReadOnly(f"{type(self.store).__name__} does not support checkpoints")
        await self.flush()
        await save(tag)

    # ----------------------------------------------------------------- allocation

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs covering the range; flags: HOLE | ZERO_FLAG like NBD."""
        self._check_range(offset, length)
        if length == 0:
            return []
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        if self._extent_store is not None:
            states = await self._extent_store.block_states(first, last - first + 1)
            stored = {b: states[b - first] for b in range(first, last + 1)}
        else:
            listed = await self.store.list_blocks()
            stored = {
                b: 0 if b not in listed else (1 if listed[b] else 2) for b in range(first, last + 1)
            }
        runs: list[tuple[int, int]] = []
        for b in range(first, last + 1):
            flags = self._block_flags(b, stored[b])
            start = max(offset, b * bs)
            end = min(offset + length, (b + 1) * bs)
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + end - start, flags)
            else:
                runs.append((end - start, flags))
        return runs

    def _block_flags(self, b: int, state: int) -> int:
        for table in (self._dirty, self._flushing):
            if b in table:
                v = table[b]
                if isinstance(v, _Patch | _Spilled):
                    return 0
                if v is None:
                    return self._base_flags(b)
                return HOLE | ZERO_FLAG if v == b"" else 0
        if state == 0:
            return self._base_flags(b)
        return 0 if state == 1 else HOLE | ZERO_FLAG

    def _base_flags(self, b: int) -> int:
        if self.base is None or b * self.block_size >= self.base.size:
            return HOLE | ZERO_FLAG
        return 0


def _under(older: _Dirty, newer: _Patch) -> _Dirty:
    """A failed flush's value of a block with a newer patch (over the store) laid over it."""
    if isinstance(older, _Patch):
        spans = older.spans
        for s, e, d in newer.spans:
            spans = sp.lay(spans, s, e, d)
        return _Patch(spans, older.over)
    if isinstance(older, bytes) and older:
        return sp.apply(newer.spans, older)
    if isinstance(older, _Spilled):
        return _Patch(newer.spans, older)
    return _Patch(newer.spans, ZEROS if older == b"" else BASE)
