"""Format-3 manifest segments: sorted runs of block entries, stored as checksummed pages.

In memory a page is a handful of numpy columns (16 bytes per entry for whole blocks), not
a Python object per block. On storage a segment object is::

    LKSEG003 | page | page | ... | index

A page is an lz4 frame of its pack table (uuid and lineage of each pack it names) and its
columns; the index lists every page of the run (key range, entry count, object, offset,
length, SHA-256) and may name pages kept in *other* segment objects: a merge reuses the
pages no newer entry touches, so merging a few entries into a big run rewrites the pages
they fall in and the index, not the run. The head names each segment by its index's
SHA-256 (and where the index is), the index names each page by its SHA-256, a page's
entries name each piece by its address, which the piece's digest covers (see ``pieces``).

A key's entries are never split between pages, and within a page they are oldest first:
an optional whole-block entry (data, zeros, or a tombstone: "not held") and extents over
it.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import lz4.frame
import numpy as np

from .errors import CorruptMetadata
from .pieces import COMPRESSED, KINDS, LEGACY, V1_BLAKE2B, V1_SHA256, V2, ZERO_EXTENT

PAGE_ENTRIES = 2048
NO_PACK = 0xFFFFFFFF
_LEN_BITS = 24
_KIND_SHIFT = 24
_FLAG_SHIFT = 27
MAX_STORED = (1 << _LEN_BITS) - 1

SEGMENT_MAGIC = b"LKSEG003"
_INDEX_MAGIC = b"LKIDX003"
_PAGE_HEADER = struct.Struct("<QIIB")
_INDEX_HEADER = struct.Struct("<8sII")
_INDEX_PAGE = struct.Struct("<QQIIQI32s")
_HAS_EXT, _HAS_DIGEST = 1, 2
_NO_LINEAGE = b"\0" * 16


def meta(stored: int, kind: int, flags: int) -> int:
    return stored | kind << _KIND_SHIFT | flags << _FLAG_SHIFT


def meta_stored(m: int) -> int:
    return m & MAX_STORED


def meta_kind(m: int) -> int:
    return (m >> _KIND_SHIFT) & 7


def meta_flags(m: int) -> int:
    return m >> _FLAG_SHIFT


def uuid_of(pack_key: str) -> bytes:
    return bytes.fromhex(pack_key[-32:])


def pack_key_of(uuid: bytes) -> str:
    return f"packs/{uuid.hex()}"


class PackTable:
    """Every pack a disk's map names, by a small integer (the map's pack column)."""

    def __init__(self) -> None:
        self.uuids: list[bytes] = []
        self.lineages: list[bytes | None] = []
        self._index: dict[tuple[bytes, bytes | None], int] = {}
        self._lock = threading.Lock()

    def add(self, uuid: bytes, lineage: bytes | None) -> int:
        """The index of a pack as written by ``lineage`` (a pack table names both: a pack
        claimed by another lineage is another entry, and its pieces fail their digests)."""
        i = self._index.get((uuid, lineage))
        if i is None:
            with self._lock:  # pages are decoded and packs written in worker threads
                i = self._index.get((uuid, lineage))
                if i is None:
                    i = len(self.uuids)
                    self.uuids.append(uuid)
                    self.lineages.append(lineage)
                    self._index[(uuid, lineage)] = i
        return i

    def key(self, i: int) -> str:
        return pack_key_of(self.uuids[i])

    def nbytes(self) -> int:
        return len(self.uuids) * 120


@dataclass(eq=False)
class Page:
    """Entries of one key range; keys relative to ``base``, a key's entries oldest first."""

    base: int
    keys: np.ndarray  # uint32
    packs: np.ndarray  # uint32, global pack index or NO_PACK
    offsets: np.ndarray  # uint32: offset in the pack (or the start of a zero extent)
    meta: np.ndarray  # uint32: stored length | kind | flags
    ext: np.ndarray | None = None  # uint64: start << 32 | length, for pages with extents
    digests: np.ndarray | None = None  # (n, 16) uint8, for pages with format-1/2 blocks

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def first(self) -> int:
        return self.base + int(self.keys[0])

    @property
    def last(self) -> int:
        return self.base + int(self.keys[-1])

    def nbytes(self) -> int:
        n = self.keys.nbytes + self.packs.nbytes + self.offsets.nbytes + self.meta.nbytes
        n += 0 if self.ext is None else self.ext.nbytes
        return n + (0 if self.digests is None else self.digests.nbytes) + 200


@dataclass(eq=False)
class PageRef:
    """Where a page is stored and what it covers; ``page`` once loaded (or if new)."""

    first: int
    last: int
    count: int
    obj: str | None = None
    offset: int = 0
    length: int = 0
    sha256: bytes = b""
    page: Page | None = None

    @property
    def stored(self) -> bool:
        return self.obj is not None


