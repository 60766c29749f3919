"""Where things live in a store, and how heads, manifest segments and blocks are encoded.

A store (a directory or an S3 prefix) holds any number of disks::

    disks/<name>/head               the commit point, replaced with If-Match only
    disks/<name>/lease              the writer's lease: JSON, If-None-Match / If-Match
    disks/<name>/checkpoints/<tag>  a frozen head: created once, never replaced
    segments/<uuid>                 manifest segments (block -> location), immutable
    packs/<uuid>                    compressed blocks packed together, immutable

A head lists its segments oldest first; a later entry for a block overrides an earlier one.
Segments and packs are shared between a disk, its checkpoints and its forks, which is why
they live outside ``disks/``; garbage collection is mark-and-sweep from every head and
checkpoint in the store.

Format 3 (written since lanekit tracks extents) keeps format 2's checks and changes what a
segment is: a run of checksummed pages with an index, in an LSM of runs (``segments``),
and what a pack holds: pieces of whole blocks or of extents, each with a digest of its
address and payload (``pieces``). A format-3 head names each segment with the SHA-256 of
its index, where the index is, its entry count and its level; it may still name format-1
and format-2 segments (by the SHA-256 of their bytes) until compaction rewrites them.

Format 2 verifies every byte it reads:

- a head or checkpoint is ``LKHEAD02 <sha256 of the body>\\n`` and a JSON body, validated
  field by field; it names each segment with the SHA-256 of the whole segment object;
- a segment is ``LKSEG002``, the SHA-256 of the rest, and an lz4 frame of a pack table
  (name and the *lineage* of the disk that wrote the pack) and fixed-size entries;
- a block's digest binds its content to its address: SHA-256 over the lineage, the block
  index and the content. Forks share their parent's segments and packs, so the lineage is
  recorded with each pack, where the block is described, not taken from the reading disk.

Format 1 (older lanekit: a plain JSON head, ``LKSEG001`` segments, digests of the content
only) stays readable; a format-1 or 2 disk is upgraded at its first commit (see ``store``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lz4.block
import lz4.frame

from .errors import BlockStoreError, CorruptMetadata, InvalidURL

FORMAT_VERSION = 3
"""What new heads and segments are written in; formats 1 and 2 are read (and upgraded)."""

STORED_PER_BLOCK = 64
"""Bound (in block sizes) of what one block may occupy in a format-3 head's accounting: its
pieces with their headers and the extents over them that compaction has not folded yet."""

GC_GRACE = 3600.0
"""GC spares unreferenced objects younger than this; a flush whose uploads are older than
half of it refuses to commit them (they may have been collected)."""
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 4 << 20
MAX_DISK_SIZE = (1 << 63) - 512
"""The largest byte offset an off_t (and NBD) holds, in whole sectors."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

SEGMENTS = "segments/"
PACKS = "packs/"
DISKS = "disks/"
_OBJECT_RE = {prefix: re.compile(f"^{prefix}[0-9a-f]{{32}}$") for prefix in (SEGMENTS, PACKS)}


