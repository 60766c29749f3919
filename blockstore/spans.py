"""Byte ranges written into one block: the dirty part of a block whose other bytes the
disk has not read. A span is (start, end, data), data None for zeros; a tuple of spans is
sorted and non-overlapping, and a newer span replaces what it covers of older ones."""

from __future__ import annotations

Span = tuple[int, int, bytes | None]


def lay(spans: tuple[Span, ...], start: int, end: int, data: bytes | None) -> tuple[Span, ...]:
    """``spans`` with [start, end) written over them (zeros when ``data`` is None)."""
    out: list[Span] = []
    new: Span = (start, end, data)
    for s, e, d in spans:
        if e <= start or s >= end:
            out.append((s, e, d))
            continue
        if s < start:
            out.append((s, start, None if d is None else d[: start - s]))
        if e > end:
            out.append((end, e, None if d is None else d[end - s :]))
    out.append(new)
    out.sort(key=lambda span: span[0])
    return _coalesce(out)


def _coalesce(spans: list[Span]) -> tuple[Span, ...]:
    out: list[Span] = []
    for s, e, d in spans:
        if out and out[-1][1] == s and (out[-1][2] is None) == (d is None):
            ps, _, pd = out[-1]
            out[-1] = (ps, e, None if d is None else pd + d)  # type: ignore[operator]
        else:
            out.append((s, e, d))
    return tuple(out)


def apply(spans: tuple[Span, ...], under: bytes) -> bytes:
    buf = bytearray(under)
    for s, e, d in spans:
        buf[s:e] = d if d is not None else bytes(e - s)
    return bytes(buf)


def data_bytes(spans: tuple[Span, ...]) -> int:
    return sum(e - s for s, e, d in spans if d is not None)


def covers(spans: tuple[Span, ...], size: int) -> bool:
    return len(spans) == 1 and spans[0][0] == 0 and spans[0][1] == size
