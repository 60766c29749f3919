"""Sparse files: where a file holds data, so copies skip its holes instead of reading
gigabytes of zeros."""

from __future__ import annotations

import os


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts of a file that may hold data; holes are left out
    (a filesystem without SEEK_DATA reports the whole file as data)."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == 6:  # ENXIO: only a hole from here on
                break
            return [(0, size)]  # EINVAL: this filesystem cannot tell
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            ranges.append((start, end - start))
        offset = end
    return ranges