@dataclass
class Columns:
    """Entries in flat columns with absolute keys (what merges and commits build)."""

    keys: np.ndarray  # uint64
    packs: np.ndarray
    offsets: np.ndarray
    meta: np.ndarray
    ext: np.ndarray  # uint64 (0 for whole blocks)
    digests: np.ndarray | None = None
    folds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> Columns:
        return Columns(
            self.keys[index],
            self.packs[index],
            self.offsets[index],
            self.meta[index],
            self.ext[index],
            None if self.digests is None else self.digests[index],
        )


def empty_columns() -> Columns:
    u32 = np.zeros(0, np.uint32)
    return Columns(np.zeros(0, np.uint64), u32, u32.copy(), u32.copy(), np.zeros(0, np.uint64))


def page_columns(page: Page) -> Columns:
    n = len(page)
    return Columns(
        page.keys.astype(np.uint64) + np.uint64(page.base),
        page.packs,
        page.offsets,
        page.meta,
        page.ext if page.ext is not None else np.zeros(n, np.uint64),
        page.digests,
    )


def concat(parts: list[Columns]) -> Columns:
    """Columns one after the other (a digest column if any part has one)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_columns()
    if len(parts) == 1:
        return parts[0]
    digests = None
    if any(p.digests is not None for p in parts):
        digests = np.concatenate(
            [
                p.digests if p.digests is not None else np.zeros((len(p), 16), np.uint8)
                for p in parts
            ]
        )
    return Columns(
        np.concatenate([p.keys for p in parts]),
        np.concatenate([p.packs for p in parts]),
        np.concatenate([p.offsets for p in parts]),
        np.concatenate([p.meta for p in parts]),
        np.concatenate([p.ext for p in parts]),
        digests,
    )


def _page(cols: Columns, lo: int, hi: int) -> Page:
    base = int(cols.keys[lo])
    ext = cols.ext[lo:hi]
    digests = None if cols.digests is None else cols.digests[lo:hi]
    if (
        digests is not None
        and not ((cols.meta[lo:hi] >> np.uint32(_FLAG_SHIFT)) & np.uint32(LEGACY)).any()
    ):
        digests = None
    return Page(
        base,
        (cols.keys[lo:hi] - np.uint64(base)).astype(np.uint32),
        np.ascontiguousarray(cols.packs[lo:hi]),
        np.ascontiguousarray(cols.offsets[lo:hi]),
        np.ascontiguousarray(cols.meta[lo:hi]),
        np.ascontiguousarray(ext) if ext.any() else None,
        None if digests is None else np.ascontiguousarray(digests),
    )


def build_pages(cols: Columns, target: int = PAGE_ENTRIES) -> list[Page]:
    """Cut sorted columns into pages of about ``target`` entries, never between two entries
    of one key, never spanning more keys than a uint32 holds."""
    n = len(cols)
    pages: list[Page] = []
    lo = 0
    keys = cols.keys
    while lo < n:
        hi = min(lo + target, n)
        while hi < n and keys[hi] == keys[hi - 1]:
            hi += 1
        span_end = int(np.searchsorted(keys, keys[lo] + np.uint64(0xFFFFFFFF), "right"))
        if span_end < hi:
            hi = span_end
            while hi > lo + 1 and keys[hi] == keys[hi - 1]:
                hi -= 1
        pages.append(_page(cols, lo, hi))
        lo = hi
    return pages


# ---------------------------------------------------------------- storage


def encode_page(page: Page, packs: PackTable) -> bytes:
    used, local = np.unique(page.packs, return_inverse=True)
    local = local.astype(np.uint32)
    table = bytearray()
    count = 0
    for g in used.tolist():
        if g == NO_PACK:
            continue
        table += packs.uuids[g] + (packs.lineages[g] or _NO_LINEAGE)
        count += 1
    if len(used) and used[-1] == NO_PACK:
        local[page.packs == NO_PACK] = NO_PACK
    flags = (_HAS_EXT if page.ext is not None else 0) | (
        _HAS_DIGEST if page.digests is not None else 0
    )
    parts = [
        _PAGE_HEADER.pack(page.base, len(page), count, flags),
        bytes(table),
        page.keys.astype("<u4").tobytes(),
        local.astype("<u4").tobytes(),
        page.offsets.astype("<u4").tobytes(),
        page.meta.astype("<u4").tobytes(),
    ]
    if page.ext is not None:
        parts.append(page.ext.astype("<u8").tobytes())
    if page.digests is not None:
        parts.append(page.digests.tobytes())
    return bytes(lz4.frame.compress(b"".join(parts)))


def decode_page(data: bytes, where: str, packs: PackTable, *, block_size: int, blocks: int) -> Page:
    """Parse and validate a page whose checksum the caller has verified."""
    try:
        return _decode_page(lz4.frame.decompress(data), packs, block_size, blocks)
    except CorruptMetadata:
        raise
    except Exception as e:
        raise CorruptMetadata(where, f"unreadable manifest page: {e}") from None


def _decode_page(raw: bytes, packs: PackTable, block_size: int, blocks: int) -> Page:
    base, n, npacks, flags = _PAGE_HEADER.unpack_from(raw, 0)
    pos = _PAGE_HEADER.size
    mapping = np.empty(npacks, np.uint32)
    for i in range(npacks):
        uuid, lineage = raw[pos : pos + 16], raw[pos + 16 : pos + 32]
        if len(lineage) != 16:
            raise ValueError("truncated pack table")
        mapping[i] = packs.add(bytes(uuid), None if lineage == _NO_LINEAGE else bytes(lineage))
        pos += 32
    size = n * 16 + (n * 8 if flags & _HAS_EXT else 0) + (n * 16 if flags & _HAS_DIGEST else 0)
    if n == 0 or len(raw) - pos != size or flags & ~(_HAS_EXT | _HAS_DIGEST):
        raise ValueError(f"{len(raw) - pos} bytes for {n} entries (flags {flags:#x})")

    def column(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        out = np.frombuffer(raw, dtype, count, pos)
        pos += out.nbytes
        return out

    keys = column("<u4", n).astype(np.uint32)
    local = column("<u4", n)
    offsets = column("<u4", n).astype(np.uint32)
    metas = column("<u4", n).astype(np.uint32)
    ext = column("<u8", n).astype(np.uint64) if flags & _HAS_EXT else None
    digests = column("u1", n * 16).reshape(n, 16).copy() if flags & _HAS_DIGEST else None
    if (np.diff(keys.astype(np.int64)) < 0).any():
        raise ValueError("keys out of order")
    if base + int(keys[-1]) >= blocks:
        raise ValueError(f"block {base + int(keys[-1])} is outside the disk")
    no_pack = local == NO_PACK
    if (local[~no_pack] >= npacks).any():
        raise ValueError("pack reference out of range")
    if npacks:
        packs_col = np.where(no_pack, np.uint32(NO_PACK), mapping[np.minimum(local, npacks - 1)])
    else:  # a page of trims and zeroes only: there is nothing to map
        packs_col = np.full(n, NO_PACK, np.uint32)
    page = Page(base, keys, packs_col.astype(np.uint32), offsets, metas, ext, digests)
    problem = page_problem(page, block_size)
    if problem:
        raise ValueError(problem)
    return page


def page_problem(page: Page, block_size: int) -> str | None:
    """What makes a page's entries inconsistent, or None (vectorised: pages are big)."""
    kinds = (page.meta >> np.uint32(_KIND_SHIFT)) & np.uint32(7)
    flags = page.meta >> np.uint32(_FLAG_SHIFT)
    stored = page.meta & np.uint32(MAX_STORED)
    if (kinds > max(KINDS)).any() or (flags & ~np.uint32(COMPRESSED | LEGACY)).any():
        return "unknown entry kind or flags"
    with_data = (kinds == 0) | (kinds == 1)
    if ((page.packs == NO_PACK) == with_data).any():
        return "an entry's pack does not match its kind"
    if (with_data & (stored == 0)).any() or (~with_data & (stored != 0)).any():
        return "an entry's stored length does not match its kind"
    legacy = (flags & np.uint32(LEGACY)) != 0
    if legacy.any():
        kinds_legacy = flags[legacy] & np.uint32(LEGACY)
        single = np.isin(kinds_legacy, (V2, V1_SHA256, V1_BLAKE2B))
        if page.digests is None or not single.all() or (kinds[legacy] != 0).any():
            return "a format-1/2 entry without its digest"
        uncompressed = legacy & ((flags & np.uint32(COMPRESSED)) == 0)
        if (stored[uncompressed] != block_size).any():
            return "an uncompressed format-1/2 block of the wrong size"
    if (stored > block_size + 16).any():
        return "a stored length beyond the block size"
    ext = page.ext if page.ext is not None else np.zeros(len(page), np.uint64)
    start, length = ext >> np.uint64(32), ext & np.uint64(0xFFFFFFFF)
    partial = (kinds == 1) | (kinds == ZERO_EXTENT)
    if (ext[~partial] != 0).any():
        return "a whole-block entry with a range"
    if partial.any():
        s, ln = start[partial], length[partial]
        if (ln == 0).any() or (s + ln > block_size).any():
            return "an extent outside its block"
    return None


