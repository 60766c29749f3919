"""A disk's block map: the runs (segments) its head names, newest over oldest, LSM-style.

Each run is a sorted list of pages loaded on first use, so opening a disk reads its head
and one index per segment, and memory holds the pages that were needed (16 bytes per
entry). A lookup consults the runs newest first and stops at the first that says what the
block's whole content is; extents found on the way lie over it. A commit adds a small run;
merges (``merge``), planned by ``plan``, keep their number bounded. Pages are immutable and
shared by reference, so a merge rewrites only the pages that newer entries fall into.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .layout import SegmentRef
from .pieces import DATA, EXTENT, TOMB, ZERO, ZERO_EXTENT
from .segments import (
    _FLAG_SHIFT,
    _KIND_SHIFT,
    MAX_STORED,
    PAGE_ENTRIES,
    Columns,
    PackTable,
    PageRef,
    build_pages,
    concat,
    new_refs,
    page_columns,
)

L0_TRIGGER = 4
"""Commit runs (level 0) that make the next merge due."""
LEVEL_BASE = 1 << 16
"""Entries level 1 holds before it is merged down; each level holds FANOUT times more."""
FANOUT = 8
MAX_RUNS = 16
"""Past this many runs a reader would consult, the newest are merged first, whatever
their levels."""
FOLD_EXTENTS = 16
"""A block with this many extents is folded into a whole block by compaction (so is one
whose pieces hold twice the block: see ``store``)."""


class Piece(NamedTuple):
    """One map entry as the store reads it."""

    kind: int
    pack: int
    offset: int
    stored: int
    flags: int
    start: int
    length: int
    digest: bytes | None = None

    @property
    def replaces(self) -> bool:
        return self.kind in (DATA, ZERO, TOMB)


class Run:
    """One segment of the head (``ref`` is the head's reference to it)."""

    def __init__(self, ref: SegmentRef, pages: list[PageRef], level: int) -> None:
        self.ref = ref
        self.pages = pages
        self.level = level
        self.firsts = [p.first for p in pages]
        self.first_keys = np.array(self.firsts, np.uint64)
        self.entries = sum(p.count for p in pages)

    def page_for(self, block: int) -> PageRef | None:
        i = bisect.bisect_right(self.firsts, block) - 1
        if i >= 0 and block <= self.pages[i].last:
            return self.pages[i]
        return None

    def pages_in(self, first: int, end: int) -> list[PageRef]:
        """Pages holding keys in [first, end)."""
        i = max(bisect.bisect_right(self.firsts, first) - 1, 0)
        j = bisect.bisect_left(self.firsts, end)
        return [p for p in self.pages[i:j] if p.last >= first]

    def nbytes(self) -> int:
        return sum(p.page.nbytes() for p in self.pages if p.page is not None) + 96 * len(self.pages)


def _pieces(ref: PageRef, block: int) -> list[Piece]:
    page = ref.page
    assert page is not None, "page not loaded"
    k = block - page.base
    keys = page.keys
    lo = int(keys.searchsorted(k, "left"))
    if lo >= len(keys) or keys[lo] != k:
        return []
    hi = int(keys.searchsorted(k, "right"))
    out = []
    for i in range(lo, hi):
        m = int(page.meta[i])
        ext = 0 if page.ext is None else int(page.ext[i])
        out.append(
            Piece(
                (m >> _KIND_SHIFT) & 7,
                int(page.packs[i]),
                int(page.offsets[i]),
                m & MAX_STORED,
                m >> _FLAG_SHIFT,
                ext >> 32,
                ext & 0xFFFFFFFF,
                None if page.digests is None else page.digests[i].tobytes(),
            )
        )
    return out


class BlockMap:
    """The committed map of one head: its runs, oldest first."""

    def __init__(self, runs: list[Run], packs: PackTable, block_size: int) -> None:
        self.runs = runs
        self.packs = packs
        self.block_size = block_size

    def unloaded(self, blocks: Iterable[int]) -> list[PageRef]:
        """Pages a lookup of ``blocks`` needs that are not loaded yet."""
        keys = np.fromiter(blocks, np.uint64)
        out: list[PageRef] = []
        for run in self.runs:
            if not run.pages or all(p.page is not None for p in run.pages):
                continue
            where = np.unique(np.searchsorted(run.first_keys, keys, "right") - 1)
            for i in where[where >= 0].tolist():
                ref = run.pages[i]
                if ref.page is None and len(keys):
                    hit = keys[(keys >= ref.first) & (keys <= ref.last)]
                    if len(hit):
                        out.append(ref)
        return out

    def unloaded_in(self, first: int, end: int) -> list[PageRef]:
        return [p for run in self.runs for p in run.pages_in(first, end) if p.page is None]

    def lookup(self, block: int) -> list[Piece]:
        """The block's committed entries, oldest first: from its whole-block entry (if any
        run has one) up, the extents over it. Its pages must be loaded."""
        found: list[list[Piece]] = []
        for run in reversed(self.runs):
            ref = run.page_for(block)
            if ref is None:
                continue
            pieces = _pieces(ref, block)
            if pieces:
                found.append(pieces)
                if pieces[0].replaces:
                    break
        if len(found) == 1:
            return found[0]
        return [p for part in reversed(found) for p in part]

    def summarize(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For sorted distinct keys, what their committed entries hold: (1 if any holds
        data, stored bytes, extents), vectorised (commits of many blocks need it). Their
        pages must be loaded."""
        n = len(keys)
        held = np.zeros(n, bool)
        stored = np.zeros(n, np.int64)
        extents = np.zeros(n, np.int64)
        done = np.zeros(n, bool)
        for run in reversed(self.runs):
            todo = np.flatnonzero(~done)
            if not len(todo) or not run.pages:
                break
            where = np.searchsorted(run.first_keys, keys[todo], "right") - 1
            todo, where = todo[where >= 0], where[where >= 0]
            if not len(where):
                continue
            starts = np.flatnonzero(np.r_[True, where[1:] != where[:-1]])
            ends = [*starts[1:].tolist(), len(where)]
            for lo_i, hi_i in zip(starts, ends, strict=True):
                ref = run.pages[int(where[lo_i])]
                sel = todo[lo_i:hi_i]
                sel = sel[keys[sel] <= np.uint64(ref.last)]
                if not len(sel):
                    continue
                page = ref.page
                assert page is not None, "page not loaded"
                # Only the entries of the keys asked for are read: a commit of a few
                # blocks costs the same over a page of 2,048 entries as over one of 8.
                rel = (keys[sel] - np.uint64(page.base)).astype(page.keys.dtype)
                lo = page.keys.searchsorted(rel, "left")
                hi = page.keys.searchsorted(rel, "right")
                found = hi > lo
                if not found.any():
                    continue
                f, lo, counts = sel[found], lo[found], (hi - lo)[found]
                first_of_key = np.r_[0, np.cumsum(counts)[:-1]]
                at = np.repeat(lo - first_of_key, counts) + np.arange(int(counts.sum()))
                meta = page.meta[at]
                kinds = (meta >> np.uint32(_KIND_SHIFT)) & np.uint32(7)
                data = (kinds == DATA) | (kinds == EXTENT)
                size = np.where(data, meta & np.uint32(MAX_STORED), 0).astype(np.int64)
                partial = ((kinds == EXTENT) | (kinds == ZERO_EXTENT)).astype(np.int64)
                held[f] |= np.logical_or.reduceat(data, first_of_key)
                stored[f] += np.add.reduceat(size, first_of_key)
                extents[f] += np.add.reduceat(partial, first_of_key)
                done[f[np.isin(kinds[first_of_key], (DATA, ZERO, TOMB))]] = True
        return held, stored, extents

    def states(self, first: int, count: int) -> np.ndarray:
        """Per block of [first, first+count): 0 not held, 1 data (or extents), 2 zeros.
        The pages of the range must be loaded."""
        out = np.full(count, 255, np.uint8)
        end = first + count
        for run in reversed(self.runs):
            for ref in run.pages_in(first, end):
                page = ref.page
                assert page is not None
                keys = page.keys.astype(np.int64) + (page.base - first)
                sel = (keys >= 0) & (keys < count)
                if not sel.any():
                    continue
                keys, kinds = keys[sel], (page.meta[sel] >> np.uint32(_KIND_SHIFT)) & np.uint32(7)
                uniq, start, counts = np.unique(keys, return_index=True, return_counts=True)
                head = kinds[start]
                state = np.where(
                    head == DATA, 1, np.where(head == ZERO, 2, np.where(head == TOMB, 0, 1))
                ).astype(np.uint8)
                state[(counts > 1) & (head != TOMB) | (counts > 1) & (head == TOMB)] = 1
                unknown = out[uniq] == 255
                out[uniq[unknown]] = state[unknown]
        out[out == 255] = 0
        return out

    def nbytes(self) -> int:
        return sum(run.nbytes() for run in self.runs) + self.packs.nbytes()


# ---------------------------------------------------------------- merges


def keep_newest(cols: Columns) -> np.ndarray:
    """Mask of the entries that still count in key-sorted columns (a key's entries oldest
    first): from each key's last whole-block entry on."""
    n = len(cols)
    if n == 0:
        return np.zeros(0, bool)
    kinds = (cols.meta >> np.uint32(_KIND_SHIFT)) & np.uint32(7)
    idx = np.arange(n)
    replace = (kinds == DATA) | (kinds == ZERO) | (kinds == TOMB)
    starts = np.flatnonzero(np.r_[True, cols.keys[1:] != cols.keys[:-1]])
    last = np.maximum.reduceat(np.where(replace, idx, -1), starts)
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    return idx >= last[group]


def settle(cols: Columns, *, bottom: bool, has_base: bool) -> Columns:
    """Sort (stably: a key's entries stay oldest first), drop what newer entries replaced,
    and at the bottom of the map what says only "as if absent"; note blocks to fold."""
    order = np.argsort(cols.keys, kind="stable")
    cols = cols.take(order)
    cols = cols.take(keep_newest(cols))
    if bottom and len(cols):
        kinds = (cols.meta >> np.uint32(_KIND_SHIFT)) & np.uint32(7)
        absent = kinds == TOMB
        if not has_base:
            absent |= kinds == ZERO
        if absent.any():
            cols = cols.take(~absent)
    if len(cols):
        kinds = (cols.meta >> np.uint32(_KIND_SHIFT)) & np.uint32(7)
        partial = (kinds == EXTENT) | (kinds == ZERO_EXTENT)
        if partial.any():
            keys, counts = np.unique(cols.keys[partial], return_counts=True)
            cols.folds = keys[counts >= FOLD_EXTENTS].tolist()
    return cols


def merge(
    runs: Sequence[Run],
    load: Callable[[PageRef], None],
    *,
    bottom: bool,
    has_base: bool,
) -> tuple[list[PageRef], list[int]]:
    """The pages of ``runs`` (oldest first, contiguous in the head) merged into one run,
    and the blocks it found with many extents. Blocking: ``load`` fetches a page.

    Stored pages are kept as they are when nothing else falls into their key range: the
    oldest run's pages that no newer entry falls into, and newer pages whose range meets
    no other input page. So merging a few entries into a big run, or runs of disjoint
    ranges, rewrites little."""
    base, newer = runs[0], runs[1:]
    spans = sorted((p.first, p.last, id(p)) for r in runs for p in r.pages)
    reach = np.maximum.accumulate(np.array([s[1] for s in spans], np.int64)) if spans else None
    kept: dict[int, PageRef] = {}
    loose: list[Columns] = []
    for ref in (p for r in newer for p in r.pages):
        if ref.stored and _alone(ref, spans, reach):
            kept[id(ref)] = ref
        else:
            load(ref)
            assert ref.page is not None
            loose.append(page_columns(ref.page))
    incoming = concat(loose)
    keys = np.sort(incoming.keys)
    dirty: list[PageRef] = []
    clean: list[PageRef] = []
    for ref in base.pages:
        lo = int(np.searchsorted(keys, np.uint64(ref.first), "left"))
        if not ref.stored or (lo < len(keys) and keys[lo] <= ref.last):
            dirty.append(ref)
        else:
            clean.append(ref)
    # Loose entries between two kept pages become pages of their own; a handful of them
    # would make tiny pages, so they join the clean base page after them instead.
    if len(keys) and clean:
        bounds = sorted([*(r.first for r in clean), *(r.first for r in kept.values())])
        counts = np.diff(np.r_[0, np.searchsorted(keys, np.array(bounds, np.uint64), "left")])
        by_first = {r.first: r for r in clean}
        for first, count in zip(bounds, counts.tolist(), strict=True):
            if 0 < count < PAGE_ENTRIES // 4 and first in by_first:
                dirty.append(by_first.pop(first))
        clean = list(by_first.values())
    parts = [incoming]
    for ref in dirty:
        load(ref)
        assert ref.page is not None
        parts.insert(0, page_columns(ref.page))  # older than every newer run's entry
    settled = settle(concat(parts), bottom=bottom, has_base=has_base)
    keep = sorted([*clean, *kept.values()], key=lambda r: r.first)
    refs: list[PageRef] = []
    firsts = np.array([r.first for r in keep], np.uint64)
    cuts = np.searchsorted(settled.keys, firsts, "left") if len(keep) else np.zeros(0, int)
    lo = 0
    for ref, cut in zip(keep, [*cuts.tolist()], strict=True):
        if cut > lo:
            refs.extend(new_refs(build_pages(settled.take(slice(lo, cut)))))
        refs.append(ref)
        lo = int(np.searchsorted(settled.keys, np.uint64(ref.last), "right"))
    if lo < len(settled):
        refs.extend(new_refs(build_pages(settled.take(slice(lo, len(settled))))))
    return refs, settled.folds


def _alone(ref: PageRef, spans: list[tuple[int, int, int]], reach: np.ndarray | None) -> bool:
    """Whether no other input page's key range meets this page's (``spans`` sorted, with
    ``reach`` the running maximum of their ends)."""
    assert reach is not None
    i = bisect.bisect_left(spans, (ref.first, ref.last, id(ref)))
    if i > 0 and reach[i - 1] >= ref.first:
        return False
    return not (i + 1 < len(spans) and spans[i + 1][0] <= ref.last)


# ---------------------------------------------------------------- policy


def level_capacity(level: int) -> int:
    return LEVEL_BASE * FANOUT ** max(level - 1, 0)


@dataclass(frozen=True)
class MergePlan:
    start: int
    end: int
    level: int
    bottom: bool


def plan(runs: Sequence[Run]) -> MergePlan | None:
    """The next merge, or None. Runs are oldest first; commits add level-0 runs at the
    end; level k >= 1 holds up to ``level_capacity(k)`` entries; older runs sit at deeper
    levels. Merges take contiguous runs (a newer entry must stay above an older one)."""
    n = len(runs)
    tail = n
    while tail > 0 and runs[tail - 1].level == 0:
        tail -= 1
    l0 = runs[tail:]
    if n > MAX_RUNS or len(l0) >= L0_TRIGGER or sum(r.entries for r in l0) >= LEVEL_BASE:
        start = tail
        if n > MAX_RUNS and len(l0) < 2:
            start = MAX_RUNS - 2
        elif tail > 0 and runs[tail - 1].level == 1:
            start = tail - 1
        if n - start >= 2 or runs[start].level == 0:
            return MergePlan(start, n, max(1, max(r.level for r in runs[start:])), start == 0)
    for i in range(n - 1, -1, -1):
        run = runs[i]
        if run.level >= 1 and run.entries > level_capacity(run.level):
            if i > 0 and runs[i - 1].level == run.level + 1:
                return MergePlan(i - 1, i + 1, run.level + 1, i - 1 == 0)
            return MergePlan(i, i + 1, run.level + 1, i == 0)
    return None
