"""Background compaction of an :class:`ObjectBlockStore`: merging segments and folding
extents into whole blocks, one bounded step at a time.

Each step does its reading, merging and uploading without any lock, then commits through
the store's ordinary head write, holding the commit lock only for that (a fold also
uploads its small segment then). So a flush waits at most one step's commit. A merge takes
contiguous runs, which only compaction removes; a fold replaces only blocks that nobody
wrote since it read them (writes drop their blocks from the fold's watch) and that have
nothing pending. New objects are young (GC spares them) until the head names them; what
they replace stays for checkpoints and forks that still name it, until GC finds no head
that does.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import trio

from .blockmap import Piece, Run, merge, plan
from .concurrency import run_sync
from .errors import BlockStoreError
from .layout import GC_GRACE, SEGMENTS, SegmentRef
from .pieces import DATA, EXTENT, TOMB, ZERO
from .segments import encode_segment

if TYPE_CHECKING:
    from .protocol import BaseReader
    from .store import ObjectBlockStore, _Attempt

FOLD_BATCH = 64
"""Blocks one step folds at most."""
_merge_limiter = trio.CapacityLimiter(1)


async def merge_step(store: ObjectBlockStore) -> bool:
    """Merge the runs ``plan`` picks into one; False if none is due."""
    chosen = plan(store._map.runs)
    if chosen is None:
        return False
    inputs = store._map.runs[chosen.start : chosen.end]
    has_base = store.head.base_digest is not None
    refs, folds = await run_sync(
        lambda: merge(inputs, store.load_page_blocking, bottom=chosen.bottom, has_base=has_base),
        limiter=_merge_limiter,
    )
    run: Run | None = None
    if len(inputs) == 1 and refs == inputs[0].pages:
        run = Run(inputs[0].ref._replace(level=chosen.level), refs, chosen.level)
    elif refs:
        key = f"{SEGMENTS}{uuid.uuid4().hex}"
        packs = store._map.packs

        def upload() -> Run:
            encoded = encode_segment(key, refs, packs)
            store._create(key, encoded.body)
            ref = SegmentRef(
                key,
                encoded.index_sha256,
                True,
                encoded.index_offset,
                encoded.index_length,
                encoded.entries,
                chosen.level,
            )
            return Run(ref, encoded.refs, chosen.level)

        run = await run_sync(upload, limiter=_merge_limiter)
    uploaded = time.time()
    store.fold_candidates.update(folds)

    async def prepare() -> _Attempt:
        runs = store._map.runs
        at = next((i for i, r in enumerate(runs) if r is inputs[0]), -1)
        if at < 0 or runs[at : at + len(inputs)] != inputs:
            raise _Moved
        if time.time() - uploaded > GC_GRACE / 2:
            raise BlockStoreError("a merge waited longer than half the GC grace; dropped")
        merged = runs[:at] + ([run] if run is not None else []) + runs[at + len(inputs) :]
        return store._attempt(merged, store.head.stored_blocks, store.head.stored_bytes, {})

    def done() -> bool:
        return all(r is not inputs[0] for r in store._map.runs)

    try:
        async with store._commit_lock:
            await store._commit(prepare, done, fencing=False)
    except _Moved:
        return False
    store.stats.merges += 1
    return True


class _Moved(Exception):
    """The runs a merge took are no longer the head's (another compaction's, or a reload)."""


async def fold_step(store: ObjectBlockStore, base: BaseReader | None) -> bool:
    """Fold up to FOLD_BATCH candidate blocks (many extents) into whole blocks."""
    blocks = sorted(b for b in store.fold_candidates if b not in store._pending)[:FOLD_BATCH]
    store.fold_candidates.difference_update(blocks)
    if not blocks:
        return False
    store._watch.update(blocks)
    try:
        await _fold(store, blocks, base)
    finally:
        store._watch.difference_update(blocks)
    return True


async def _fold(store: ObjectBlockStore, blocks: list[int], base: BaseReader | None) -> None:
    await store._load_pages(store._map.unloaded(blocks))
    has_base = store.head.base_digest is not None
    layers: dict[int, list[Piece]] = {}
    for b in blocks:
        pieces = store._map.lookup(b)
        over_base = not pieces or not pieces[0].replaces or pieces[0].kind == TOMB
        if len(pieces) > 1 and not (over_base and has_base and base is None):
            layers[b] = pieces
    if not layers:
        return
    contents = await store._fetch(
        [(b, p) for b, pieces in layers.items() for p in pieces if p.kind in (DATA, EXTENT)]
    )
    need_base = [
        b
        for b, pieces in layers.items()
        if has_base and (not pieces[0].replaces or pieces[0].kind == TOMB)
    ]
    under = await base(need_base) if base is not None and need_base else {}
    zero = bytes(store.block_size)
    merged: dict[int, bytes] = {}
    for b, pieces in layers.items():
        first, rest = pieces[0], pieces
        buf = bytearray(under.get(b, zero))
        if first.replaces:
            rest = pieces[1:]
            if first.kind == DATA:
                buf = bytearray(contents[(first.pack, first.offset)])
            elif first.kind == ZERO:
                buf = bytearray(zero)
        for p in rest:
            part = contents[(p.pack, p.offset)] if p.kind == EXTENT else bytes(p.length)
            buf[p.start : p.start + len(part)] = part
        merged[b] = bytes(buf)
    whole: list[tuple[int, int, bytes | memoryview]] = [
        (b, 0, content) for b, content in merged.items() if content != zero
    ]
    uploaded = dict(zip((b for b, _, _ in whole), await store._upload(whole), strict=True))
    folded: list[Run] = []

    async def prepare() -> _Attempt:
        entries: dict[int, list[Piece]] = {}
        blocks_held, stored = store.head.stored_blocks, store.head.stored_bytes
        for b, pieces in layers.items():
            if b not in store._watch or b in store._pending:
                continue
            piece = uploaded.get(b) or Piece(ZERO if has_base else TOMB, -1, 0, 0, 0, 0, 0)
            entries[b] = [piece]
            old_held = any(p.kind in (DATA, EXTENT) for p in pieces)
            old_stored = sum(p.stored for p in pieces if p.kind in (DATA, EXTENT))
            blocks_held += (piece.kind == DATA) - old_held
            stored += piece.stored - old_stored
        runs = list(store._map.runs)
        if entries:
            folded[:] = [await store._new_run(entries, 0)]
            runs.append(folded[0])
        return store._attempt(runs, blocks_held, stored, {})

    def done() -> bool:
        return not folded or any(r is folded[0] for r in store._map.runs)

    async with store._commit_lock:
        if all(b not in store._watch or b in store._pending for b in layers):
            return
        await store._commit(prepare, done, fencing=False)
    if folded:
        store.stats.folds += folded[0].entries