def encode_index(refs: list[PageRef], self_key: str) -> bytes:
    objects: dict[str, int] = {}
    body = bytearray()
    for ref in refs:
        obj = ref.obj or self_key
        i = objects.setdefault(obj, len(objects))
        body += _INDEX_PAGE.pack(
            ref.first, ref.last, ref.count, i, ref.offset, ref.length, ref.sha256
        )
    table = b"".join(uuid_of(k) for k in objects)
    return _INDEX_HEADER.pack(_INDEX_MAGIC, len(refs), len(objects)) + table + bytes(body)


def decode_index(data: bytes, where: str, blocks: int) -> list[PageRef]:
    """Parse an index whose checksum the caller has verified."""
    try:
        magic, npages, nobjects = _INDEX_HEADER.unpack_from(data, 0)
        if magic != _INDEX_MAGIC:
            raise ValueError("bad magic")
        pos = _INDEX_HEADER.size
        names = [
            f"segments/{data[pos + 16 * i : pos + 16 * (i + 1)].hex()}" for i in range(nobjects)
        ]
        pos += 16 * nobjects
        if len(data) - pos != npages * _INDEX_PAGE.size or npages == 0:
            raise ValueError(f"{len(data) - pos} bytes for {npages} pages")
        refs: list[PageRef] = []
        last = -1
        for first, end, count, obj, offset, length, sha in _INDEX_PAGE.iter_unpack(data[pos:]):
            if not last < first <= end < blocks or count == 0 or obj >= nobjects or not length:
                raise ValueError(f"page {first}..{end} out of order or outside the disk")
            if end - first >= 1 << 32:
                raise ValueError(f"page {first}..{end} spans too many blocks")
            refs.append(PageRef(first, end, count, names[obj], offset, length, sha))
            last = end
        return refs
    except Exception as e:
        raise CorruptMetadata(where, f"unreadable manifest index: {e}") from None


