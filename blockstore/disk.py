"""A disk: byte-addressed reads and writes over a block store and an optional base image.

Writes land in a bounded write-back cache and reach the block store on ``flush()`` or, in
the background, once the cache passes its soft limit. Past its memory budget a writer waits
for that background flush while the store accepts uploads, and spills to an unlinked local
file while the store is failing, waiting only past the hard limit. Reads come from the
write-back cache, a bounded LRU of clean blocks, or the block store in parallel batches with
sequential read-ahead, falling through to the base image (or zeros) for blocks the store
does not hold.

Concurrency: state changes that belong together happen with no ``await`` between them; a
partial-block write (read-modify-write) holds a per-block marker so that concurrent writes to
the same block serialise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from .concurrency import run_sync
from .errors import BaseMismatch, OutOfRange, ReadOnly
from .store import BlockStore, BlockValue, ObjectBlockStore

log = logging.getLogger(__name__)

HOLE = 1
ZERO_FLAG = 2


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


class BaseImage:
    """A read-only raw image under a disk; identified by the sha256 of its content."""

    def __init__(self, path: str | os.PathLike[str], digest: str | None = None) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self._digest = digest

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = sha256_file(self.path)
        return self._digest

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset) if offset < self.size else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _SpillFile:
    """Fixed-size slots in an unlinked temporary file, for dirty blocks beyond the memory budget."""

    def __init__(self, block_size: int, directory: str | None) -> None:
        self.block_size = block_size
        self._fd, name = tempfile.mkstemp(prefix="lanekit-spill-", dir=directory)
        os.unlink(name)
        self._free: list[int] = []
        self._next = 0

    def allocate(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def write(self, slot: int, data: bytes) -> None:
        os.pwrite(self._fd, data, slot * self.block_size)

    def read(self, slot: int) -> bytes:
        return os.pread(self._fd, self.block_size, slot * self.block_size)

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class _Spilled:
    slot: int


_Dirty = BlockValue | _Spilled


MAX_READ_STREAMS = 8


@dataclass
class _ReadStream:
    """One sequential reader: the block it should read next, its read-ahead window, and
    the block read-ahead has reached."""

    next: int
    window: int
    until: int


@dataclass
class DiskStats:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
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
        self.stats = DiskStats()
        self._zero = bytes(self.block_size)
        self._clean: OrderedDict[int, bytes] = OrderedDict()
        self._clean_bytes = 0
        self._dirty: dict[int, _Dirty] = {}
        self._flushing: dict[int, _Dirty] = {}
        self._dirty_mem = 0
        self._dirty_count = 0
        self._spill: _SpillFile | None = None
        self._rmw: dict[int, trio.Event] = {}
        self._inflight: dict[int, trio.Event] = {}
        self._stale: set[int] = set()
        self._flush_lock = trio.Lock()
        self._flush_wanted = trio.Event()
        self._flush_done = trio.Event()
        self._drained = trio.Event()
        self._background_error: BaseException | None = None
        self._streams: list[_ReadStream] = []
        self._nursery: trio.Nursery | None = None
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Disk:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        if not self.read_only:
            self._nursery.start_soon(self._background_flusher)
            if isinstance(self.store, ObjectBlockStore) and self.store.lease is not None:
                self._nursery.start_soon(self._lease_renewer, self.store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Flush and release on a clean exit; on an error only release (unflushed data is
        not promised). The caller's exception propagates as itself, not as a group."""
        assert self._nursery is not None
        try:
            if exc[0] is None:
                await self.close()
        finally:
            self._nursery.cancel_scope.cancel()
            await self._nursery_cm.__aexit__(None, None, None)
            self._nursery = None
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
        if not self.read_only:
            await self.flush()
        await self._release()

    async def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
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

    # ----------------------------------------------------------------- helpers

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(
                f"range {offset}+{length} is outside the disk (size {self.size} bytes)"
            )

    def _dirty_bytes(self) -> int:
        return self._dirty_count * self.block_size

    def _cached(self, block: int) -> bytes | _Spilled | None:
        """The block's content if known without asking the store (a spill slot needs a read)."""
        for table in (self._dirty, self._flushing):
            if block in table:
                v = table[block]
                if isinstance(v, _Spilled):
                    return v
                if v is None:
                    return self._base_block_if_cheap(block)
                return self._zero if v == b"" else v
        v2 = self._clean.get(block)
        if v2 is not None:
            self._clean.move_to_end(block)
        return v2

    def _base_block_if_cheap(self, block: int) -> bytes | None:
        if self.base is None or block * self.block_size >= self.base.size:
            return self._zero
        return None

    def _remember_clean(self, block: int, data: bytes) -> None:
        if block in self._dirty or block in self._flushing or block in self._stale:
            return
        if block in self._clean:
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
        if block in self._inflight:
            self._stale.add(block)

    async def _load(self, blocks: list[int]) -> dict[int, bytes]:
        """Current content of blocks, fetching what no cache holds (deduplicating in-flight)."""
        result: dict[int, bytes] = {}
        missing: list[int] = []
        spilled: list[tuple[int, int]] = []
        waits: list[tuple[int, trio.Event]] = []
        for b in blocks:
            data = self._cached(b)
            if isinstance(data, _Spilled):
                spilled.append((b, data.slot))
            elif data is not None:
                result[b] = data
            elif b in self._inflight:
                waits.append((b, self._inflight[b]))
            else:
                missing.append(b)
        if spilled:
            spill = self._spill
            assert spill is not None
            slots = [slot for _, slot in spilled]
            datas = await run_sync(lambda: [spill.read(s) for s in slots])
            result.update(zip((b for b, _ in spilled), datas, strict=True))
        if missing:
            result.update(await self._fetch(missing))
        for b, event in waits:
            await event.wait()
            result[b] = (await self._load([b]))[b]
        return result

    async def _fetch(self, blocks: list[int]) -> dict[int, bytes]:
        events = {b: trio.Event() for b in blocks}
        self._inflight.update(events)
        try:
            values = await self.store.read_blocks(blocks)
            out: dict[int, bytes] = {}
            need_base: list[int] = []
            for b in blocks:
                v = values.get(b)
                if v is None:
                    cheap = self._base_block_if_cheap(b)
                    if cheap is None:
                        need_base.append(b)
                    else:
                        out[b] = cheap
                else:
                    out[b] = self._zero if v == b"" else v
            if need_base:
                base = self.base
                assert base is not None
                bs = self.block_size

                def read_base() -> dict[int, bytes]:
                    return {b: base.read(b * bs, bs) for b in need_base}

                out.update(await run_sync(read_base))
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
        if first == last:
            start = offset - first * bs
            return loaded[first][start : start + length]
        buf = b"".join(loaded[b] for b in blocks)
        start = offset - first * bs
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
            if b not in self._inflight
            and b not in self._clean
            and b not in self._dirty
            and b not in self._flushing
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
                await self._patch_block(block, start, chunk)
            pos += n
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        await self._after_write(fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zero a range; whole blocks become metadata only (never stored as data)."""
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
                await self._patch_block(block, start, memoryview(bytes(n)))
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

    async def _patch_block(self, block: int, start: int, chunk: memoryview) -> None:
        while block in self._rmw:
            await self._rmw[block].wait()
        event = self._rmw[block] = trio.Event()
        try:
            old = (await self._load([block]))[block]
            new = old[:start] + bytes(chunk) + old[start + len(chunk) :]
            self._set_dirty(block, new)
        finally:
            del self._rmw[block]
            event.set()
        await self._make_room()

    async def _put_block(self, block: int, data: bytes) -> None:
        while block in self._rmw:
            await self._rmw[block].wait()
        self._set_dirty(block, data)
        await self._make_room()

    def _set_dirty(self, block: int, data: bytes) -> None:
        value: BlockValue = data
        if data == self._zero:
            # Zeros over a base must hide the base; with no base, drop the block entirely.
            base_has_data = self.base is not None and block * self.block_size < self.base.size
            value = b"" if base_has_data else None
        self._drop_dirty(block)
        self._dirty[block] = value
        self._dirty_count += 1
        if value:
            self._dirty_mem += len(value)
        self._forget_clean(block)

    def _drop_dirty(self, block: int) -> None:
        old = self._dirty.pop(block, ...)
        if old is ...:
            return
        self._dirty_count -= 1
        if isinstance(old, _Spilled):
            assert self._spill is not None
            self._spill.free(old.slot)
        elif old:
            self._dirty_mem -= len(old)

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
            self._spill = _SpillFile(self.block_size, self.spill_dir)
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
        dirty = self._dirty_bytes()
        if dirty > self.dirty_soft_limit:
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
        async with self._flush_lock:
            try:
                await self._flush_locked()
            finally:
                done, self._flush_done = self._flush_done, trio.Event()
                done.set()
            self.stats.flushes += 1

    async def _flush_locked(self) -> None:
        flushing, self._dirty = self._dirty, {}
        self._flushing = flushing
        self._dirty_mem = self._dirty_count = 0
        self._signal_drained()
        try:
            batch: dict[int, BlockValue] = {}
            batch_bytes = 0
            for block in sorted(flushing):
                v = flushing[block]
                if isinstance(v, _Spilled):
                    spill = self._spill
                    assert spill is not None
                    v = await run_sync(spill.read, v.slot)
                batch[block] = v
                batch_bytes += len(v) if v else 0
                if batch_bytes >= 32 << 20:
                    await self.store.write_blocks(batch)
                    batch, batch_bytes = {}, 0
            if batch:
                await self.store.write_blocks(batch)
            await self.store.flush()
        except BaseException:
            # Nothing is lost: newer writes win, the rest goes back to dirty.
            for block, v in flushing.items():
                if block in self._dirty:
                    if isinstance(v, _Spilled) and self._spill is not None:
                        self._spill.free(v.slot)
                    continue
                self._dirty[block] = v
                self._dirty_count += 1
                if isinstance(v, bytes) and v:
                    self._dirty_mem += len(v)
            self._flushing = {}
            raise
        self._flushing = {}
        for block, v in flushing.items():
            if isinstance(v, _Spilled):
                if self._spill is not None:
                    self._spill.free(v.slot)
            elif isinstance(v, bytes) and v:
                self._remember_clean(block, v)

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
        has_data = getattr(self.store, "has_data", None)
        listed: dict[int, bool] | None = None
        if has_data is None:
            listed = await self.store.list_blocks()
        runs: list[tuple[int, int]] = []
        for b in range(first, last + 1):
            flags = self._block_flags(b, has_data, listed)
            start = max(offset, b * bs)
            end = min(offset + length, (b + 1) * bs)
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + end - start, flags)
            else:
                runs.append((end - start, flags))
        return runs

    def _block_flags(self, b: int, has_data: object, listed: dict[int, bool] | None) -> int:
        for table in (self._dirty, self._flushing):
            if b in table:
                v = table[b]
                if v is None:
                    return self._base_flags(b)
                return HOLE | ZERO_FLAG if v == b"" else 0
        state = listed.get(b) if listed is not None else has_data(b)  # type: ignore[operator]
        if state is None:
            return self._base_flags(b)
        return 0 if state else HOLE | ZERO_FLAG

    def _base_flags(self, b: int) -> int:
        if self.base is None or b * self.block_size >= self.base.size:
            return HOLE | ZERO_FLAG
        return 0
