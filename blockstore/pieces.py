"""Format-3 pieces: the stored bytes of a whole block or of an extent (part of a block).

A piece is a 16-byte digest followed by its payload (the content, lz4-compressed when that
saves space). The digest is SHA-256 over the piece's address and its payload: the lineage
of the disk that wrote it, the pack and the offset it was written at, the block index, the
range of the block it covers, its flags. A manifest entry names the pack, the offset, the
range and the flags, so data served from any other place, block or range than the one its
entry names fails the check, as a moved block does in format 2 (where the digest sits in
the manifest entry). Keeping the digest next to the data keeps the manifest at 16 bytes
per block; hashing the payload (not the decompressed content) also means nothing is
decompressed before it is verified.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import lz4.block

from .layout import block_digest, checksum

HEADER = 16
_ADDRESS = struct.Struct("<8s16s16sQQIIB")
_WHERE = struct.Struct("<QQIIB")
_pack_where = _WHERE.pack
_compress = lz4.block.compress
_MAGIC = b"LKPC0003"

# Entry kinds (3 bits of an entry's meta word). Whole-block kinds replace whatever older
# entries said about the block; extents lay over it.
DATA, EXTENT, ZERO, TOMB, ZERO_EXTENT = 0, 1, 2, 3, 4
KINDS = (DATA, EXTENT, ZERO, TOMB, ZERO_EXTENT)

# Entry flags (4 bits).
COMPRESSED = 0x1
V2 = 0x2
"""A format-2 block: no header; its digest (in the manifest) covers lineage, index, content."""
V1_SHA256 = 0x4
V1_BLAKE2B = 0x8
"""Format-1 blocks: no header; the manifest's digest covers the content only."""
LEGACY = V2 | V1_SHA256 | V1_BLAKE2B


def replaces(kind: int) -> bool:
    return kind in (DATA, ZERO, TOMB)


def _digest(
    lineage: bytes, pack: bytes, offset: int, block: int, start: int, length: int, flags: int
) -> Any:
    return hashlib.sha256(_ADDRESS.pack(_MAGIC, lineage, pack, offset, block, start, length, flags))


class PackWriter:
    """The pieces of one pack, encoded one after the other."""

    def __init__(self, lineage: bytes, pack: bytes) -> None:
        self._prefix = hashlib.sha256(_MAGIC + lineage + pack)
        self._parts: list[bytes] = []
        self.offset = 0

    def add(self, block: int, start: int, data: bytes | memoryview) -> tuple[int, int, int]:
        """Encode ``data`` written at ``start`` of ``block``: (offset, stored length, flags)."""
        n = len(data)
        flags = 0
        payload = data
        if n >= 64:
            packed = _compress(data, store_size=False)
            if len(packed) < n - (n >> 5):
                payload, flags = packed, COMPRESSED
        h = self._prefix.copy()
        offset = self.offset
        h.update(_pack_where(offset, block, start, n, flags))
        h.update(payload)
        parts = self._parts
        parts.append(h.digest()[:HEADER])
        parts.append(payload if type(payload) is bytes else bytes(payload))
        stored = HEADER + len(payload)
        self.offset = offset + stored
        return offset, stored, flags

    def body(self) -> bytes:
        return b"".join(self._parts)


def encode_piece(
    lineage: bytes, pack: bytes, offset: int, block: int, start: int, data: bytes | memoryview
) -> tuple[bytes, int]:
    """(stored bytes, flags) of ``data`` written at ``start`` of ``block``, at ``offset`` of
    the pack whose uuid is ``pack`` (one piece; see PackWriter for many)."""
    writer = PackWriter(lineage, pack)
    writer.offset = offset
    _, _, flags = writer.add(block, start, data)
    return writer.body(), flags


def decode_piece(
    raw: bytes | memoryview,
    *,
    lineage: bytes,
    pack: bytes,
    offset: int,
    block: int,
    start: int,
    length: int,
    flags: int,
) -> bytes:
    """The verified content of a piece; ValueError says why not."""
    if len(raw) <= HEADER:
        raise ValueError(f"piece of {len(raw)} bytes")
    h = _digest(lineage, pack, offset, block, start, length, flags)
    h.update(raw[HEADER:])
    if h.digest()[:HEADER] != bytes(raw[:HEADER]):
        raise ValueError("checksum mismatch (damaged, or the data of another block)")
    payload = raw[HEADER:]
    if not flags & COMPRESSED:
        if len(payload) != length:
            raise ValueError(f"checksum mismatch ({len(payload)} bytes, expected {length})")
        return bytes(payload)
    try:
        data = lz4.block.decompress(payload, uncompressed_size=length)
    except Exception as e:
        raise ValueError(f"lz4 decoding failed: {e}") from None
    if len(data) != length:
        raise ValueError(f"decoded {len(data)} bytes, expected {length}")
    return bytes(data)


def decode_legacy(
    raw: bytes, *, flags: int, digest: bytes, lineage: bytes | None, block: int, block_size: int
) -> bytes:
    """The verified content of a block written by format 1 or 2 (no header)."""
    if flags & COMPRESSED:
        try:
            raw = lz4.block.decompress(raw, uncompressed_size=block_size)
        except Exception as e:
            raise ValueError(f"lz4 decoding failed: {e}") from None
    if len(raw) != block_size:
        raise ValueError(f"checksum mismatch ({len(raw)} bytes, expected {block_size})")
    if flags & V2:
        assert lineage is not None
        good = block_digest(lineage, block, raw) == digest
    else:
        good = checksum(raw, not flags & V1_BLAKE2B) == digest
    if not good:
        raise ValueError("checksum mismatch (damaged, or the data of another block)")
    return raw