@dataclass
class EncodedSegment:
    body: bytes
    refs: list[PageRef]
    index_offset: int
    index_length: int
    index_sha256: str
    entries: int


def encode_segment(key: str, refs: list[PageRef], packs: PackTable) -> EncodedSegment:
    """A segment object holding the pages of ``refs`` that are not stored yet (new pages
    get their place in it) and an index of all of them."""
    parts = [SEGMENT_MAGIC]
    offset = len(SEGMENT_MAGIC)
    out: list[PageRef] = []
    for ref in refs:
        if ref.stored:
            out.append(ref)
            continue
        assert ref.page is not None
        blob = encode_page(ref.page, packs)
        parts.append(blob)
        out.append(
            PageRef(
                ref.first,
                ref.last,
                ref.count,
                key,
                offset,
                len(blob),
                hashlib.sha256(blob).digest(),
                ref.page,
            )
        )
        offset += len(blob)
    index = encode_index(out, key)
    parts.append(index)
    return EncodedSegment(
        b"".join(parts),
        out,
        offset,
        len(index),
        hashlib.sha256(index).hexdigest(),
        sum(r.count for r in out),
    )


def new_refs(pages: list[Page]) -> list[PageRef]:
    return [PageRef(p.first, p.last, len(p), page=p) for p in pages]


# ---------------------------------------------------------------- format 1 and 2


def legacy_columns(entries: Mapping[int, object], packs: PackTable) -> Columns:
    """Columns of a format-1/2 segment's entries (``layout.decode_segment``'s result)."""
    from .layout import ZERO, Location
    from .pieces import DATA, TOMB
    from .pieces import ZERO as ZERO_KIND

    n = len(entries)
    keys = np.fromiter(sorted(entries), np.uint64, n)
    pk = np.full(n, NO_PACK, np.uint32)
    off = np.zeros(n, np.uint32)
    mt = np.zeros(n, np.uint32)
    digests = np.zeros((n, 16), np.uint8)
    for i, b in enumerate(keys.tolist()):
        e = entries[b]
        if isinstance(e, Location):
            pk[i] = packs.add(uuid_of(e.pack), e.lineage)
            off[i] = e.offset
            kind_flags = V2 if e.lineage is not None else V1_SHA256 if e.sha256 else V1_BLAKE2B
            flags = kind_flags | (COMPRESSED if e.compressed else 0)
            mt[i] = meta(e.length, DATA, flags)
            digests[i] = np.frombuffer(e.digest, np.uint8)
        else:
            mt[i] = meta(0, ZERO_KIND if e == ZERO else TOMB, 0)
    return Columns(keys, pk, off, mt, np.zeros(n, np.uint64), digests)
