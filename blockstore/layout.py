"""Where things live in a store, and how manifests are encoded.

A store (a directory or an S3 prefix) holds any number of disks::

    disks/<name>/head               the commit point: JSON, replaced with If-Match only
    disks/<name>/lease              the writer's lease: JSON, If-None-Match / If-Match
    disks/<name>/checkpoints/<tag>  a frozen head: created once, never replaced
    segments/<uuid>                 manifest segments (block -> location), immutable
    packs/<uuid>                    compressed blocks packed together, immutable

A head lists its segments oldest first; a later entry for a block overrides an earlier one.
Segments and packs are shared between a disk, its checkpoints and its forks, which is why
they live outside ``disks/``; garbage collection is mark-and-sweep from every head and
checkpoint in the store.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import lz4.frame

from .errors import BlockStoreError, InvalidURL

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

SEGMENTS = "segments/"
PACKS = "packs/"
DISKS = "disks/"


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


def checksum(data: bytes, sha256: bool = True) -> bytes:
    """128-bit digest of a block's plain content. New blocks use SHA-256, which current x86
    and ARM CPUs run in hardware (three times BLAKE2b's speed here: a CPU-bound server
    stores and serves more per core); blocks written before carry BLAKE2b and stay readable.
    hashlib releases the GIL on big buffers."""
    if sha256:
        return hashlib.sha256(data).digest()[:16]
    return hashlib.blake2b(data, digest_size=16).digest()


class Location(NamedTuple):
    """Where a block's bytes are: a slice of a pack object."""

    pack: str
    offset: int
    length: int
    compressed: bool
    digest: bytes
    sha256: bool = True
    """Which :func:`checksum` ``digest`` is; False for blocks of older lanekit (BLAKE2b)."""


ZERO = "zero"
"""Map value of a block that reads as zeros although the base may have data there."""

Entry = Location | str


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
    segments: list[str] = field(default_factory=list)
    parent: str | None = None
    stored_blocks: int = 0
    stored_bytes: int = 0
    format: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> Head:
        try:
            raw: dict[str, Any] = json.loads(data)
            if raw.get("format") != FORMAT_VERSION:
                raise BlockStoreError(
                    f"{where}: format {raw.get('format')} is not supported "
                    f"(this lanekit reads format {FORMAT_VERSION})"
                )
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise BlockStoreError(f"{where}: unreadable head: {e}") from e


_SEG_MAGIC = b"LKSEG001"
_SEG_HEADER = struct.Struct("<8sQI")
_SEG_ENTRY = struct.Struct("<QIIIB16s")
_NO_PACK = 0xFFFFFFFF
_COMPRESSED = 1
_SHA256 = 2
"""Entry flags of a stored block (older lanekit wrote only _COMPRESSED and reads a SHA-256
digest as a checksum mismatch: it refuses the block rather than return it unverified)."""


def encode_segment(entries: dict[int, Entry | None]) -> bytes:
    """Binary segment: pack-name table, then fixed-size entries; lz4-framed.

    ``None`` values are tombstones (the block reverts to the base image)."""
    packs: dict[str, int] = {}
    body = bytearray()
    for block in sorted(entries):
        e = entries[block]
        if isinstance(e, Location):
            ref = packs.setdefault(e.pack, len(packs))
            flags = (_COMPRESSED if e.compressed else 0) | (_SHA256 if e.sha256 else 0)
            body += _SEG_ENTRY.pack(block, ref, e.offset, e.length, flags, e.digest)
        else:
            kind = 2 if e == ZERO else 3
            body += _SEG_ENTRY.pack(block, _NO_PACK, 0, 0, kind, b"\0" * 16)
    out = bytearray(_SEG_HEADER.pack(_SEG_MAGIC, len(entries), len(packs)))
    for name in packs:
        raw = name.encode()
        out += struct.pack("<H", len(raw)) + raw
    out += body
    return bytes(lz4.frame.compress(bytes(out)))


def decode_segment(data: bytes, where: str) -> dict[int, Entry | None]:
    try:
        raw = lz4.frame.decompress(data)
        magic, count, npacks = _SEG_HEADER.unpack_from(raw, 0)
        if magic != _SEG_MAGIC:
            raise ValueError("bad magic")
        pos = _SEG_HEADER.size
        names: list[str] = []
        for _ in range(npacks):
            (n,) = struct.unpack_from("<H", raw, pos)
            names.append(raw[pos + 2 : pos + 2 + n].decode())
            pos += 2 + n
        if len(raw) - pos != count * _SEG_ENTRY.size:
            raise ValueError("truncated")
        result: dict[int, Entry | None] = {}
        for block, ref, off, length, flags, digest in _SEG_ENTRY.iter_unpack(raw[pos:]):
            if ref == _NO_PACK:
                result[block] = ZERO if flags == 2 else None
            else:
                result[block] = Location(
                    names[ref],
                    off,
                    length,
                    bool(flags & _COMPRESSED),
                    digest,
                    bool(flags & _SHA256),
                )
        return result
    except Exception as e:
        raise BlockStoreError(f"{where}: unreadable manifest segment: {e}") from e


def segment_packs(data: bytes, where: str) -> set[str]:
    """The pack objects a segment references (for garbage collection)."""
    return {e.pack for e in decode_segment(data, where).values() if isinstance(e, Location)}