def check_name(name: str, what: str = "disk name") -> str:
    if not _NAME_RE.match(name):
        raise InvalidURL(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


def head_key(disk: str) -> str:
    return f"{DISKS}{disk}/head"


def lease_key(disk: str) -> str:
    return f"{DISKS}{disk}/lease"


def checkpoint_prefix(disk: str) -> str:
    return f"{DISKS}{disk}/checkpoints/"


def checkpoint_key(disk: str, tag: str) -> str:
    return checkpoint_prefix(disk) + check_name(tag, "checkpoint tag")


def geometry_problem(size: object, block_size: object) -> str | None:
    """Why a disk size and block size are unusable, or None."""
    if type(block_size) is not int or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        return f"block size {block_size} is invalid: use a power of two from 4 KiB to 4 MiB"
    if block_size & (block_size - 1):
        return f"block size {block_size} is invalid: use a power of two from 4 KiB to 4 MiB"
    if type(size) is not int or not 0 < size <= MAX_DISK_SIZE or size % 512:
        return (
            f"disk size {size} is invalid: use a positive multiple of 512 bytes "
            f"up to {MAX_DISK_SIZE}"
        )
    return None


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


# ---------------------------------------------------------------- blocks


def checksum(data: bytes, sha256: bool = True) -> bytes:
    """Format-1 digest of a block's plain content (SHA-256, or BLAKE2b for the oldest)."""
    if sha256:
        return hashlib.sha256(data).digest()[:16]
    return hashlib.blake2b(data, digest_size=16).digest()


def block_digest(lineage: bytes, block: int, data: bytes | memoryview) -> bytes:
    """128-bit digest binding a block's content to its address: the lineage of the disk
    that wrote it and its index. SHA-256 runs in hardware on current CPUs, and hashlib
    releases the GIL on big buffers."""
    h = hashlib.sha256(b"LKBLK002" + lineage + block.to_bytes(8, "little"))
    h.update(data)
    return h.digest()[:16]


def new_lineage() -> bytes:
    return uuid.uuid4().bytes


class Location(NamedTuple):
    """Where a block's bytes are: a slice of a pack object, and how to verify them."""

    pack: str
    offset: int
    length: int
    compressed: bool
    digest: bytes
    lineage: bytes | None
    """The lineage (16 bytes) of the disk that wrote the block, bound into ``digest`` with
    the block's index; None for a format-1 block, whose digest covers its content only."""
    sha256: bool = True
    """Format-1 blocks only: False for BLAKE2b digests."""


def encode_block(lineage: bytes, block: int, data: bytes) -> tuple[bytes, bool, bytes]:
    """(stored bytes, compressed?, digest) of a block written at ``block``."""
    packed = lz4.block.compress(data, store_size=False)
    compressed = len(packed) < len(data) - len(data) // 32
    return (packed if compressed else data), compressed, block_digest(lineage, block, data)


def decode_block(raw: bytes, loc: Location, block: int, block_size: int) -> bytes:
    """The verified content of ``block`` from its stored bytes; ValueError says why not."""
    if loc.compressed:
        try:
            raw = lz4.block.decompress(raw, uncompressed_size=block_size)
        except Exception as e:
            raise ValueError(f"lz4 decoding failed: {e}") from None
    if len(raw) != block_size:
        raise ValueError(f"checksum mismatch ({len(raw)} bytes, expected {block_size})")
    if loc.lineage is None:
        good = checksum(raw, loc.sha256) == loc.digest
    else:
        good = block_digest(loc.lineage, block, raw) == loc.digest
    if not good:
        raise ValueError("checksum mismatch (damaged, or the data of another block)")
    return raw


ZERO = "zero"
"""Map value of a block that reads as zeros although the base may have data there."""

Entry = Location | str


# ---------------------------------------------------------------- heads


class SegmentRef(NamedTuple):
    """A head's reference to a segment: its key and the SHA-256 (hex) of its bytes (None in
    format-1 heads, which do not checksum their segments) or, for a format-3 segment
    (``paged``), of its index, with where the index is, its entries and its LSM level."""

    key: str
    sha256: str | None
    paged: bool = False
    index_offset: int = 0
    index_length: int = 0
    entries: int = 0
    level: int = 0

    def as_json(self) -> dict[str, Any]:
        if not self.paged:
            return {"key": self.key, "sha256": self.sha256}
        return {
            "key": self.key,
            "sha256": self.sha256,
            "index": [self.index_offset, self.index_length],
            "entries": self.entries,
            "level": self.level,
        }


@dataclass
class Head:
    """The committed state of a disk (or, frozen, of a checkpoint)."""

    disk: str
    size: int
    block_size: int
    base_digest: str | None
    generation: int = 0
    epoch: int = 0
    commit_id: str = ""
    committed_at: float = 0.0
    segments: list[SegmentRef] = field(default_factory=list)
    parent: str | None = None
    stored_blocks: int = 0
    stored_bytes: int = 0
    format: int = FORMAT_VERSION
    lineage: str = ""
    """Hex id of this disk's line of writes (new for every disk and fork; format 2)."""

    def encode(self) -> bytes:
        return encode_head_v1(self) if self.format == 1 else _encode_head_v2(self)

    @classmethod
    def decode(cls, data: bytes, where: str) -> Head:
        return decode_head(data, where)


_HEAD_MAGIC = b"LKHEAD"
_HEAD2_MAGIC = b"LKHEAD02 "
_HEAD3_MAGIC = b"LKHEAD03 "
_V1_FIELDS = frozenset(
    {
        "disk",
        "size",
        "block_size",
        "base_digest",
        "generation",
        "epoch",
        "commit_id",
        "committed_at",
        "segments",
        "parent",
        "stored_blocks",
        "stored_bytes",
        "format",
    }
)
_V2_FIELDS = _V1_FIELDS | {"lineage"}
_PAGED_FIELDS = frozenset({"key", "sha256", "index", "entries", "level"})


def _head_json(head: Head) -> dict[str, Any]:
    return {
        "disk": head.disk,
        "size": head.size,
        "block_size": head.block_size,
        "base_digest": head.base_digest,
        "generation": head.generation,
        "epoch": head.epoch,
        "commit_id": head.commit_id,
        "committed_at": head.committed_at,
        "parent": head.parent,
        "stored_blocks": head.stored_blocks,
        "stored_bytes": head.stored_bytes,
        "format": head.format,
    }


def _encode_head_v2(head: Head) -> bytes:
    raw = _head_json(head)
    raw["segments"] = [s.as_json() for s in head.segments]
    raw["lineage"] = head.lineage
    body = json.dumps(raw, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    magic = _HEAD3_MAGIC if head.format >= 3 else _HEAD2_MAGIC
    return magic + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def encode_head_v1(head: Head) -> bytes:
    """A head as lanekit before format 2 wrote it: still written for checkpoints and forks of
    format-1 states (frozen as they were), and by tests that build old disks."""
    raw = _head_json(head)
    raw["segments"] = [s.key for s in head.segments]
    return json.dumps(raw, sort_keys=True).encode()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def decode_head(data: bytes, where: str) -> Head:
    """Parse, verify and validate a head or checkpoint; CorruptMetadata if it is not sound."""
    if data.startswith(_HEAD_MAGIC):
        if data[6:8] not in (b"02", b"03"):
            raise BlockStoreError(
                f"{where}: head format {data[6:8].decode(errors='replace')!r} is not "
                f"supported (this lanekit reads formats 1 to {FORMAT_VERSION})"
            )
        magic = _HEAD3_MAGIC if data[6:8] == b"03" else _HEAD2_MAGIC
        if not data.startswith(magic):
            raise CorruptMetadata(where, "damaged head header")
        digest, newline, body = data[len(magic) :].partition(b"\n")
        if not newline or hashlib.sha256(body).hexdigest().encode() != digest:
            raise CorruptMetadata(where, "head checksum mismatch")
        version, fields = int(data[6:8]), _V2_FIELDS
    else:
        body, version, fields = data, 1, _V1_FIELDS
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise CorruptMetadata(where, f"unreadable head: {e}") from None
    if not isinstance(raw, dict):
        raise CorruptMetadata(where, "unreadable head: not an object")
    if version == 1 and raw.get("format") != 1:
        raise BlockStoreError(
            f"{where}: format {raw.get('format')!r} is not supported "
            f"(this lanekit reads formats 1 to {FORMAT_VERSION})"
        )
    if set(raw) != fields:
        unknown, missing = sorted(set(raw) - fields), sorted(fields - set(raw))
        raise CorruptMetadata(where, f"head fields: unknown {unknown}, missing {missing}")
    try:
        head = _head_from_json(raw, version)
    except (TypeError, ValueError) as e:
        raise CorruptMetadata(where, f"invalid head: {e}") from None
    problem = head_problem(head)
    if problem:
        raise CorruptMetadata(where, f"invalid head: {problem}")
    return head


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw[name]
    if type(value) is not int:
        raise TypeError(f"{name} is not an integer: {value!r}")
    return value


def _str(raw: dict[str, Any], name: str, optional: bool = False) -> Any:
    value = raw[name]
    if not isinstance(value, str) and not (optional and value is None):
        raise TypeError(f"{name} is not a string: {value!r}")
    return value


def _head_from_json(raw: dict[str, Any], version: int) -> Head:
    committed_at = raw["committed_at"]
    if type(committed_at) not in (int, float) or not math.isfinite(committed_at):
        raise TypeError(f"committed_at is not a time: {committed_at!r}")
    refs: list[SegmentRef] = []
    segments = raw["segments"]
    if not isinstance(segments, list):
        raise TypeError("segments is not a list")
    for item in segments:
        if version == 1:
            if not isinstance(item, str):
                raise TypeError(f"segment {item!r} is not a key")
            refs.append(SegmentRef(item, None))
        elif isinstance(item, dict) and set(item) == {"key", "sha256"}:
            refs.append(SegmentRef(_str(item, "key"), _str(item, "sha256")))
        elif version >= 3 and isinstance(item, dict) and set(item) == _PAGED_FIELDS:
            index = item["index"]
            if not (isinstance(index, list) and len(index) == 2):
                raise TypeError(f"segment {item!r}: index is not an offset and a length")
            refs.append(
                SegmentRef(
                    _str(item, "key"),
                    _str(item, "sha256"),
                    True,
                    _int({"index offset": index[0]}, "index offset"),
                    _int({"index length": index[1]}, "index length"),
                    _int(item, "entries"),
                    _int(item, "level"),
                )
            )
        else:
            raise TypeError(f"segment {item!r} is not a key and a checksum")
    return Head(
        disk=_str(raw, "disk"),
        size=_int(raw, "size"),
        block_size=_int(raw, "block_size"),
        base_digest=_str(raw, "base_digest", optional=True),
        generation=_int(raw, "generation"),
        epoch=_int(raw, "epoch"),
        commit_id=_str(raw, "commit_id"),
        committed_at=float(committed_at),
        segments=refs,
        parent=_str(raw, "parent", optional=True),
        stored_blocks=_int(raw, "stored_blocks"),
        stored_bytes=_int(raw, "stored_bytes"),
        format=version,
        lineage=_str(raw, "lineage") if version >= 2 else "",
    )


def head_problem(head: Head) -> str | None:
    """What makes a head inconsistent, or None (every reader and writer checks this)."""
    geometry = geometry_problem(head.size, head.block_size)
    if geometry:
        return geometry
    if not _NAME_RE.match(head.disk):
        return f"disk name {head.disk!r}"
    if head.base_digest is not None and not _HEX64.match(head.base_digest):
        return f"base digest {head.base_digest!r}"
    if head.parent is not None:
        name, at, tag = head.parent.partition("@")
        if not (at and _NAME_RE.match(name) and _NAME_RE.match(tag)):
            return f"parent {head.parent!r}"
    for name in ("generation", "epoch"):
        if not 0 <= getattr(head, name) < 1 << 63:
            return f"{name} {getattr(head, name)}"
    if head.committed_at < 0:
        return f"commit time {head.committed_at}"
    if head.format >= 2 and not (_HEX32.match(head.commit_id) and _HEX32.match(head.lineage)):
        return f"commit id {head.commit_id!r} or lineage {head.lineage!r}"
    keys = [s.key for s in head.segments]
    if len(set(keys)) != len(keys):
        return "a segment is listed twice"
    for ref in head.segments:
        if not _OBJECT_RE[SEGMENTS].match(ref.key):
            return f"segment key {ref.key!r}"
        if head.format >= 2 and not (ref.sha256 and _HEX64.match(ref.sha256)):
            return f"segment checksum {ref.sha256!r}"
        if ref.paged and not (
            8 <= ref.index_offset < 1 << 48
            and 0 < ref.index_length < 1 << 32
            and 0 < ref.entries < 1 << 48
            and 0 <= ref.level < 64
        ):
            return f"segment {ref.key}: index at {ref.index_offset}+{ref.index_length}"
    if not 0 <= head.stored_blocks <= block_count(head.size, head.block_size):
        return f"{head.stored_blocks} stored blocks on a disk of {head.size} bytes"
    per_block = head.block_size * (STORED_PER_BLOCK if head.format >= 3 else 1)
    if not 0 <= head.stored_bytes <= head.stored_blocks * per_block:
        return f"{head.stored_bytes} stored bytes in {head.stored_blocks} blocks"
    if head.stored_blocks and not head.segments:
        return f"{head.stored_blocks} stored blocks but no segments"
    if head.parent is None and len(head.segments) > head.generation:
        return f"{len(head.segments)} segments after {head.generation} commits"
    if head.generation == 0 and head.epoch != 0:
        return f"epoch {head.epoch} before the first commit"
    return None


# ---------------------------------------------------------------- segments

_SEG1_MAGIC = b"LKSEG001"
_SEG1_HEADER = struct.Struct("<8sQI")
_SEG2_MAGIC = b"LKSEG002"
_SEG2_HEADER = struct.Struct("<IQI")
_SEG_ENTRY = struct.Struct("<QIIIB16s")
_NO_PACK = 0xFFFFFFFF
_NO_DIGEST = b"\0" * 16
_NO_LINEAGE = b"\0" * 16

_V1_COMPRESSED, _V1_SHA256, _V1_ZERO, _V1_TOMBSTONE = 1, 2, 2, 3
"""Format-1 entry flags; for entries without a pack, 2 is a zero block and 3 a tombstone."""

_COMPRESSED = 0x01
_LEGACY_SHA256 = 0x02
"""A block of format 1: its digest is SHA-256 of its content only."""
_LEGACY_BLAKE2B = 0x04
"""A block of format 1 with a BLAKE2b digest of its content only."""
_ZERO = 0x10
_TOMBSTONE = 0x20


def _packed_entries(
    entries: dict[int, Entry | None], with_lineage: bool
) -> tuple[list[tuple[str, bytes | None]], bytearray]:
    packs: dict[tuple[str, bytes | None], int] = {}
    body = bytearray()
    for block in sorted(entries):
        e = entries[block]
        if isinstance(e, Location):
            if with_lineage:
                ref = packs.setdefault((e.pack, e.lineage), len(packs))
                flags = _COMPRESSED if e.compressed else 0
                if e.lineage is None:
                    flags |= _LEGACY_SHA256 if e.sha256 else _LEGACY_BLAKE2B
            else:
                if e.lineage is not None:
                    raise ValueError("a format-1 segment cannot hold an address-bound block")
                ref = packs.setdefault((e.pack, None), len(packs))
                flags = (_V1_COMPRESSED if e.compressed else 0) | (_V1_SHA256 if e.sha256 else 0)
            body += _SEG_ENTRY.pack(block, ref, e.offset, e.length, flags, e.digest)
        else:
            if with_lineage:
                kind = _ZERO if e == ZERO else _TOMBSTONE
            else:
                kind = _V1_ZERO if e == ZERO else _V1_TOMBSTONE
            body += _SEG_ENTRY.pack(block, _NO_PACK, 0, 0, kind, _NO_DIGEST)
    return list(packs), body


def encode_segment(entries: dict[int, Entry | None], block_size: int) -> bytes:
    """A format-2 segment: magic, SHA-256 of the rest, lz4 frame of the pack table and the
    entries. ``None`` values are tombstones (the block reverts to the base image)."""
    packs, body = _packed_entries(entries, with_lineage=True)
    raw = bytearray(_SEG2_HEADER.pack(block_size, len(entries), len(packs)))
    for name, lineage in packs:
        encoded = name.encode()
        raw += struct.pack("<H", len(encoded)) + encoded + (lineage or _NO_LINEAGE)
    raw += body
    payload = lz4.frame.compress(bytes(raw))
    return _SEG2_MAGIC + hashlib.sha256(payload).digest() + payload


def encode_segment_v1(entries: dict[int, Entry | None]) -> bytes:
    """A segment as lanekit before format 2 wrote it (kept to build old disks in tests)."""
    packs, body = _packed_entries(entries, with_lineage=False)
    out = bytearray(_SEG1_HEADER.pack(_SEG1_MAGIC, len(entries), len(packs)))
    for name, _ in packs:
        raw = name.encode()
        out += struct.pack("<H", len(raw)) + raw
    out += body
    return bytes(lz4.frame.compress(bytes(out)))


def segment_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_segment(
    data: bytes,
    where: str,
    *,
    sha256: str | None = None,
    block_size: int | None = None,
    blocks: int | None = None,
) -> dict[int, Entry | None]:
    """Verify and parse a segment. ``sha256`` is the checksum its head names it with;
    ``block_size`` and ``blocks`` (the disk's block count) bound what its entries may say."""
    if sha256 is not None and segment_sha256(data) != sha256:
        raise CorruptMetadata(where, "segment does not match the checksum its head names")
    try:
        if data.startswith(_SEG2_MAGIC):
            return _decode_v2(data, block_size, blocks)
        if data.startswith(b"LKSEG"):
            raise BlockStoreError(f"{where}: segment format {data[5:8]!r} is not supported")
        return _decode_v1(data, block_size, blocks)
    except BlockStoreError:
        raise
    except Exception as e:
        raise CorruptMetadata(where, f"unreadable manifest segment: {e}") from None


def _pack_names(raw: bytes, pos: int, count: int, lineage: bool) -> tuple[list[Any], int]:
    names: list[Any] = []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", raw, pos)
        name = raw[pos + 2 : pos + 2 + n].decode()
        if len(name) != n or not _OBJECT_RE[PACKS].match(name):
            raise ValueError(f"pack name {name!r}")
        pos += 2 + n
        if lineage:
            lin = bytes(raw[pos : pos + 16])
            if len(lin) != 16:
                raise ValueError("truncated pack table")
            names.append((name, lin))
            pos += 16
        else:
            names.append(name)
    return names, pos


def _entries(raw: bytes, pos: int, count: int, blocks: int | None) -> Iterable[tuple[Any, ...]]:
    if len(raw) - pos != count * _SEG_ENTRY.size:
        raise ValueError(f"{len(raw) - pos} bytes of entries, expected {count} entries")
    last = -1
    for item in _SEG_ENTRY.iter_unpack(raw[pos:]):
        block = item[0]
        if block <= last or (blocks is not None and block >= blocks):
            raise ValueError(f"block {block} out of order or outside the disk")
        last = block
        yield item


def _check_length(length: int, compressed: bool, block_size: int | None) -> None:
    if length <= 0 or (block_size is not None and length > block_size):
        raise ValueError(f"stored length {length}")
    if block_size is not None and not compressed and length != block_size:
        raise ValueError(f"uncompressed block of {length} bytes")


def _decode_v2(data: bytes, block_size: int | None, blocks: int | None) -> dict[int, Entry | None]:
    digest, payload = data[8:40], data[40:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("segment checksum mismatch")
    raw = lz4.frame.decompress(payload)
    seg_block_size, count, npacks = _SEG2_HEADER.unpack_from(raw, 0)
    if block_size is not None and seg_block_size != block_size:
        raise ValueError(f"written for block size {seg_block_size}, not {block_size}")
    packs, pos = _pack_names(raw, _SEG2_HEADER.size, npacks, lineage=True)
    result: dict[int, Entry | None] = {}
    for block, ref, off, length, flags, dig in _entries(raw, pos, count, blocks):
        if ref == _NO_PACK:
            if flags not in (_ZERO, _TOMBSTONE) or off or length or dig != _NO_DIGEST:
                raise ValueError(f"block {block}: bad entry without data")
            result[block] = ZERO if flags == _ZERO else None
            continue
        if ref >= len(packs) or flags & ~(_COMPRESSED | _LEGACY_SHA256 | _LEGACY_BLAKE2B):
            raise ValueError(f"block {block}: pack {ref}, flags {flags:#x}")
        legacy = flags & (_LEGACY_SHA256 | _LEGACY_BLAKE2B)
        if legacy == _LEGACY_SHA256 | _LEGACY_BLAKE2B:
            raise ValueError(f"block {block}: two digest kinds")
        compressed = bool(flags & _COMPRESSED)
        _check_length(length, compressed, seg_block_size)
        name, lineage = packs[ref]
        if not legacy and lineage == _NO_LINEAGE:
            raise ValueError(f"block {block}: no lineage")
        result[block] = Location(
            name,
            off,
            length,
            compressed,
            dig,
            None if legacy else lineage,
            legacy != _LEGACY_BLAKE2B,
        )
    return result


def _decode_v1(data: bytes, block_size: int | None, blocks: int | None) -> dict[int, Entry | None]:
    raw = lz4.frame.decompress(data)
    magic, count, npacks = _SEG1_HEADER.unpack_from(raw, 0)
    if magic != _SEG1_MAGIC:
        raise ValueError("bad magic")
    names, pos = _pack_names(raw, _SEG1_HEADER.size, npacks, lineage=False)
    result: dict[int, Entry | None] = {}
    for block, ref, off, length, flags, dig in _entries(raw, pos, count, blocks):
        if ref == _NO_PACK:
            if flags not in (_V1_ZERO, _V1_TOMBSTONE):
                raise ValueError(f"block {block}: bad entry without data")
            result[block] = ZERO if flags == _V1_ZERO else None
            continue
        if ref >= len(names) or flags & ~(_V1_COMPRESSED | _V1_SHA256):
            raise ValueError(f"block {block}: pack {ref}, flags {flags:#x}")
        compressed = bool(flags & _V1_COMPRESSED)
        _check_length(length, compressed, block_size)
        result[block] = Location(
            names[ref], off, length, compressed, dig, None, bool(flags & _V1_SHA256)
        )
    return result


def segment_packs(data: bytes, where: str, sha256: str | None = None) -> set[str]:
    """The pack objects a segment references (for garbage collection)."""
    entries = decode_segment(data, where, sha256=sha256)
    return {e.pack for e in entries.values() if isinstance(e, Location)}
